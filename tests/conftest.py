"""Shared fixtures: a Prefect test harness and real vLLM CPU servers, each started once a session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HOME = tempfile.mkdtemp(prefix="modelyard-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def demo_config():
    from modelyard.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml", {"date": "2026-11-27"})


@pytest.fixture(scope="session")
def servers(demo_config):
    """The demo's three models on real vLLM CPU servers, started side by side exactly as a run places
    them (the planner's memory shares, through modelyard's own managed-server code): runs in this
    process of a config with the same models (the demo, the README's pipeline) reuse them."""
    from modelyard.models import server_jobs, start_servers
    from modelyard.serving import REGISTRY

    cfg = demo_config.config
    jobs = server_jobs(cfg, None, list(cfg.models), 0, None, demo_config.base_dir)
    started, errors = start_servers(demo_config, jobs)
    assert not errors, errors
    yield {n: s for (n, _), s in started.items()}
    for s in started.values():
        REGISTRY.release(s)


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real console script in a subprocess, as a user would run it."""
    exe = Path(sys.executable).with_name("modelyard")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on loopback, for subprocess runs (PREFECT_API_URL)."""
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("prefect-server-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115
    exe = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen([str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("prefect server did not become healthy in 180 s")
    yield url
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def requests_served(server, settle: float = 0.25, timeout: float = 15.0) -> int:
    """Requests a real vLLM server has finished, from its own Prometheus counters.

    vLLM records a request's stats after it has handed the reply to the HTTP layer, so a
    client can see its last reply before the counter moves. Read until the server runs and
    queues nothing and the counter holds still for `settle` seconds (0: read once)."""
    import httpx

    def read() -> tuple[int, float]:
        text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text

        def total(prefix: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

        busy = total("vllm:num_requests_running{") + total("vllm:num_requests_waiting{")
        return int(total("vllm:request_success_total{")), busy

    deadline = time.monotonic() + timeout
    last, busy = read()
    if not settle:  # a reading while requests run (a test watching progress)
        return last
    while True:
        time.sleep(settle)
        now, busy_now = read()
        if (now == last and busy == busy_now == 0) or time.monotonic() > deadline:
            return now
        last, busy = now, busy_now


def vllm_process(server):
    """The real vLLM process of a managed server (the child of modelyard's small launcher)."""
    import psutil

    launcher = psutil.Process(server.proc.pid)
    (api,) = [p for p in launcher.children() if "_vllm_server.py" in " ".join(p.cmdline())]
    return api


def kill_vllm(server) -> int:
    """SIGKILL a managed server's vLLM process, as a crash would; returns its pid."""
    import signal

    pid = vllm_process(server).pid
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.fixture(scope="session")
def small_server(servers):
    """builtin:small-llama, the demo's second generative model (other weights, about four times
    the parameters), for cascades and votes."""
    return servers["small"]
