"""Bring up every model a config names and learn what lineage needs about it.

``open_models`` starts managed servers (side by side), then asks each model's endpoints what they
serve (``/v1/models``), their engine version (``/version``) and, for embedding models, the
dimension. An unreachable external endpoint is reported, not fatal: its rows become error rows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from modelyard.config import LoadedConfig, ModelConfig
from modelyard import sync_http
from modelyard.errors import EngineError
from modelyard.planner import Placement
from modelyard.serving import REGISTRY, Server, engine_python, resolve_model
from modelyard.watchdog import Watchdog
from modelyard.shard import ModelRuntime

log = logging.getLogger("modelyard")


def _headers(m: ModelConfig) -> dict[str, str]:
    import os

    key = os.environ.get(m.api_key_env) if m.api_key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


def probe(name: str, m: ModelConfig, endpoints: list[str], served_name: str, revision: str) -> tuple[ModelRuntime, list[str]]:
    """Ask the endpoints about the model; returns the runtime and warnings for unreachable ones."""
    warnings, version, dims, reached = [], "unknown", None, False
    with sync_http.client(timeout=10) as client:
        for url in endpoints:
            base = url.rstrip("/")
            try:
                r = client.get(base + "/models", headers=_headers(m))
                r.raise_for_status()
                served = [d.get("id") for d in r.json().get("data", [])]
                if served_name not in served:
                    raise EngineError(f"models.{name}: endpoint {url} does not serve {served_name!r}; "
                                      f"it serves {', '.join(map(str, served)) or 'nothing'}")
                reached = True
                root = base[: -len("/v1")] if base.endswith("/v1") else base
                try:
                    version = client.get(root + "/version").json().get("version", version)
                except (httpx.HTTPError, ValueError):
                    pass
                if m.task == "embed" and dims is None:
                    e = client.post(base + "/embeddings", json={"model": served_name, "input": "dimension probe"},
                                    headers=_headers(m), timeout=m.timeout)
                    e.raise_for_status()
                    dims = len(e.json()["data"][0]["embedding"])
            except httpx.HTTPStatusError as e:
                warnings.append(f"models.{name}: endpoint {url} answered {e.response.status_code}: {e.response.text[:200]}")
            except httpx.HTTPError as e:
                warnings.append(f"models.{name}: cannot reach endpoint {url} ({type(e).__name__}: {e}); "
                                "its requests will be retried and may become error rows")
    if m.task == "embed" and dims is None:
        raise EngineError(f"models.{name}: no endpoint answered an embedding request, so its dimension is "
                          f"unknown: {'; '.join(warnings)}")
    if not reached:
        log.warning("models.%s: no endpoint reachable at start", name)
    rt = ModelRuntime(name=name, model_id=m.model, served_name=served_name, endpoints=list(endpoints),
                      revision=m.revision or revision, engine_version=version, dimensions=dims)
    return rt, warnings


@contextmanager
def open_models(loaded: LoadedConfig, only: set[str] | None = None, gpus: int | None = None, wave: int = 0,
                gpu_memory: float | None = None, stops: list[threading.Thread] | None = None,
                ) -> Iterator[tuple[dict[str, ModelRuntime], list[str]]]:
    """Start managed models (every replica, placed by the planner for wave ``wave``), probe all;
    stop the managed ones on exit (also on error, Ctrl-C or SIGTERM). Given ``stops``, the exit only
    tells them to stop and appends the threads that wait for them, for the caller to join."""
    cfg = loaded.config
    used = {m for st in cfg.stages for m in st.models_used}
    names = [n for n in cfg.models if n in (used if only is None else only)]
    managed = [n for n in names if cfg.models[n].managed]
    servers: dict[str, list[Server]] = {n: [] for n in managed}
    try:
        if managed:
            started, errors = start_servers(loaded, server_jobs(cfg, gpus, managed, wave, gpu_memory, loaded.base_dir))
            for (n, _), s in started.items():
                REGISTRY.claim(s)  # the command started it early for this flow: the flow's release stops it
                servers[n].append(s)
            if errors:
                raise EngineError("; ".join(errors))
        runtimes, warnings = {}, []
        python = engine_python(cfg.engine, loaded.base_dir) if managed else None
        for n in names:
            m = cfg.models[n]
            if n in servers:
                _, revision = resolve_model(m.model, python)
                eps, served = [s.url for s in servers[n]], servers[n][0].served_name
            else:
                p = Path(m.model)
                revision = m.revision or ("local" if p.is_dir() else "unpinned")
                eps, served = list(m.endpoints or []), m.model
            runtimes[n], w = probe(n, m, eps, served, revision)
            warnings += w
        watched = {f"{n}#{i}" if len(group) > 1 else n: (s, cfg.models[n].serve.max_restarts if cfg.models[n].serve else 2)
                   for n, group in servers.items() for i, s in enumerate(group)}
        with Watchdog(watched):
            yield runtimes, warnings
    finally:
        for group in servers.values():
            for s in group:
                thread = REGISTRY.release(s, wait=stops is None)
                if thread is not None:
                    stops.append(thread)


def server_jobs(cfg, gpus: int | None, names: list[str], wave: int = 0, gpu_memory: float | None = None,
                base_dir: Path | None = None) -> list[tuple[str, int, Placement]]:
    """(model, replica, placement) of every managed server of ``names`` to start in a wave."""
    from modelyard.planner import plan_for

    plan = plan_for(cfg, gpus, gpu_memory, base_dir)
    return [(p.model, p.replica, p) for p in plan.waves[wave].placements if p.model in names]


def start_servers(loaded: LoadedConfig, jobs: list[tuple[str, int, Placement]], reserve: bool = False,
                  ) -> tuple[dict[tuple[str, int], Server], list[str]]:
    """Start the servers of ``jobs``: side by side, except that servers sharing a GPU start one after
    another (vLLM sizes its KV cache from the GPU memory free while it profiles, assuming no other
    process changes it meanwhile; vLLM's CPU backend is given its KV cache size and needs no such
    care). Returns the servers started and an error per server that was not. ``reserve``: for the
    flow to come (``Registry.claim``)."""
    from modelyard.serving import engine_is_cpu

    cfg = loaded.config
    started: dict[tuple[str, int], Server] = {}
    errors: list[str] = []
    if not jobs:
        return started, errors
    cpu_engine = engine_is_cpu(engine_python(cfg.engine, loaded.base_dir))
    futures: dict[tuple[str, int], Future] = {}

    def start(n: str, i: int, placement: Placement, after: list[Future]) -> Server:
        for f in after:
            f.exception()  # wait for it; a neighbour that failed does not stop this one
        return REGISTRY.acquire(n, cfg.models[n], cfg.engine, loaded.base_dir, i, placement, reserve)

    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="modelyard-start") as ex:
        for n, i, p in jobs:
            after = [] if cpu_engine else [futures[(m, j)] for m, j, q in jobs[:jobs.index((n, i, p))]
                                           if set(q.devices) & set(p.devices)]
            futures[n, i] = ex.submit(start, n, i, p, after)
        for (n, i), f in futures.items():
            try:
                started[n, i] = f.result()
            except EngineError as e:
                errors.append(f"models.{n}: {e}")
    return started, errors


def _engine_fingerprint(python: str) -> str:
    """The engine environment and its vLLM build, without starting it: the dist-info folder's name."""
    root = Path(python).parent.parent
    found = sorted(p.name for p in root.glob("lib/python*/site-packages/vllm*.dist-info"))
    return f"{python}|{','.join(found)}"


