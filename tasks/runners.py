"""The task runner that runs shard tasks: threads here, or workers of Ray or Dask.

Chosen at run time from the config's `runner:` (or `--runner`), so one deployment can run on a
laptop or on a cluster. Shard tasks get a picklable `Job` and reach data through fsspec; API keys
travel as environment variables of the workers (Ray's runtime_env), never inside pickled
arguments or logs.
"""

from __future__ import annotations

import os

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from modelyard.config import PipelineConfig
from modelyard.errors import ConfigError


def secret_env(cfg: PipelineConfig) -> dict[str, str]:
    names = {m.api_key_env for m in cfg.models.values() if m.api_key_env}
    return {n: os.environ[n] for n in names if n in os.environ}


def task_runner(cfg: PipelineConfig, kind: str | None = None) -> TaskRunner:
    kind = kind or cfg.runner.kind
    if kind == "local":
        return ThreadPoolTaskRunner(max_workers=cfg.parallel_shards)
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ConfigError("runner ray needs prefect-ray: pip install 'modelyard[ray]'") from None
        env = {**secret_env(cfg), "PYTHONPATH": _project_path()}
        init: dict = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": False}
        if cfg.runner.address is None:
            init["num_cpus"] = cfg.runner.num_cpus or os.cpu_count() or 2
            api = temporary_api_url()
            if api:  # workers on this machine report to this run's API instead of starting their own
                env["PREFECT_API_URL"] = api
        else:
            init.pop("include_dashboard")
        return RayTaskRunner(address=cfg.runner.address, init_kwargs=init)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError("runner dask needs prefect-dask: pip install prefect-dask") from None
        return DaskTaskRunner(address=cfg.runner.address) if cfg.runner.address else DaskTaskRunner()
    raise ConfigError(f"unknown runner {kind!r}: local, ray or dask")


def temporary_api_url() -> str | None:
    """The API of the temporary server Prefect started in this process (no ``PREFECT_API_URL``).
    Without it each local Ray worker started a temporary server of its own (seen: five API
    server processes for a run on two workers), a few seconds of CPU each before its first shard."""
    if os.environ.get("PREFECT_API_URL"):
        return None  # workers inherit it
    from modelyard.lifecycle import temporary_api_servers

    servers = temporary_api_servers()
    return servers[0].api_url if servers else None


def _project_path() -> str:
    from modelyard.serving import PROJECT

    return os.pathsep.join(p for p in (str(PROJECT), os.environ.get("PYTHONPATH", "")) if p)


def concurrent_workers(runner: TaskRunner) -> int:
    """Processes that may run shard tasks at the same time: 1 for threads of this process (they
    share its bound), the cluster's CPUs on Ray (one task per CPU), Dask's worker processes."""
    name = type(runner).__name__
    try:
        if name == "RayTaskRunner":
            import ray

            return max(1, int(ray.cluster_resources().get("CPU", 1)))
        if name == "DaskTaskRunner":
            return max(1, len(runner._client.scheduler_info()["workers"]))
    except Exception:  # noqa: BLE001 - an unknown cluster shares nothing: the bound stays per process
        return 1
    return 1
