"""One managed vLLM server process: started behind its launcher, waited for, stopped.

``STOPPING`` is set once the run is stopping (a signal, a cancel): no server starts any more, and a
start under way gives up at its next health poll.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from modelyard import sync_http, telemetry
from modelyard.errors import EngineError
from modelyard.server_log import first_error

log = logging.getLogger("modelyard")
PACKAGE = Path(__file__).resolve().parent
SERVER_MAIN = PACKAGE / "_vllm_server.py"  # vLLM's OpenAI-compatible server, see that file


class _Stopping(threading.Event):
    """Set once the run is stopping: nothing starts any more, starts under way give up."""

    reason = "the run is stopping"

    def begin(self, reason: str) -> None:
        self.reason = reason
        self.set()


STOPPING = _Stopping()


def home() -> Path:
    return Path(os.environ.get("MODELYARD_HOME", Path.home() / ".cache" / "modelyard"))


# Ports this process has handed to its servers. Two binds to port 0 in a row can return the same
# port, and vLLM binds its socket with SO_REUSEADDR about a minute before it listens: two servers
# started side by side on one port both start, both listen, and the kernel splits the connections
# between them (seen in the suite: the demo's `small` URL answered as builtin:minilm).
_GIVEN: set[int] = set()
_GIVEN_LOCK = threading.Lock()
PORT_CHECKS = 8  # /v1/models on fresh connections once healthy: another listener on the port is met
HEALTH_POLL_S = 0.1  # a poll of a port not yet listening is one refused connect: a few microseconds


def free_port() -> int:
    """A free loopback port that no other server of this process has been given."""
    with _GIVEN_LOCK:
        for _ in range(1000):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _GIVEN:
                _GIVEN.add(port)
                return port
    raise EngineError("no free loopback port for a vLLM server: 1000 tries")


def release_port(port: int) -> None:
    """The port may be handed out again (its server has stopped and will not start on it again)."""
    with _GIVEN_LOCK:
        _GIVEN.discard(port)


class PortShared(EngineError):
    """Another server answers on a managed server's port (the server itself is stopped)."""


@dataclass
class Server:
    """One managed vLLM server process (behind its launcher)."""

    python: str
    path: str
    served_name: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    refs: int = 0
    reserved: int = 0  # of ``refs``, held by a command for the flow it runs (``Registry.claim``)
    healthy: bool = False  # answered /health since its last start
    attempts: int = 0  # starts tried
    failure: EngineError | None = None  # why the last start failed
    signalled: bool = False  # told to stop since its last start
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopping: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, same_port: bool = False) -> None:
        if STOPPING.is_set():
            raise EngineError(f"vLLM server for {self.served_name} not started: {STOPPING.reason}")
        self.healthy = self.signalled = False
        if not (same_port and self.port):
            if self.port:
                release_port(self.port)
            self.port = free_port()
        logs = home() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{self.served_name.replace('/', '_').replace(':', '_')}-{self.port}.log"
        cmd = [self.python, str(PACKAGE / "_launcher.py"), str(os.getpid()), "--", self.python, str(SERVER_MAIN),
               "--model", self.path, "--served-model-name", self.served_name,
               "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VIRTUAL_ENV"))}
        env.update(self.env)
        log.info("starting vLLM for %s on port %d (log: %s)", self.served_name, self.port, self.log_path)
        fh = open(self.log_path, "ab")  # noqa: SIM115 - the server writes to it until it stops
        self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        fh.close()
        telemetry.event("server-start", model=self.served_name, port=self.port)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except (OSError, AttributeError):
            return "(no log)"

    def root_cause(self) -> str:
        """The first error of this server's log, then the log's path."""
        try:
            cause = first_error(self.log_path.read_text(errors="replace"))
        except (OSError, AttributeError):
            cause = None
        return f"{cause or 'its log names no error'} (log: {self.log_path})"

    def wait_healthy(self, timeout: float) -> None:
        """Poll until /health answers 200. Until the port listens a poll is one refused connect; one
        client serves every HTTP poll."""
        deadline = time.monotonic() + timeout
        with sync_http.client(timeout=2) as client:
            while time.monotonic() < deadline:
                if STOPPING.is_set():
                    self.stop()
                    raise EngineError(f"vLLM server for {self.served_name} not started: {STOPPING.reason}")
                if self.proc.poll() is not None:
                    raise EngineError(f"the vLLM server for {self.served_name} did not start (exit code "
                                      f"{self.proc.returncode}): {self.root_cause()}")
                try:
                    if self._listening() and client.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                        self.healthy = True
                        self._check_port()
                        return telemetry.event("server-healthy", model=self.served_name, port=self.port)
                except httpx.TransportError:
                    pass
                time.sleep(HEALTH_POLL_S)
        self.stop()
        raise EngineError(f"the vLLM server for {self.served_name} was not healthy after {timeout:.0f} s "
                          f"(serve.startup_timeout): {self.root_cause()}")

    def _check_port(self) -> None:
        """Every answer on the port comes from this server: ``PORT_CHECKS`` requests for /v1/models,
        each on a new connection (the kernel spreads connections over the listeners of a port). A
        port shared with another server stops this one and raises PortShared."""
        others: set[str] = set()
        fresh = httpx.Limits(max_keepalive_connections=0)  # each request on a connection of its own
        with sync_http.client(timeout=5, limits=fresh) as client:
            answers = [self._models(client) for _ in range(PORT_CHECKS)]
        for served in answers:
            if served is not None and self.served_name not in served:
                others |= served or {"no model"}
        if others:
            self.stop()
            raise PortShared(f"the vLLM server for {self.served_name} shares port {self.port} with another "
                             f"server, which serves {', '.join(sorted(others))}; stopped it")

    def _models(self, client: httpx.Client) -> set[str] | None:
        """What the port says it serves (/v1/models); None when that is not an answer about models."""
        try:
            r = client.get(f"http://127.0.0.1:{self.port}/v1/models")
            if r.status_code != 200:  # an API key in the server's own arguments, say: nothing learnt
                return None
            return {str(d.get("id")) for d in r.json().get("data", [])}
        except (httpx.HTTPError, ValueError, AttributeError, TypeError):
            return None  # not an answer about models: the health poll decides about the server itself

    def _listening(self) -> bool:
        """Something accepts connections on the port (vLLM binds it long before it listens)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def held_bytes(self) -> int:
        """Memory its processes hold (proportional set size: shared pages counted once)."""
        import psutil

        if not self.alive():
            return 0
        total = 0
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            return 0
        for p in procs:
            try:
                info = p.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except psutil.Error:
                continue
        return total

    def stop(self, timeout: float = 10, wait: bool = True) -> None:
        """TERM the launcher (it stops vLLM's process group: TERM, then KILL after a few seconds; a
        server still starting is killed at once); if it does not end in ``timeout`` s, KILL everything
        below it. Without ``wait``, only tell it to stop; a later ``stop()`` waits for it. The
        ``server-stop`` event is the moment it was told."""
        with self._stopping:
            if self.proc is None or self.proc.poll() is not None:
                return
            if not self.signalled:
                self.proc.send_signal(signal.SIGTERM if self.healthy else signal.SIGUSR1)
                self.signalled = True
                telemetry.event("server-stop", model=self.served_name, port=self.port)
            if not wait:
                return
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_tree()
                self.proc.wait()
            log.info("stopped vLLM for %s on port %d", self.served_name, self.port)

    def _kill_tree(self) -> None:
        import psutil

        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the server leads its own group: its engine goes too
            except OSError:
                pass
        self.proc.kill()
