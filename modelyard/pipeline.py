"""The plain steps of a run that the Prefect flow strings together: prepare, then commit.

Kept free of Prefect so that each step can be tested by itself; ``flows/pipeline.py`` only adds
tasks, names, retries and fan-out around them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import logging
import os
import posixpath
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from modelyard import __version__, telemetry
from modelyard.charts import write_report
from modelyard.commit import merge, swap_in, target_uri, write_manifest
from fsspec.core import url_to_fs

from modelyard.config import LoadedConfig, PipelineConfig, load_config
from modelyard.cost import run_cost
from modelyard.failpoints import failpoint
from modelyard.plan import Plan, build_plan, input_files
from modelyard.serving import home
from modelyard.shard import Job, ModelRuntime
from modelyard.staging import Staging, job_key
from modelyard.stats import total
from modelyard.validate import check

log = logging.getLogger("modelyard")


@dataclass
class Prepared:
    loaded: LoadedConfig
    key: str
    staging: Staging
    files: tuple
    limit: int | None


def run_date(scheduled: dt.datetime | None, timezone: str = "UTC") -> str:
    """The partition date of a run: its scheduled start (now, for an ad-hoc run) in ``timezone``."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        from modelyard.errors import UserError

        raise UserError(f"timezone {timezone!r} is not a known IANA time zone") from None
    t = scheduled or dt.datetime.now(dt.timezone.utc)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(tz).date().isoformat()


def job_name(config: str) -> str:
    """The config's `name`, read cheaply (flow-run names are computed before the flow body)."""
    import yaml

    try:
        name = yaml.safe_load(open(config))["name"]
        return str(name)
    except Exception:
        return posixpath.basename(str(config)).rsplit(".", 1)[0]


def run_tags(cfg) -> list[str]:
    """Tags of the flow run (not its tasks: see tasks.ui.tag_run): job, every stage, every model."""
    return [f"job:{cfg.name}", *(f"stage:{s.name}" for s in cfg.stages),
            *sorted({f"model:{m.model}" for m in cfg.models.values()})]


def load(config: str, params: dict[str, str] | None, output: str | None, scheduled: dt.datetime | None = None,
         timezone: str = "UTC") -> LoadedConfig:
    """Load a config; ``date`` defaults to the (scheduled) run date, ``--output`` overrides output.uri."""
    params = dict(params or {})
    if "date" not in params:
        params["date"] = run_date(scheduled, timezone)
    loaded = load_config(config, params)
    if output:
        loaded.config.output.uri = output
    cfg = loaded.config
    # absolute local paths: shard tasks may run in other processes (Ray, Dask, a worker) with another cwd
    cfg.input.uri, cfg.output.uri = _absolute(cfg.input.uri), _absolute(cfg.output.uri)
    return loaded


def _absolute(uri: str) -> str:
    if "://" in uri:
        return uri
    return os.path.abspath(uri) + ("/" if uri.endswith("/") else "")


def prepare(loaded: LoadedConfig, limit: int | None = None) -> Prepared:
    """Check the config against the input (no model called) and find the job's staging folder."""
    check(loaded, raise_on_error=True)
    files = input_files(loaded.config.input)
    key = job_key(loaded.sha256, loaded.params, files[2], limit)
    return Prepared(loaded, key, Staging.for_job(loaded.config.output.uri, key), files, limit)


def plan(p: Prepared) -> Plan:
    """The job's shards: found from an earlier attempt of the same job, or built now."""
    existing = Plan.load(p.staging)
    if existing is not None:
        log.info("resuming job %s: %d shards planned earlier", p.key, len(existing.shards))
        return existing
    return build_plan(p.loaded.config.input, p.loaded.config.shard_rows, p.staging, p.limit, p.files)


def check_retry(loaded: LoadedConfig, *, truncated: bool, console=None) -> dict:
    """--retry-errors / --retry-truncated: there must be a last output, and a cache to serve the rest."""
    from modelyard.commit import read_manifest, target_uri
    from modelyard.errors import UserError

    cfg = loaded.config
    flag = "--retry-truncated" if truncated else "--retry-errors"
    target = target_uri(cfg.output.uri, cfg.output.partition)
    manifest = read_manifest(target)
    if manifest is None:
        raise UserError(f"{flag}: there is no committed output at {target} to retry")
    if not cfg.cache.enabled:
        raise UserError(f"{loaded.path}: {flag} needs the request cache (cache.enabled: true) to serve the "
                        "rows that did not fail")
    if console is not None:
        console.print(f"last output {target}: {manifest['errors']['rows']} stage error(s)"
                      + ("; truncated replies are re-sent too" if truncated else "")
                      + "; everything else comes from the request cache")
    return manifest


