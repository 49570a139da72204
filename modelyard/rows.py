"""The stages on the rows of one shard: every row at once, each moving on its own.

Row A can be in stage 2 while row B waits on stage 1, so stages on different models overlap, and
so do the tiers of a cascade. For each stage a row is skipped (its `when` is false, or it reads
the output of a stage skipped on it), fails without a request (an upstream output failed, a null
column, an empty prompt), or gets its answer from the stage's strategy. A row that fails a stage
becomes an error row; the shard never crashes for one row.
"""

from __future__ import annotations

import asyncio
from typing import Any

from modelyard.asking import Context
from modelyard.lineage import new_record
from modelyard.progress import Tracker
from modelyard.stages import Stage
from modelyard.templates import RenderError

RowResult = tuple[dict, dict, list]  # (outputs, lineage by stage, error records)


async def run_rows(ctx: Context, stages: list[Stage], rows: list[dict], tracker: Tracker,
                   prior: list | None = None) -> list[RowResult]:
    """Every row of the shard; the pools bound what is in flight. Results in row order.

    ``prior``: each row's (outputs, lineage, errors) from the stages of earlier waves.
    The first stage's requests are rendered once for all rows (to order them, and to read the
    request cache's answers for all of them in one query); a fixed set of workers then takes the
    rows in that order, as many as the pools can have in flight (no task per row)."""
    results: list = [None] * len(rows)
    first = prerender(stages[0], rows) if prior is None else None
    if first is not None and ctx.cache is not None and stages[0].strategy.name == "single":
        ctx.prefetch(stages[0], stages[0].cfg.model, [r for r in first if isinstance(r, tuple)])
    order = launch_order(first) if first is not None and not ctx.job.cache_only else range(len(rows))

    async def one(i: int) -> None:
        ready = first[i] if first is not None else None
        results[i] = await run_row(ctx, stages, rows[i], tracker, prior[i] if prior else None, ready)

    if ctx.job.cache_only:  # nothing to wait for: one row after another, stopping at the first miss
        for i in order:
            await one(i)
        return results
    todo = iter(order)

    async def worker() -> None:
        for i in todo:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(min(len(rows), capacity(ctx, stages)))))
    return results


