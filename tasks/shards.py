"""Prefect tasks around the plain shard logic: thin on purpose.

Tasks receive paths and small picklable specs, never dataframes. Caching is off: a shard's own
``done.json`` record is what makes a re-run skip it, whichever runner executed it.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from modelyard import pipeline
from modelyard.plan import Plan
from modelyard.shard import CacheMiss, Job, run_from_cache, run_shard


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards(prepared: pipeline.Prepared) -> Plan:
    """Split the input into shard files (or find them from an earlier attempt)."""
    return pipeline.plan(prepared)


def _not_stopping(task, task_run, state) -> bool:
    """A shard that failed because the run is stopping (SIGTERM, a cancel) is not retried."""
    from modelyard.serving import STOPPING

    return not STOPPING.is_set()


@task(name="shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=_not_stopping)
def process_shard(job: Job, shard_id: int) -> dict:
    """Run every stage on one shard and write its result files."""
    return run_shard(job, shard_id)


@task(name="from-cache", cache_policy=NO_CACHE)
def answer_from_cache(job: Job, shard_ids: list[int]) -> dict[int, dict]:
    """Before any server starts: the shards the request cache answers whole, up to the first it cannot."""
    return run_from_cache(job, shard_ids)


@task(name="calibrate", cache_policy=NO_CACHE)
def calibrate_cascades(job: Job, plan: Plan) -> dict[str, dict] | None:
    """Fit the `auto` thresholds of the wave's cascades on their samples; None when a cache-only
    job cannot answer the sample from the request cache."""
    try:
        return pipeline.calibrate_wave(job, plan)
    except CacheMiss:
        return None


@task(name="commit", cache_policy=NO_CACHE)
def commit_output(prepared: pipeline.Prepared, job: Job, plan: Plan, stats: list[dict], run_id: str,
                  started: float, start_event: dict | None = None, gpu_seconds: dict | None = None,
                  calibrations: dict | None = None) -> dict:
    """Merge the shards into parts, write the manifest last, swap the output into place."""
    return pipeline.commit(prepared, job, plan, stats, run_id, started, start_event, gpu_seconds, calibrations)
