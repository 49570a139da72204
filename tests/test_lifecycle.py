"""How a run stops on SIGTERM, in a process of its own (pytest keeps its own signal handlers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOST = """
import os, signal, time, weakref
from modelyard import lifecycle

lifecycle.install()


class Thing:
    pass


def callback(_):  # Python prints and drops what a weakref callback raises (as in an import's module lock)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)


thing = Thing()
ref = weakref.ref(thing, callback)
try:
    del thing
    for _ in range(300):
        time.sleep(0.01)
    print("lost")
except lifecycle.Terminated:
    print("terminated")
"""


def test_a_sigterm_whose_handler_ran_inside_an_ignored_callback_still_stops_the_run():
    """Seen in a suite run: SIGTERM while the servers started landed in importlib's weakref
    callback, the handler's Terminated was dropped, and the run went on until the 6 s deadline."""
    r = subprocess.run([sys.executable, "-c", LOST], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.strip() == "terminated", (r.stdout, r.stderr)
    assert r.stderr.count("stopping the run's vLLM servers") == 1, r.stderr  # begun once


IN_FLIGHT = """
import asyncio, signal, threading, time
from modelyard import lifecycle
from modelyard.client import Dispatcher
from modelyard.errors import EngineError

seen = []


async def shard():  # a shard's requests to a server the run did not start: the stop does not fail them
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        seen.append("cancelled")
        raise


threading.Timer(0.3, lifecycle.begin_stop, (signal.SIGTERM,)).start()
t0 = time.monotonic()
try:
    Dispatcher.get().run(shard())
    print("finished")
except EngineError as e:
    print(f"{e} | {seen} | {time.monotonic() - t0:.1f}")
"""


def test_a_shard_in_flight_at_a_sigterm_ends_without_waiting_for_its_requests():
    """Seen in CI: on the session's (external) tiny server, a SIGTERM after the first of 8 shards and
    all 8 done records were written before the process exited: queued shards started after the
    signal and the one in flight ran on. The dispatcher now cancels a shard once the run stops."""
    r = subprocess.run([sys.executable, "-c", IN_FLIGHT], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    message, seen, took = r.stdout.strip().split(" | ")
    assert message == "shard stopped: the run received SIGTERM", (r.stdout, r.stderr)
    assert seen == "['cancelled']"
    assert float(took) < 2


def test_a_deployments_flow_run_is_known_as_one_from_its_context_as_prefect_knows_it(prefect_harness):
    """The pipeline reads whether its run belongs to a deployment (a deadline on unwinding, the worker
    delivers cancels) from the run's context, not from ``runtime.deployment.id``, which asks the API.
    Both answers, for a real flow run created from a deployment and for a plain call."""
    from prefect import flow, runtime
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.pipeline import _deployed

    @flow(name="modelyard-deployed-probe")
    def probe() -> tuple[bool, bool]:
        return _deployed(), runtime.deployment.id is not None

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("modelyard-deployed-probe")
        deployment_id = client.create_deployment(flow_id=flow_id, name="probe")
        flow_run = client.create_flow_run_from_deployment(deployment_id)
    assert run_flow(probe, flow_run=flow_run) == (True, True)
    assert probe() == (False, False)


MANY_TASKS = """
import os, sys
from modelyard.cli import prefect_defaults

prefect_defaults()
from prefect import flow, task


@task
def one(i):
    return i


@flow
def many():
    return sum(one.map(range(200)).result())


print("sum", many(), os.environ.get("PREFECT_LOGGING_SETTINGS_PATH"))
"""


def test_the_temporary_api_servers_shutdown_prints_no_cancellation_tracebacks(tmp_path):
    """Seen after a SIGTERM in CI: Prefect stops its temporary API server at exit while the server's
    services still write a run's last events, and each cancelled write was logged with a traceback
    (``sqlalchemy.pool ... Exception during reset or similar``; ``task_run_recorder - Error flushing
    1 events``). A flow of 200 task runs, ended at once, made Prefect 3.9 print them in 7 of 7 runs
    here. Under modelyard's settings, its temporary server drops them; the run's own output stays."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_LOGGING_SETTINGS_PATH")}
    r = subprocess.run([sys.executable, "-c", MANY_TASKS], cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env={**env, "PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT),
                            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert r.returncode == 0, r.stderr[-3000:]
    total, path = r.stdout.split()[1:]
    assert total == "19900"
    assert "Starting temporary server" in r.stderr and "Finished in state Completed()" in r.stderr
    assert "Traceback" not in r.stderr and "| ERROR" not in r.stderr, r.stderr[-3000:]
    assert Path(path).parent == home and Path(path).exists()


def test_the_shutdown_filter_drops_only_a_servers_cancellations_and_keeps_a_users_own_configuration(
        tmp_path, monkeypatch):
    import asyncio
    import logging

    from modelyard import prefect_logging

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("sqlalchemy.pool", logging.ERROR, __file__, 1, "Exception during reset", None,
                                 (type(exc), exc, None))

    monkeypatch.setenv("PREFECT__SERVER_EPHEMERAL", "1")
    in_server = prefect_logging.ServerShutdownNoise()
    assert not in_server.filter(record(asyncio.CancelledError()))
    assert in_server.filter(record(RuntimeError("database is locked")))
    monkeypatch.delenv("PREFECT__SERVER_EPHEMERAL")
    assert prefect_logging.ServerShutdownNoise().filter(record(asyncio.CancelledError()))  # a run's process

    monkeypatch.delenv("PREFECT_LOGGING_SETTINGS_PATH", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    (tmp_path / "logging.yml").write_text("version: 1\n")
    assert prefect_logging.install() is None and "PREFECT_LOGGING_SETTINGS_PATH" not in os.environ
    (tmp_path / "logging.yml").unlink()
    monkeypatch.setenv("PREFECT_LOGGING_SETTINGS_PATH", str(tmp_path / "mine.yml"))
    assert prefect_logging.install() is None
    monkeypatch.delenv("PREFECT_LOGGING_SETTINGS_PATH")
    path = prefect_logging.install()
    import yaml

    config = yaml.safe_load(path.read_text())
    assert config["handlers"]["console"]["filters"] == [prefect_logging.FILTER]
    assert config["loggers"]["prefect.server"]["level"] == "${PREFECT_SERVER_LOGGING_LEVEL}"
