"""Process one shard: read its rows, run every stage on every row, write the result.

Rows move through the stages independently (row A can be in stage 2 while row B waits on stage
1), so stages on different models overlap. A row whose stage fails becomes an error row; the
shard never crashes for one row. The shard's files are written first and its ``done.json``
record last, so a shard is either complete or absent.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from modelyard.cache import RequestCache, deterministic, open_cache, request_key
from modelyard.client import Dispatcher, Pool, RequestFailed, post
from modelyard.config import PipelineConfig
from modelyard.failpoints import failpoint
from modelyard.lineage import ERRORS_SCHEMA, lineage_type, new_record, output_schema
from modelyard.progress import TRACKER, Tracker
from modelyard.stages import OutputInvalid, Stage
from modelyard.staging import Staging, tmp_name
from modelyard.templates import RenderError


@dataclass
class ModelRuntime:
    """What a worker needs to reach one model: picklable, no secrets (keys stay in the env)."""

    name: str
    model_id: str
    served_name: str
    endpoints: list[str]
    revision: str
    engine_version: str
    dimensions: int | None = None


class CacheMiss(Exception):
    """A request of a cache-only pass that the cache cannot answer."""


@dataclass
class Job:
    """Everything a shard task needs, passed by value to whichever worker runs it."""

    config: PipelineConfig
    base_dir: str
    job_key: str
    output_root: str
    run_id: str
    models: dict[str, ModelRuntime]
    cache_path: str | None = None
    cache_nondeterministic: bool = False
    retry_truncated: bool = False
    wave: int = 0  # which GPU wave this pass runs (see modelyard.planner); most runs have one
    waves: int = 1
    wave_stages: tuple[int, ...] | None = None  # the stages of this wave; None: every stage
    cache_only: bool = False  # no server is up: a shard the cache cannot answer whole is left for later
    _stages: list[Stage] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Compiled stages stay behind when a job travels to a worker; it compiles its own."""
        return {**self.__dict__, "_stages": None}

    def staging(self) -> Staging:
        return Staging.for_job(self.output_root, self.job_key)

    def stages(self) -> list[Stage]:
        """Every stage of the config, compiled. A stage of a later wave, whose model is not up yet,
        compiles with the configured model name: it is described (lineage) but sends nothing."""
        if self._stages is None:
            self._stages = []
            for s in self.config.stages:
                rt = self.models.get(s.model)
                self._stages.append(Stage(s, self.config.models[s.model], rt.served_name if rt else s.model,
                                          Path(self.base_dir), rt.dimensions if rt else None))
        return self._stages

    def active(self) -> list[Stage]:
        """The stages this pass runs: all, or those of its wave."""
        st = self.stages()
        return st if self.wave_stages is None else [st[i] for i in self.wave_stages]

    @property
    def last_wave(self) -> bool:
        return self.wave == self.waves - 1

    def cache(self) -> RequestCache | None:
        return open_cache(self.cache_path) if self.cache_path else None

    def pools(self) -> dict[str, Pool]:
        d = Dispatcher.get()
        out = {}
        for name in {st.cfg.model for st in self.active()}:
            rt = self.models[name]
            m = self.config.models[name]
            out[name] = d.pool(name, rt.endpoints, m.in_flight, m.api_key_env, m.timeout, m.retries)
        return out

    def schema(self, input_schema: pa.Schema) -> pa.Schema:
        st = self.stages()
        return output_schema(input_schema, [(s.cfg.output, s.arrow_type) for s in st], [s.name for s in st])


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
    with staging.fs.open(staging.input_shard(shard_id), "rb") as fh:
        table = pq.read_table(fh)
    rows = table.drop_columns(["_source"]).to_pylist()
    prior = staging.read_json(staging.wave_shard(shard_id, job.wave - 1))["results"] if job.wave else None
    pools = job.pools()
    dispatcher = Dispatcher.get()
    t0 = time.time()
    results = dispatcher.run(_run_rows(dispatcher, active, pools, job, rows, tracker, prior))
    if not job.last_wave:
        stats = {"shard": shard_id, "rows": table.num_rows, "started": t0, "finished": time.time(),
                 "stages": _shard_stats(active, results)}
        staging.write_json(done, {"stats": stats, "results": results}, indent=None)
        _counted(job, stats, tracker, done_tracker)
        return stats
    stages = job.stages()
    out, errors = _tables(job, stages, table, results)
    _write(staging, staging.result_shard(shard_id), out)
    _write(staging, staging.errors_shard(shard_id), errors)
    stats = {"shard": shard_id, "rows": table.num_rows, "errors": errors.num_rows, "started": t0,
             "finished": time.time(), "stages": _shard_stats(stages, results)}
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
        pq.write_table(table, fh, compression="zstd")
    fs.mv(tmp, path)


