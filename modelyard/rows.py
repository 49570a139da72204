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
    """Every row of the shard at once; the pools bound what is in flight. Results in row order.

    ``prior``: each row's (outputs, lineage, errors) from the stages of earlier waves."""
    results: list = [None] * len(rows)

    async def one(i: int) -> None:
        results[i] = await run_row(ctx, stages, rows[i], tracker, prior[i] if prior else None)

    if ctx.job.cache_only:  # nothing to wait for: one row after another, stopping at the first miss
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


def _resume(job, prior) -> tuple[dict, dict, list, set, set, dict]:
    """A row's state after the stages of earlier waves."""
    outputs, lineage, errors = dict(prior[0]), dict(prior[1]), list(prior[2])
    failed, skipped, values = set(), set(), {}
    by_name = {s.name: s.output for s in job.config.stages}
    for name, rec in lineage.items():
        out = by_name[name]
        if rec["error"]:
            failed.add(out)
        elif rec["skipped"]:
            skipped.add(out)
        else:
            values[out] = outputs[out]
    return outputs, lineage, errors, failed, skipped, values


async def run_row(ctx: Context, stages: list[Stage], row: dict, tracker: Tracker, prior=None) -> RowResult:
    """The stages on one row, after those of ``prior``: (outputs, lineage by stage, error records)."""
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
        rec = lineage[st.name] = new_record(st, job.models[st.cfg.models_used[0]])
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
                nulls = sorted(v for v in st.prompt_reads if v in row and row[v] is None)
                if nulls:
                    raise RenderError(f"column(s) {', '.join(nulls)} are null on this row")
                path, body = st.request(row)
                if not _has_text(body):
                    raise RenderError("the rendered prompt is empty")
                outcome = await st.strategy.answer(ctx, row, path, body)
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
        if outcome.ok:
            outputs[out] = row[out] = outcome.answer.value
        else:
            _fail(rec, errors, st, outcome.error or outcome.answer.error, outcome.answer.raw)
            failed.add(out)
        tracker.record(st.name, error=not outcome.ok, cached=rec["cached"], prompt_tokens=rec["prompt_tokens"],
                       completion_tokens=rec["completion_tokens"])
    return outputs, lineage, errors


def _has_text(body: dict) -> bool:
    if "messages" in body:
        return bool(body["messages"][-1]["content"].strip())
    return bool(str(body.get("prompt", body.get("input", ""))).strip())


def _fail(rec: dict, errors: list, st: Stage, message: str, raw: str | None) -> None:
    rec["error"] = message
    errors.append({"stage": st.name, "error": message, "raw": raw, "finish_reason": rec.get("finish_reason"),
                   "attempts": rec.get("attempts", 0)})