def _runtime_keys(loaded: LoadedConfig, names: list[str]) -> dict[str, str]:
    from modelyard.cache import runtime_key

    cfg = loaded.config
    python = engine_python(cfg.engine, loaded.base_dir)
    engine = _engine_fingerprint(python)
    return {n: runtime_key(cfg.models[n].model, cfg.models[n].revision or resolve_model(cfg.models[n].model, python)[1],
                           engine) for n in names}


def remember_runtimes(loaded: LoadedConfig, cache, runtimes: dict[str, ModelRuntime]) -> None:
    """Keep what the managed models' servers said about themselves in the request cache."""
    managed = [n for n in runtimes if loaded.config.models[n].managed]
    if cache is None or not managed:
        return
    for n, key in _runtime_keys(loaded, managed).items():
        rt = runtimes[n]
        cache.put_runtime(key, {"served_name": rt.served_name, "revision": rt.revision,
                                "engine_version": rt.engine_version, "dimensions": rt.dimensions})


def cached_runtimes(loaded: LoadedConfig, cache, names: set[str]) -> dict[str, ModelRuntime] | None:
    """Runtimes of managed models ``names`` as their servers told an earlier run, with no endpoint:
    enough for a pass that only the request cache answers. None unless every one is known."""
    cfg = loaded.config
    if cache is None or not names or not all(cfg.models[n].managed for n in names):
        return None
    out = {}
    for n, key in _runtime_keys(loaded, sorted(names)).items():
        d = cache.get_runtime(key)
        if d is None:
            return None
        out[n] = ModelRuntime(name=n, model_id=cfg.models[n].model, served_name=d["served_name"], endpoints=[],
                              revision=d["revision"], engine_version=d["engine_version"], dimensions=d["dimensions"])
    return out