async def _run_rows(dispatcher: Dispatcher, stages: list[Stage], pools: dict[str, Pool], job: Job,
                    rows: list[dict], tracker: Tracker, prior: list | None = None) -> list[tuple[dict, dict, list]]:
    """Every row of the shard at once; the pools bound what is in flight. Results in row order.

    ``prior``: each row's (outputs, lineage, errors) from the stages of earlier waves."""
    client = dispatcher.client
    results: list = [None] * len(rows)

    async def one(i: int) -> None:
        results[i] = await _run_row(client, stages, pools, job, rows[i], tracker, prior[i] if prior else None)

    if job.cache_only:  # nothing to wait for: one row after another, stopping at the first miss
        for i in range(len(rows)):
            await one(i)
        return results
    # Requests leave in the order the rows start (the pools queue FIFO): rows whose first prompts
    # share a prefix go together, so the engine's prefix cache serves the shared part.
    await asyncio.gather(*(one(i) for i in launch_order(stages[0], rows)))
    return results


def launch_order(st: Stage, rows: list[dict]) -> list[int]:
    """Row indices sorted by the first stage's rendered prompt (input order where that is not cheap)."""
    n = len(rows)
    if n < 3 or st.embed or st.condition is not None:
        return list(range(n))
    keys = []
    for row in rows:
        try:
            keys.append((st.system.render(row) if st.system else "") + "\0" + st.template.render(row))
        except Exception:  # noqa: BLE001 - the row's own run reports it
            keys.append("")
    return sorted(range(n), key=keys.__getitem__)


async def _run_row(client, stages: list[Stage], pools: dict[str, Pool], job: Job, row: dict,
                   tracker: Tracker, prior: tuple | list | None = None) -> tuple[dict, dict, list]:
    """The stages on one row, after those of ``prior``: (outputs, lineage by stage, error records)."""
    outputs: dict[str, Any] = {}
    lineage: dict[str, dict] = {}
    errors: list[dict] = []
    failed: set[str] = set()  # outputs that failed on this row
    skipped: set[str] = set()  # outputs of stages skipped on this row
    if prior:
        outputs, lineage, errors = dict(prior[0]), dict(prior[1]), list(prior[2])
        by_name = {s.name: s.output for s in job.config.stages}
        for name, rec in lineage.items():
            out = by_name[name]
            if rec["error"]:
                failed.add(out)
            elif rec["skipped"]:
                skipped.add(out)
            else:
                row[out] = outputs[out]
    cache = job.cache()
    for st in stages:
        rt = job.models[st.cfg.model]
        rec = lineage[st.name] = new_record(st, rt)
        out = st.cfg.output
        outputs[out] = None
        upstream = st.reads & failed
        if upstream:
            rec["error"] = f"not run: upstream output(s) {', '.join(sorted(upstream))} failed"
            failed.add(out)
            tracker.record(st.name, error=True)
            continue
        try:
            if st.condition is not None and not st.condition(row):
                rec["skipped"] = True
            elif st.prompt_reads & skipped:
                rec["skipped"] = True  # it reads the output of a stage skipped on this row
            else:
                nulls = sorted(v for v in st.prompt_reads if v in row and row[v] is None)
                if nulls:
                    raise RenderError(f"column(s) {', '.join(nulls)} are null on this row")
                path, body = st.request(row)
                if not _has_text(body):
                    raise RenderError("the rendered prompt is empty")
        except RenderError as e:
            _fail(rec, errors, st, str(e), None)
            failed.add(out)
            tracker.record(st.name, error=True)
            continue
        if rec["skipped"]:
            skipped.add(out)
            tracker.record(st.name, skipped=True)
            continue
        raw = None
        key = None
        try:
            reply_body = None
            if cache is not None and (job.cache_nondeterministic or deterministic(path, body)):
                key = request_key(rt.model_id, rt.revision, path, body)
                reply_body = cache.get(key, accept_truncated=not job.retry_truncated)
            if reply_body is not None:
                rec.update(cached=True, attempts=0, latency_ms=0.0, endpoint="cache")
            elif job.cache_only:
                raise CacheMiss(st.name)
            else:
                reply = await post(client, pools[st.cfg.model], path, body)
                rec.update(attempts=reply.attempts, latency_ms=round(reply.latency_ms, 3), endpoint=reply.endpoint)
                reply_body = reply.body
            try:
                value, facts = st.parse(reply_body)
            except OutputInvalid as e:
                facts, raw = _facts(reply_body), e.raw
                rec.update(facts)
                raise
            except (KeyError, IndexError, TypeError) as e:
                raise OutputInvalid(f"malformed reply from the server: {type(e).__name__}: {e}",
                                    str(reply_body)[:2000]) from None
            rec.update(facts)
            outputs[out] = row[out] = value
            if key is not None and not rec["cached"]:
                cache.put(key, rt.model_id, rt.revision, path, reply_body, rec["finish_reason"])
            tracker.record(st.name, cached=rec["cached"], prompt_tokens=rec["prompt_tokens"],
                           completion_tokens=rec["completion_tokens"])
            failpoint(f"reply:{st.name}")
        except RequestFailed as e:
            rec["attempts"] = e.attempts
            _fail(rec, errors, st, explain(str(e)), None)
            failed.add(out)
            tracker.record(st.name, error=True)
        except OutputInvalid as e:
            _fail(rec, errors, st, str(e), raw)
            failed.add(out)
            tracker.record(st.name, error=True, prompt_tokens=rec["prompt_tokens"],
                           completion_tokens=rec["completion_tokens"])
    return outputs, lineage, errors


