"""The modelyard flow: plan shards, fan them out, commit one merged Parquet dataset.

    modelyard run configs/demo.yaml          # or: python -m flows.pipeline configs/demo.yaml

Every heavy step is plain Python in ``modelyard``; this file only says how Prefect runs it.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, runtime
from prefect.context import FlowRunContext
from prefect.states import Cancelled

from modelyard import lifecycle, pipeline, telemetry
from modelyard.charts import warm_up
from modelyard.cost import wave_gpu_seconds
from modelyard.models import open_models
from modelyard.planner import plan_for, wave_models
from modelyard.progress import TRACKER
from tasks import ui
from flows.shards import run_shards
from tasks.runners import task_runner
from tasks.shards import answer_from_cache, calibrate_cascades, commit_output, plan_shards


def _run_name() -> str:
    """<job>-<partition date>: the config's name, the date parameter or the scheduled date."""
    p = runtime.flow_run.parameters
    job = pipeline.job_name(p.get("config", "modelyard"))
    date = (p.get("params") or {}).get("date") or pipeline.run_date(
        runtime.flow_run.scheduled_start_time, p.get("timezone") or "UTC")
    return f"{job}-{date}"


def _deployed() -> bool:
    """Whether this flow run belongs to a deployment, read from the run's context. Prefect 3.9's
    ``runtime.deployment.id`` looks for the id on the context itself, not on its flow run, so it
    asks the API for the flow run every time (two round trips of a run's fixed cost)."""
    ctx = FlowRunContext.get()
    return ctx is not None and ctx.flow_run is not None and ctx.flow_run.deployment_id is not None


