"""Process one shard: read its rows, run its stages on them (``modelyard.rows``), write the result.

The shard's files are written first and its ``done.json`` record last, so a shard is either
complete or absent. With GPU waves, every wave but the last leaves the rows so far in a wave file.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from modelyard import lifecycle, parquet
from modelyard.asking import Context
from modelyard.client import Dispatcher
from modelyard.failpoints import failpoint
from modelyard.job import CacheMiss, Job, ModelRuntime
from modelyard.lineage import ERRORS_SCHEMA, lineage_type
from modelyard.progress import TRACKER, Tracker
from modelyard.rows import run_rows
from modelyard.staging import Staging, tmp_name
from modelyard.stats import shard_stats
from modelyard.vectors import Vector

__all__ = ["CacheMiss", "Job", "ModelRuntime", "run_from_cache", "run_shard"]


def run_shard(job: Job, shard_id: int, tracker: Tracker = TRACKER) -> dict[str, Any] | None:
    """Run one shard to completion unless it is already done; returns its statistics.

    With GPU waves, every wave but the last leaves the shard's rows so far (outputs, lineage,
    errors) in a wave file that the next wave starts from; the last writes the result files.
    A cache-only job returns None for a shard that needs a request the cache cannot answer, and
    writes nothing for it.
    """
    if job.cache_only:
        try:
            return _run_shard(job, shard_id, Tracker(), tracker)
        except CacheMiss:
            return None
    return _run_shard(job, shard_id, tracker, tracker)


def run_from_cache(job: Job, shard_ids: list[int], tracker: Tracker = TRACKER) -> dict[int, dict[str, Any]]:
    """The shards the request cache answers whole, in order, stopping at the first it cannot: an
    unchanged re-run finishes without a server, and a run with new work starts them at once."""
    done = {}
    for i in shard_ids:
        stats = run_shard(job, i, tracker)
        if stats is None:
            break
        done[i] = stats
    return done


def _run_shard(job: Job, shard_id: int, tracker: Tracker, done_tracker: Tracker) -> dict[str, Any]:
    """``tracker`` counts requests as they are answered; ``done_tracker`` the shard when it is written."""
    staging = job.staging()
    done = staging.stats_shard(shard_id) if job.last_wave else staging.wave_shard(shard_id, job.wave)
    active = job.active()
    if staging.fs.exists(done):
        stats = staging.read_json(done)
        if not job.last_wave:
            stats = stats["stats"]
        _add_done(job, stats, done_tracker)
        return stats
    lifecycle.check()  # queued before a signal, reached after it: not started (a re-run resumes it)
    with staging.fs.open(staging.input_shard(shard_id), "rb") as fh:
        table = pq.read_table(fh)
    rows = table.drop_columns(["_source"]).to_pylist()
    prior = staging.read_json(staging.wave_shard(shard_id, job.wave - 1))["results"] if job.wave else None
    dispatcher = Dispatcher.get()
    t0 = time.time()
    results = dispatcher.run(_run(dispatcher, job, active, rows, tracker, prior))
    if not job.last_wave:
        stats = {"shard": shard_id, "rows": table.num_rows, "started": t0, "finished": time.time(),
                 "stages": shard_stats(active, results)}
        staging.write_json(done, {"stats": stats, "results": results}, indent=None)
        _counted(job, stats, tracker, done_tracker)
        return stats
    stages = job.stages()
    out, errors = _tables(job, stages, table, results)
    _write(staging, staging.result_shard(shard_id), out)
    _write(staging, staging.errors_shard(shard_id), errors)
    stats = {"shard": shard_id, "rows": table.num_rows, "errors": errors.num_rows, "started": t0,
             "finished": time.time(), "stages": shard_stats(stages, results)}
    failpoint("shard-written")
    staging.write_json(done, stats)
    _counted(job, stats, tracker, done_tracker)
    failpoint("shard-done")
    return stats


def _counted(job: Job, stats: dict, tracker: Tracker, done_tracker: Tracker) -> None:
    if done_tracker is tracker:  # its requests were counted as they were answered
        tracker.shard_done()
    else:  # a cache-only pass counts a shard once it is whole
        _add_done(job, stats, done_tracker)


def _add_done(job: Job, stats: dict, tracker: Tracker) -> None:
    """A whole shard's counts for this pass's stages, at once."""
    for st in job.active():
        tracker.add(st.name, stats["stages"][st.name])
    tracker.shard_done()


def _write(staging: Staging, path: str, table: pa.Table) -> None:
    fs = staging.fs
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = tmp_name(path)
    with fs.open(tmp, "wb") as fh:
        parquet.write_table(table, fh, parquet.STAGING_COMPRESSION)
    fs.mv(tmp, path)


async def _run(dispatcher: Dispatcher, job: Job, stages, rows: list[dict], tracker: Tracker, prior):
    ctx = Context(dispatcher.client, job.pools(), job.cache(), job)
    return await run_rows(ctx, stages, rows, tracker, prior)


def _tables(job: Job, stages: list, table: pa.Table, results: list) -> tuple[pa.Table, pa.Table]:
    schema = job.schema(table.schema)
    cols: dict[str, Any] = {n: table.column(n) for n in table.schema.names}
    for st in stages:
        values = [r[0][st.cfg.output] for r in results]
        if pa.types.is_dictionary(st.arrow_type):
            cols[st.cfg.output] = pa.array(values, pa.string()).dictionary_encode()
        elif pa.types.is_fixed_size_list(st.arrow_type):
            cols[st.cfg.output] = _vectors(values, st.arrow_type)
        else:
            cols[st.cfg.output] = pa.array(values, st.arrow_type)
    n = table.num_rows
    cols["_run_id"] = pa.array([job.run_id] * n, pa.string())
    ltype = lineage_type({s.name: s.strategy.lineage_type for s in stages})
    cols["_lineage"] = pa.array([r[1] for r in results], ltype)
    out = pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)
    keys = table.column("_row_key").to_pylist()
    sources = table.column("_source").to_pylist()
    err_rows = [
        {**e, "_row_key": keys[i], "_source": sources[i], "_run_id": job.run_id}
        for i, r in enumerate(results) for e in r[2]
    ]
    return out, pa.Table.from_pylist(err_rows, schema=ERRORS_SCHEMA)


def _vectors(values: list, typ: pa.FixedSizeListType) -> pa.Array:
    """Embeddings as a fixed-size list column, through one float32 block: a ``Vector``'s bytes as
    they are, a float list converted (a list of Python lists into pa.array costs several times as
    much per row); a missing value is a null."""
    import numpy as np

    size = typ.list_size
    blank = bytes(4 * size)
    parts, missing = [], []
    for v in values:
        if v is None:
            parts.append(blank)
            missing.append(True)
            continue
        if len(v) != size:
            raise ValueError(f"an embedding of {len(v)} values in a column of {size}")
        parts.append(v if type(v) is Vector else np.asarray(v, dtype=np.float32).tobytes())
        missing.append(False)
    block = np.frombuffer(b"".join(parts), dtype=np.float32)
    mask = pa.array(missing) if any(missing) else None
    return pa.FixedSizeListArray.from_arrays(pa.array(block, pa.float32()), type=typ, mask=mask)
