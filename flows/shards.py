"""The fan-out as a subflow, so that its task runner can be chosen at run time.

`run_shards.with_options(task_runner=...)` runs shard tasks on threads, Ray or Dask. Ray
serialises the running flow with each task, so this module keeps its globals few and picklable.
"""

from __future__ import annotations

import dataclasses

from prefect import flow
from prefect.context import FlowRunContext
from prefect.futures import as_completed

from modelyard.progress import Every
from tasks import ui
from tasks.runners import concurrent_workers
from tasks.shards import process_shard

PROGRESS_EVERY_S = 1.0  # the progress artifact's updates: at most one a second, and the last


@flow(name="modelyard-shards", flow_run_name="{stages}-shards", validate_parameters=False)
def run_shards(job, shard_ids: list[int], stages: str, progress=None) -> list[dict]:
    """Process every shard; update the progress artifact as they finish (at most once a second, and at
    the end); return their statistics.
    Worker processes that run shards at once split each endpoint's bound on requests in flight."""
    job = dataclasses.replace(job, workers=concurrent_workers(FlowRunContext.get().task_runner))
    futures = [process_shard.with_options(task_run_name=f"{stages} shard-{i:05d}").submit(job, i) for i in shard_ids]
    due = Every(PROGRESS_EVERY_S)
    for done, _ in enumerate(as_completed(futures), start=1):
        if due(final=done == len(futures)):
            ui.progress_update(progress, done, len(futures))
    return [f.result() for f in futures]
