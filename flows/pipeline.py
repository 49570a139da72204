"""The modelyard flow: plan shards, fan them out, commit one merged Parquet dataset.

    modelyard run configs/demo.yaml          # or: python -m flows.pipeline configs/demo.yaml

Every heavy step is plain Python in ``modelyard``; this file only says how Prefect runs it.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, runtime, tags

from modelyard import pipeline
from modelyard.models import open_models
from modelyard.planner import plan_for
from modelyard.progress import TRACKER
from tasks import ui
from flows.shards import run_shards
from tasks.runners import task_runner
from tasks.shards import commit_output, plan_shards, process_shard


def _run_name() -> str:
    """<job>-<partition date>: the config's name, the date parameter or the scheduled date."""
    p = runtime.flow_run.parameters
    job = pipeline.job_name(p.get("config", "modelyard"))
    date = (p.get("params") or {}).get("date") or pipeline.run_date(
        runtime.flow_run.scheduled_start_time, p.get("timezone") or "UTC")
    return f"{job}-{date}"


@flow(name="modelyard-pipeline", flow_run_name=_run_name, log_prints=True, validate_parameters=True)
def run_pipeline(config: str, params: dict[str, str] | None = None, limit: int | None = None,
                 output: str | None = None, retry_truncated: bool = False, timezone: str = "UTC",
                 runner: str | None = None, gpus: int | None = None) -> dict:
    """Run the pipeline of CONFIG once and return its manifest.

    `params` fill the config's {placeholders}; `date` defaults to the scheduled date of the run in
    `timezone`, so a scheduled or backfilled run reads and writes its own partition.
    """
    started = time.time()
    logger = get_run_logger()
    loaded = pipeline.load(config, params, output, runtime.flow_run.scheduled_start_time, timezone)
    prepared = pipeline.prepare(loaded, limit)
    run_id = str(runtime.flow_run.id or "local")
    cfg = loaded.config
    job, start = None, None
    try:
        plan = plan_shards(prepared)  # before any server starts: input errors surface in seconds
        gpu_plan = plan_for(cfg, gpus)
        ui.gpu_plan(cfg, gpu_plan)
        waves = gpu_plan.waves
        TRACKER.reset([s.name for s in cfg.stages], plan.rows, len(plan.shards) * len(waves))
        models: dict = {}
        ids = list(range(len(plan.shards)))
        for k, wave in enumerate(waves):
            names = [cfg.stages[i].name for i in wave.stages]
            last = k == len(waves) - 1
            label = f"wave {k + 1} of {len(waves)} ({', '.join(names)}): " if len(waves) > 1 else ""
            known = None if last else pipeline.finished_wave(prepared, len(ids), k)
            if known is not None:
                logger.info("%severy shard finished in an earlier attempt; its servers are not started", label)
                models.update(known)
                continue
            used = {cfg.stages[i].model for i in wave.stages}
            with tags(*pipeline.run_tags(cfg)), open_models(loaded, only=used, gpus=gpus, wave=k) as (up, warnings):
                for w in warnings:
                    logger.warning(w)
                models.update(up)
                if not last:
                    pipeline.save_wave_models(prepared, k, up)
                job = pipeline.make_job(prepared, run_id, dict(models), retry_truncated, k, len(waves),
                                        tuple(wave.stages))
                if start is None:
                    start = pipeline.lineage_start(prepared, job, run_id, loaded.params.get("date"))
                    logger.info("%s: %d rows in %d shards; staging %s", cfg.name, plan.rows, len(plan.shards),
                                prepared.staging.root)
                if label:
                    logger.info("%sstarting on %d shards", label, len(ids))
                progress = ui.progress_start(cfg.name, len(ids), label)
                shards = run_shards.with_options(task_runner=task_runner(cfg, runner))
                stats = shards(job, ids, "+".join(names), progress)
        manifest = commit_output(prepared, job, plan, stats, run_id, started, start)
    except BaseException as e:
        pipeline.lineage_fail(prepared, job, run_id, start, e)
        raise
    ui.publish_run(manifest)
    logger.info("committed %d rows to %s", manifest["rows"], manifest["output"]["uri"])
    return manifest


if __name__ == "__main__":
    import sys

    run_pipeline(sys.argv[1])