def cache_path(cfg) -> str | None:
    """The request cache's file: config, $MODELYARD_CACHE, or beside a local output."""
    if not cfg.cache.enabled:
        return None
    if cfg.cache.path:
        return cfg.cache.path
    if os.environ.get("MODELYARD_CACHE"):
        return os.environ["MODELYARD_CACHE"]
    fs, root = url_to_fs(cfg.output.uri)
    root = root.rstrip("/")
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return posixpath.join(posixpath.dirname(root), "_modelyard", posixpath.basename(root), "cache.sqlite")
    return str(home() / "cache" / f"{cfg.name}.sqlite")  # SQLite needs a local file


def make_job(p: Prepared, run_id: str, models: dict[str, ModelRuntime], retry_truncated: bool = False,
             wave: int = 0, waves: int = 1, wave_stages: tuple[int, ...] | None = None,
             cache_only: bool = False, retry_errors: bool = False, wave_tiers: dict | None = None,
             thresholds: dict[str, list] | None = None) -> Job:
    cfg = p.loaded.config
    return Job(config=cfg, base_dir=str(p.loaded.base_dir), job_key=p.key, output_root=cfg.output.uri,
               run_id=run_id, models=models, cache_path=cache_path(cfg),
               cache_nondeterministic=cfg.cache.nondeterministic, retry_truncated=retry_truncated,
               retry_errors=retry_errors or retry_truncated, wave=wave, waves=waves, wave_stages=wave_stages,
               cache_only=cache_only, thresholds=dict(thresholds or {}), wave_tiers=dict(wave_tiers or {}) or None)


def calibrate_wave(job: Job, plan: Plan) -> dict[str, dict]:
    """Fit the `auto` thresholds of the wave's cascade stages; returns each stage's calibration."""
    from modelyard.calibrate import calibrate

    out = {}
    for i, st in enumerate(job.stages()):
        if st.cfg.calibrate is not None and st in job.active():
            out[st.name] = calibrate(job, i, plan.shards)
            log.info("stage %s: calibrated on %d rows: thresholds %s, agreement with the last tier %s",
                     st.name, out[st.name]["rows"], out[st.name]["thresholds"], out[st.name]["agreement"])
    return out


def cached_models(loaded: LoadedConfig, names: set[str]) -> dict[str, ModelRuntime] | None:
    """The managed models ``names`` as an earlier run's servers described them, if the request
    cache knows them all (then a cache-only pass can try the shards before any server starts)."""
    from modelyard.cache import open_cache
    from modelyard.models import cached_runtimes

    path = cache_path(loaded.config)
    return cached_runtimes(loaded, open_cache(path), names) if path else None


def remember_models(loaded: LoadedConfig, models: dict[str, ModelRuntime]) -> None:
    from modelyard.cache import open_cache
    from modelyard.models import remember_runtimes

    path = cache_path(loaded.config)
    if path:
        remember_runtimes(loaded, open_cache(path), models)


def finished_wave(p: Prepared, shards: int, wave: int) -> dict[str, ModelRuntime] | None:
    """The models of a GPU wave (not the last) whose every shard an earlier attempt finished;
    None if there is work left in it. A resumed run skips such a wave without starting its servers."""
    st = p.staging
    if not st.fs.exists(st.wave_models(wave)) or not all(st.fs.exists(st.wave_shard(i, wave)) for i in range(shards)):
        return None
    return {n: ModelRuntime(**d) for n, d in st.read_json(st.wave_models(wave)).items()}


def save_wave_models(p: Prepared, wave: int, models: dict[str, ModelRuntime]) -> None:
    p.staging.write_json(p.staging.wave_models(wave), {n: dataclasses.asdict(rt) for n, rt in models.items()})


def input_schema(p: Prepared):
    import pyarrow.parquet as pq

    with p.staging.fs.open(p.staging.input_shard(0), "rb") as fh:
        return pq.read_schema(fh)