@flow(name="modelyard-pipeline", flow_run_name=_run_name, log_prints=True, validate_parameters=True)
def run_pipeline(config: str, params: dict[str, str] | None = None, limit: int | None = None,
                 output: str | None = None, retry_truncated: bool = False, timezone: str = "UTC",
                 runner: str | None = None, gpus: int | None = None, retry_errors: bool = False,
                 gpu_memory: float | None = None) -> dict:
    """Run the pipeline of CONFIG once and return its manifest.

    `params` fill the config's {placeholders}; `date` defaults to the scheduled date of the run in
    `timezone`, so a scheduled or backfilled run reads and writes its own partition. `gpus` and
    `gpu_memory` (GiB per GPU) plan the managed servers for other GPUs than this machine's.
    SIGTERM (a cancel from Prefect, a worker or Kubernetes stopping it) stops its servers at once.
    """
    started = time.time()
    deployed = _deployed()
    # a deployment's flow process ends itself if unwinding takes more than a few seconds
    lifecycle.watch(deadline=deployed)
    lifecycle.flow_run_started(runtime.flow_run.id and str(runtime.flow_run.id), supervised=deployed)
    logger = get_run_logger()
    loaded = pipeline.load(config, params, output, runtime.flow_run.scheduled_start_time, timezone)
    prepared = pipeline.prepare(loaded, limit)
    run_id = str(runtime.flow_run.id or "local")
    cfg = loaded.config
    job, start = None, None
    stops: list = []  # the last wave's servers, stopping while the output is committed
    ui.tag_run(pipeline.run_tags(cfg))
    try:
        plan = plan_shards(prepared)  # before any server starts: input errors surface in seconds
        gpu_plan = plan_for(cfg, gpus, gpu_memory, loaded.base_dir)
        ui.gpu_plan(cfg, gpu_plan)
        waves = gpu_plan.waves
        TRACKER.reset([s.name for s in cfg.stages], plan.rows, len(plan.shards) * len(waves))
        telemetry.begin()
        models: dict = {}
        calibrations: dict = {}  # cascade stage -> its fitted thresholds
        gpu_seconds: dict = {}  # managed model -> devices x seconds its servers were up
        ids = list(range(len(plan.shards)))
        for k, wave in enumerate(waves):
            names = [cfg.stages[i].name for i in wave.stages]
            last = k == len(waves) - 1
            label = f"wave {k + 1} of {len(waves)} ({', '.join(names)}): " if len(waves) > 1 else ""
            telemetry.event("wave", wave=k + 1, waves=len(waves), stages=names)
            known = None if last else pipeline.finished_wave(prepared, len(ids), k)
            if known is not None:
                logger.info("%severy shard finished in an earlier attempt; its servers are not started", label)
                models.update(known)
                continue

            def new_job(up: dict, cache_only: bool = False):
                nonlocal start
                j = pipeline.make_job(prepared, run_id, {**models, **up}, retry_truncated, k, len(waves),
                                      tuple(wave.stages), cache_only, retry_errors, wave.tiers,
                                      {n: c["thresholds"] for n, c in calibrations.items()})
                if start is None:
                    start = pipeline.lineage_start(prepared, j, run_id, loaded.params.get("date"))
                    logger.info("%s: %d rows in %d shards; staging %s", cfg.name, plan.rows, len(ids),
                                prepared.staging.root)
                return j

            used = set(wave_models(cfg, wave))
            calibrated = any(cfg.stages[i].calibrate is not None for i in wave.stages)
            hit: dict = {}
            cached = pipeline.cached_models(loaded, used)
            if cached is not None:  # every model known: try the cache before starting any server
                fitted = calibrate_cascades(new_job(cached, cache_only=True), plan) if calibrated else {}
                if fitted is not None:
                    calibrations.update(fitted)
                    job = new_job(cached, cache_only=True)
                    hit = answer_from_cache(job, ids)
                logger.info("%s%d of %d shards answered by the request cache%s", label, len(hit), len(ids),
                            "" if len(hit) == len(ids) else "; starting the models for the rest")
            if len(hit) == len(ids):
                models.update(cached)
                if not last:
                    pipeline.save_wave_models(prepared, k, cached)
                stats = [hit[i] for i in ids]
                continue
            lifecycle.check()  # a signal during the cache pass or an earlier wave: start nothing more
            if any(cfg.models[m].managed for m in used):  # while the servers start:
                pipeline.load_lineage_client(cfg)  # the START event then goes out at once,
                warm_up()  # and the report after the commit draws at once
            up_since = time.time()
            with open_models(loaded, only=used, gpus=gpus, wave=k, gpu_memory=gpu_memory,
                             stops=stops if last else None) as (up, warnings):
                for w in warnings:
                    logger.warning(w)
                pipeline.remember_models(loaded, up)
                if not last:
                    pipeline.save_wave_models(prepared, k, up)
                if calibrated:  # `min_confidence: auto`: fit the thresholds before the shards
                    calibrations.update(calibrate_cascades(new_job(up), plan))
                job = new_job(up)
                models.update(up)
                if label:
                    logger.info("%sstarting on %d shards", label, len(ids))
                todo = [i for i in ids if i not in hit]
                progress = ui.progress_start(cfg.name, len(todo), label)
                shards = run_shards.with_options(task_runner=task_runner(cfg, runner))
                ran = dict(zip(todo, shards(job, todo, "+".join(names), progress)))
                stats = [hit.get(i) or ran[i] for i in ids]
            for m, sec in wave_gpu_seconds(wave.placements, time.time() - up_since).items():
                gpu_seconds[m] = gpu_seconds.get(m, 0.0) + sec
        manifest = commit_output(prepared, job, plan, stats, run_id, started, start, gpu_seconds, calibrations)
    except BaseException as e:
        telemetry.end()
        pipeline.lineage_fail(prepared, job, run_id, start, e)
        if lifecycle.cancelled():  # from Prefect's UI or API: the run ends Cancelled, not Failed
            return Cancelled(message=f"{lifecycle.STOPPING.reason}: nothing was committed; a re-run resumes")
        raise
    finally:
        for thread in stops:  # no server of the run outlives its flow run
            thread.join()
    ui.publish_run(manifest)
    logger.info("committed %d rows to %s", manifest["rows"], manifest["output"]["uri"])
    return manifest


if __name__ == "__main__":
    import sys

    run_pipeline(sys.argv[1])