def _has_text(body: dict) -> bool:
    if "messages" in body:
        return bool(body["messages"][-1]["content"].strip())
    return bool(str(body.get("prompt", body.get("input", ""))).strip())


_TOO_LONG = [
    re.compile(r"maximum context length is (?P<max>\d+) tokens\. However, your prompt contains "
               r"(?P<q>at least )?(?P<n>\d+) input tokens"),
    re.compile(r"maximum context length is (?P<max>\d+) tokens\. However, your prompt contains "
               r"(?P<n>\d+) characters"),
    re.compile(r"Input length \((?P<n>\d+)\) exceeds model's maximum context length \((?P<max>\d+)\)"),
    re.compile(r"maximum context length is (?P<max>\d+) tokens.*?(?:requested|contains) (?P<n>\d+) tokens"),
]


def explain(message: str) -> str:
    """A server's 'prompt too long' answer, said plainly; any other message as it is."""
    for i, rx in enumerate(_TOO_LONG):
        m = rx.search(message)
        if m:
            unit = "characters" if i == 1 else "tokens"
            return (f"too long: the prompt has {m.groupdict().get('q') or ''}{m['n']} {unit}, the model's context "
                    f"is {m['max']} tokens (max_model_len)")
    return message


def _facts(body: dict) -> dict:
    usage = body.get("usage") or {}
    ch = (body.get("choices") or [{}])[0]
    return {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "finish_reason": ch.get("finish_reason")}


def _fail(rec: dict, errors: list, st: Stage, message: str, raw: str | None) -> None:
    rec["error"] = message
    errors.append({"stage": st.name, "error": message, "raw": raw, "finish_reason": rec.get("finish_reason"),
                   "attempts": rec.get("attempts", 0)})


def _tables(job: Job, stages: list[Stage], table: pa.Table, results: list) -> tuple[pa.Table, pa.Table]:
    schema = job.schema(table.schema)
    cols: dict[str, Any] = {n: table.column(n) for n in table.schema.names}
    for st in stages:
        values = [r[0][st.cfg.output] for r in results]
        if pa.types.is_dictionary(st.arrow_type):
            cols[st.cfg.output] = pa.array(values, pa.string()).dictionary_encode()
        else:
            cols[st.cfg.output] = pa.array(values, st.arrow_type)
    n = table.num_rows
    cols["_run_id"] = pa.array([job.run_id] * n, pa.string())
    ltype = lineage_type([s.name for s in stages])
    cols["_lineage"] = pa.array([r[1] for r in results], ltype)
    out = pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)
    keys = table.column("_row_key").to_pylist()
    sources = table.column("_source").to_pylist()
    err_rows = [
        {**e, "_row_key": keys[i], "_source": sources[i], "_run_id": job.run_id}
        for i, r in enumerate(results) for e in r[2]
    ]
    return out, pa.Table.from_pylist(err_rows, schema=ERRORS_SCHEMA)


def _shard_stats(stages: list[Stage], results: list) -> dict[str, dict]:
    stats = {}
    for st in stages:
        recs = [r[1][st.name] for r in results]
        stats[st.name] = {
            "rows": len(recs),
            "skipped": sum(1 for x in recs if x["skipped"]),
            "errors": sum(1 for x in recs if x["error"]),
            "cached": sum(1 for x in recs if x["cached"]),
            "prompt_tokens": sum(x["prompt_tokens"] or 0 for x in recs),
            "completion_tokens": sum(x["completion_tokens"] or 0 for x in recs),
        }
    return stats