def capacity(ctx: Context, stages: list[Stage]) -> int:
    """Rows worth having in flight: every request slot of every model the stages ask filled (an
    embedding slot holds a batch of rows), and a few more to take a slot as one frees."""
    slots = 0
    for st in stages:
        for m in st.strategy.models:
            pool = ctx.pools.get(m)
            if pool is not None:
                slots += pool.limit * max(1, len(pool.endpoints)) * (st.cfg.batch_size if st.embed else 1)
    return max(8, slots + slots // 4)


def prerender(st: Stage, rows: list[dict]) -> list | None:
    """The first stage's (path, body) for every row, or the RenderError it raised, or None where
    the row does not reach the request (its `when`, a null column: the row's own run decides).
    None for a stage with a `when` (rendered row by row, after it)."""
    if st.condition is not None:
        return None
    out: list = []
    for row in rows:
        if any(row.get(v, 0) is None for v in st.prompt_reads):
            out.append(None)
            continue
        try:
            out.append(st.request(row))
        except RenderError as e:
            out.append(e)
    return out


def launch_order(first: list) -> list[int]:
    """Row indices sorted by their first prompt: requests leave in this order (the pools queue
    FIFO), so rows whose prompts share a prefix go together and the engine's prefix cache serves
    the shared part. Input order where there is nothing to sort by."""
    n = len(first)
    if n < 3:
        return list(range(n))
    keys = [_prompt(r) for r in first]
    if not any(keys):
        return list(range(n))
    return sorted(range(n), key=keys.__getitem__)


def _prompt(ready) -> str:
    if not isinstance(ready, tuple):
        return ""
    body = ready[1]
    if "messages" in body:
        messages = body["messages"]
        return messages[0]["content"] if len(messages) == 1 else "\0".join(m["content"] for m in messages)
    return "" if "input" in body else str(body.get("prompt", ""))


def _resume(job, prior) -> tuple[dict, dict, list, set, set, dict]:
    """A row's state after the stages of earlier waves."""
    outputs, lineage, errors = dict(prior[0]), dict(prior[1]), list(prior[2])
    failed, skipped, values = set(), set(), {}
    by_name = {s.name: s.output for s in job.config.stages}
    for name, rec in lineage.items():
        out = by_name[name]
        if rec.get("_pending") is not None:
            continue  # a cascade that a later wave's tiers finish
        if rec["error"]:
            failed.add(out)
        elif rec["skipped"]:
            skipped.add(out)
        else:
            values[out] = outputs[out]
    return outputs, lineage, errors, failed, skipped, values


async def run_row(ctx: Context, stages: list[Stage], row: dict, tracker: Tracker, prior=None,
                  ready=None) -> RowResult:
    """The stages on one row, after those of ``prior``: (outputs, lineage by stage, error records).
    ``ready``: the first stage's request, rendered already (or the RenderError it raised)."""
    job = ctx.job
    outputs: dict[str, Any] = {}
    lineage: dict[str, dict] = {}
    errors: list[dict] = []
    failed: set[str] = set()  # outputs that failed on this row
    skipped: set[str] = set()  # outputs of stages skipped on this row
    if prior:
        outputs, lineage, errors, failed, skipped, values = _resume(job, prior)
        row.update(values)
    for st in stages:
        resume = None
        if prior and st.name in lineage:
            resume = lineage[st.name] if lineage[st.name].get("_pending") is not None else None
            if resume is None:
                continue  # finished in an earlier wave (a cascade whose tiers the waves split)
        model = st.lead_model
        rec = lineage[st.name] = new_record(st, job.models[model] if model in job.models else _Unknown(model))
        if st.strategy.multi:
            rec.update(confidence=None, tier=None, tiers=None)
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
                if ready is not None and st is stages[0] and type(ready) is tuple:
                    path, body = ready  # rendered by prerender, which found no null column
                else:
                    nulls = sorted(v for v in st.prompt_reads if v in row and row[v] is None)
                    if nulls:
                        raise RenderError(f"column(s) {', '.join(nulls)} are null on this row")
                    if isinstance(ready, RenderError) and st is stages[0]:
                        raise ready
                    path, body = st.request(row)
                if not _has_text(body):
                    raise RenderError("the rendered prompt is empty")
                outcome = await st.strategy.answer(ctx, row, path, body, resume)
        except RenderError as e:
            _fail(rec, errors, st, str(e), None)
            failed.add(out)
            tracker.record(st.name, error=True)
            continue
        if rec["skipped"]:
            skipped.add(out)
            tracker.record(st.name, skipped=True)
            continue
        rec.update(outcome.record(job))
        if outcome.pending is not None:
            continue  # no answer yet: the next wave's tiers give it
        rec.pop("_pending", None)
        if outcome.ok:
            outputs[out] = row[out] = outcome.answer.value
        else:
            _fail(rec, errors, st, outcome.error or outcome.answer.error, outcome.answer.raw)
            failed.add(out)
        tracker.record(st.name, error=not outcome.ok, cached=rec["cached"], prompt_tokens=rec["prompt_tokens"],
                       completion_tokens=rec["completion_tokens"])
    return outputs, lineage, errors


class _Unknown:
    """A model not up in this pass (a later wave's), described by its config name."""

    def __init__(self, name: str):
        self.model_id, self.revision, self.engine_version = name, "-", "-"


def _has_text(body: dict) -> bool:
    if "messages" in body:
        return bool(body["messages"][-1]["content"].strip())
    return bool(str(body.get("prompt", body.get("input", ""))).strip())


def _fail(rec: dict, errors: list, st: Stage, message: str, raw: str | None) -> None:
    rec["error"] = message
    errors.append({"stage": st.name, "error": message, "raw": raw, "finish_reason": rec.get("finish_reason"),
                   "attempts": rec.get("attempts", 0)})