def lineage_head(p: Prepared, job: Job, run_id: str) -> dict[str, Any]:
    cfg = p.loaded.config
    return {**lineage_summary(p, job, run_id), "namespace": cfg.lineage.openlineage.namespace,
            "input": {"uri": cfg.input.uri}, "output": {"uri": target_uri(cfg.output.uri, cfg.output.partition)}}


def job_lineage_log(p: Prepared) -> tuple:
    """Every run's events, committed or failed, also go to <output parent>/_modelyard/<name>/openlineage.jsonl."""
    return p.staging.fs, posixpath.join(posixpath.dirname(p.staging.root), "openlineage.jsonl")


def load_lineage_client(cfg: PipelineConfig) -> None:
    """Import the OpenLineage client in a thread of its own, if the run emits lineage. The import takes
    0.2 s of CPU here, 0.4 s beside a starting server; the flow calls this before it waits for its
    servers, so that ``lineage_start`` does not pay it between their start and the first request.
    Python's import lock makes an early ``lineage_start`` wait for the import under way."""
    if cfg.lineage.openlineage.transport != "none" and "modelyard.openlineage" not in sys.modules:
        threading.Thread(target=_import_lineage, name="modelyard-lineage-import", daemon=True).start()


def _import_lineage() -> None:
    try:
        importlib.import_module("modelyard.openlineage")
    except Exception as e:  # noqa: BLE001 - lineage_start imports it again and says what is wrong
        log.debug("lineage: the early import failed: %s", e)


def lineage_start(p: Prepared, job: Job, run_id: str, nominal_time: str | None) -> dict:
    """The START event: sent now over http; kept for the committed output's _lineage/ otherwise."""
    from modelyard.openlineage import emit, start_event

    head = lineage_head(p, job, run_id)
    event = start_event(head, input_schema(p), head["output"]["uri"], __version__, nominal_time)
    cfg = p.loaded.config.lineage.openlineage
    if cfg.transport == "http":
        emit([event], cfg)
    return event


def lineage_fail(p: Prepared, job: Job | None, run_id: str, start: dict | None, error: BaseException) -> None:
    """A FAIL event (after its START) into the job's lineage log, or over http."""
    from modelyard.openlineage import emit, fail_event

    cfg = p.loaded.config.lineage.openlineage
    if cfg.transport == "none":
        return
    try:
        if job is not None:
            head = lineage_head(p, job, run_id)
        else:  # failed before the models were up: what is known of the run
            c = p.loaded.config
            head = {"format": "modelyard.manifest/1", "modelyard_version": __version__, "run_id": run_id,
                    "job": c.name, "job_key": p.key, "namespace": cfg.namespace, "params": p.loaded.params,
                    "config": {"path": p.loaded.path, "sha256": p.loaded.sha256, "text": p.loaded.text},
                    "models": {}, "stages": {}, "input": {"uri": c.input.uri},
                    "output": {"uri": target_uri(c.output.uri, c.output.partition)}}
        schema = input_schema(p) if p.staging.fs.exists(p.staging.input_shard(0)) else None
        event = fail_event(head, schema, f"{type(error).__name__}: {error}")
    except Exception as e:  # lineage must never hide the run's own error
        log.warning("lineage: could not build the FAIL event: %s", e)
        return
    events = [start, event] if start and cfg.transport == "file" else [event]
    emit(events, cfg, job_lineage_log(p))


def commit(p: Prepared, job: Job, plan: Plan, shard_stats: list[dict], run_id: str, started: float,
           start_event: dict | None = None, gpu_seconds: dict[str, float] | None = None,
           calibrations: dict[str, dict] | None = None) -> dict[str, Any]:
    """Merge the shards, write the manifest last, and swap the output into place."""
    cfg = p.loaded.config
    stages = job.stages()
    in_schema = input_schema(p)
    schema = job.schema(in_schema)
    lineage_meta = lineage_summary(p, job, run_id)
    merged = merge(p.staging, list(range(len(plan.shards))), schema, [s.name for s in stages],
                   target_file_mb=cfg.output.target_file_mb, compression=cfg.output.compression,
                   lineage_meta=lineage_meta)
    t_first = min((s["started"] for s in shard_stats), default=started)
    t_last = max((s["finished"] for s in shard_stats), default=time.time())
    wall = max(t_last - t_first, 1e-9)
    stage_stats = {}
    for st in stages:
        agg = total([s["stages"][st.name] for s in shard_stats])
        ran = agg["rows"] - agg["skipped"]
        stage_stats[st.name] = {
            **lineage_meta["stages"][st.name], **agg, "ran": ran, **merged["latency"][st.name],
            "rows_per_s": round(ran / wall, 3),
            "tokens_per_s": round((agg["prompt_tokens"] + agg["completion_tokens"]) / wall, 3),
        }
        if st.cfg.calibrate is not None:
            stage_stats[st.name]["calibration"] = (calibrations or {}).get(st.name)
    cost = run_cost(stage_stats, {n: m.price for n, m in cfg.models.items()}, gpu_seconds or {})
    target = target_uri(cfg.output.uri, cfg.output.partition)
    manifest = {
        **lineage_meta,
        "rows": plan.rows,
        "output": {"uri": target, "dataset": cfg.output.uri, "partition": cfg.output.partition},
        "input": {"uri": cfg.input.uri, "format": cfg.input.format, "key": cfg.input.key,
                  "fingerprint": plan.fingerprint, "files": plan.files, "rows": plan.rows,
                  "shards": len(plan.shards), "shard_rows": cfg.shard_rows},
        "stages": stage_stats,
        "files": merged["files"],
        "errors": merged["errors"],
        **({"cost": cost} if cost else {}),
        "timing": {"started": _iso(started), "committed": _iso(time.time()), "wall_s": round(time.time() - started, 3),
                   "processing_s": round(wall, 3)},
        "telemetry": telemetry.snapshot(),
    }
    _lineage_complete(p, manifest, in_schema, schema, start_event)
    write_manifest(p.staging, manifest)
    failpoint("before-swap")
    swap_in(p.staging, target)
    p.staging.fs.rm(p.staging.root, recursive=True)
    write_report(target, manifest)  # after the commit point: pictures never delay (or fail) a commit
    return manifest


def _lineage_complete(p: Prepared, manifest: dict, in_schema, schema, start: dict | None) -> None:
    from modelyard.openlineage import complete_event, emit, write_events

    cfg = p.loaded.config.lineage.openlineage
    if cfg.transport == "none":
        return
    try:
        event = complete_event({**manifest, "namespace": cfg.namespace}, in_schema, schema)
    except Exception as e:  # lineage must never fail a run
        log.warning("lineage: could not build the COMPLETE event: %s", e)
        return
    events = [e for e in (start, event) if e]
    if cfg.transport == "file":
        write_events(p.staging, events)
        emit(events, cfg, job_lineage_log(p))
    else:
        emit([event], cfg)


def lineage_summary(p: Prepared, job: Job, run_id: str) -> dict[str, Any]:
    """What every part's key-value metadata and the manifest say about the run's lineage."""
    loaded = p.loaded
    models = {n: {"model": rt.model_id, "served_name": rt.served_name, "revision": rt.revision,
                  "engine_version": rt.engine_version, "task": loaded.config.models[n].task,
                  "managed": loaded.config.models[n].managed,
                  "endpoints": [] if loaded.config.models[n].managed else rt.endpoints,
                  "dimensions": rt.dimensions}
              for n, rt in job.models.items()}
    stages = {}
    for st in job.stages():
        stages[st.name] = {
            **st.strategy.describe(), "model": st.cfg.models_used[0], "models": st.cfg.models_used,
            "output": st.cfg.output, "kind": "embed" if st.embed else (st.cfg.constraint or "text"),
            "when": st.cfg.when, "prompt_sha256": st.prompt_sha256, "prompt": st.source,
            "system": st.system.source if st.system else None, "params_sha256": st.params_sha256,
            "params": st.cfg.params, "constraint": st.constraint_body(), "reads": sorted(st.reads),
        }
    return {
        "format": "modelyard.manifest/1", "modelyard_version": __version__, "run_id": run_id,
        "job": loaded.config.name, "job_key": p.key,
        "config": {"path": loaded.path, "sha256": loaded.sha256, "text": loaded.text},
        "params": loaded.params, "models": models, "stages": stages,
    }


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()
