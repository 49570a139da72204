"""`min_confidence: auto`: thresholds fitted on a sample that every tier of the cascade answers.

The sample is ``calibrate.rows`` rows of the whole input drawn with ``calibrate.seed``. Every
tier answers each of them (with the same requests the cascade sends, so the run's own requests
are then answered by the request cache). Each `auto` threshold is then set, tier by tier, as low
as keeps the cascade's answers equal to the last tier's on at least ``agreement`` of the sample:
the sample may disagree with the last tier on at most (1 - agreement) of its rows, and the
earlier, cheaper tiers spend that allowance first. A tier whose every sampled answer must go on
gets a threshold just above every confidence it gave. The judge is not asked on the sample; it can
only send more rows on.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import pyarrow.parquet as pq

from modelyard.asking import Context
from modelyard.templates import RenderError


def sample_rows(shard_sizes: list[int], rows: int, seed: int) -> list[tuple[int, int]]:
    """(shard, row in shard) of the sample, in input order."""
    total = sum(shard_sizes)
    picked = sorted(random.Random(seed).sample(range(total), min(rows, total)))
    out, start, shard = [], 0, 0
    for g in picked:
        while g >= start + shard_sizes[shard]:
            start += shard_sizes[shard]
            shard += 1
        out.append((shard, g - start))
    return out


def fit(sample: list[dict[str, Any]], fixed: list[float | str | None], agreement: float) -> dict[str, Any]:
    """Thresholds from a sample. ``sample``: per row, ``tiers``: per tier {answer, ok, confidence}
    (ok: valid, not truncated, no escalate_when); ``fixed``: each tier's configured min_confidence
    (a number, "auto", or None). Rows whose last tier has no valid answer are left out."""
    rows = [r for r in sample if r["tiers"][-1]["ok"]]
    n = len(rows)
    budget = math.floor((1 - agreement) * n + 1e-9)
    spent = 0
    remaining = list(range(n))
    thresholds: list[float | None] = []
    for t in range(len(fixed) - 1):
        def accepted(theta: float | None) -> list[int]:
            return [i for i in remaining if rows[i]["tiers"][t]["ok"] and (
                theta is None or (rows[i]["tiers"][t]["confidence"] or 0.0) >= theta)]

        def wrong(acc: list[int]) -> int:
            return sum(rows[i]["tiers"][t]["answer"] != rows[i]["tiers"][-1]["answer"] for i in acc)

        if fixed[t] == "auto":
            candidates = sorted({0.0, *((rows[i]["tiers"][t]["confidence"] or 0.0) for i in remaining)})
            none = math.nextafter(candidates[-1], 2.0)  # just above every confidence: accepts none
            theta = next((c for c in candidates if spent + wrong(accepted(c)) <= budget), none)
        else:
            theta = fixed[t]
        acc = accepted(theta)
        spent += wrong(acc)
        taken = set(acc)
        remaining = [i for i in remaining if i not in taken]
        thresholds.append(theta)
    thresholds.append(None)
    return {"rows": n, "thresholds": thresholds, "agreement": round(1 - spent / n, 6) if n else None,
            "target": agreement}


async def answer_sample(ctx: Context, st, rows: list[dict], keys: list[str]) -> list[dict[str, Any]]:
    """Every tier's answer to each sampled row (rows its `when` skips, or that cannot be rendered,
    are left out)."""
    cascade = st.strategy

    async def one(row: dict, key: str) -> dict | None:
        try:
            if st.condition is not None and not st.condition(row):
                return None
            path, body = st.request(row)
        except RenderError:
            return None
        answers = await asyncio.gather(*(cascade.ask_tier(ctx, i, path, body) for i in range(len(cascade.tiers))))
        tiers = []
        for a in answers:
            ok = a.ok and not a.truncated
            if ok and cascade.escalate is not None:
                try:
                    ok = not cascade.escalate({**row, st.cfg.output: a.value})
                except RenderError:
                    ok = False
            tiers.append({"model": a.model, "answer": a.text(), "ok": ok, "confidence": a.confidence,
                          "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens})
        return {"row_key": key, "tiers": tiers}

    done = await asyncio.gather(*(one(r, k) for r, k in zip(rows, keys)))
    return [d for d in done if d is not None]


def read_sample(staging, picks: list[tuple[int, int]], prior_wave: int | None) -> tuple[list[dict], list[str], list]:
    """The sampled rows from the input shards, and their results of earlier waves (or None)."""
    rows, keys, prior = [], [], []
    by_shard: dict[int, list[int]] = {}
    for s, r in picks:
        by_shard.setdefault(s, []).append(r)
    for s, idx in by_shard.items():
        with staging.fs.open(staging.input_shard(s), "rb") as fh:
            table = pq.read_table(fh).take(idx)
        results = staging.read_json(staging.wave_shard(s, prior_wave))["results"] if prior_wave is not None else None
        for j, row in zip(idx, table.drop_columns(["_source"]).to_pylist()):
            rows.append(row)
            keys.append(row["_row_key"])
            prior.append(results[j] if results else None)
    return rows, keys, prior


def calibrate(job, stage_index: int, shard_sizes: list[int]) -> dict[str, Any]:
    """Fit the `auto` thresholds of cascade stage ``stage_index`` on its sample (or find the fit an
    earlier attempt of the job made). Stages of this pass before it run on the sampled rows first
    (the request cache then answers them in the run itself)."""
    from modelyard.client import Dispatcher
    from modelyard.progress import Tracker
    from modelyard.rows import run_row

    staging = job.staging()
    st = job.stages()[stage_index]
    saved = staging.path("calibration", f"{st.name}.json")
    if staging.fs.exists(saved):
        return staging.read_json(saved)
    c = st.cfg.calibrate
    picks = sample_rows(shard_sizes, c.rows, c.seed)
    rows, keys, prior = read_sample(staging, picks, job.wave - 1 if job.wave else None)
    position = {id(s): i for i, s in enumerate(job.stages())}
    earlier = [s for s in job.active() if position[id(s)] < stage_index]
    d = Dispatcher.get()

    async def go() -> list[dict[str, Any]]:
        ctx = Context(d.client, job.pools(), job.cache(), job)
        keep = list(range(len(rows)))
        if earlier or any(prior):
            done = await asyncio.gather(*(run_row(ctx, earlier, row, Tracker(), p) for row, p in zip(rows, prior)))
            outputs = {s.name: s.output for s in job.config.stages}
            keep = [i for i, (_, lineage, _) in enumerate(done)
                    if not any((rec["error"] or rec["skipped"]) and outputs[name] in st.reads
                               for name, rec in lineage.items())]
        return await answer_sample(ctx, st, [rows[i] for i in keep], [keys[i] for i in keep])

    sample = d.run(go())
    result = {**fit(sample, [t.min_confidence for t in st.cfg.cascade], c.agreement), "seed": c.seed,
              "sample": sample}
    staging.write_json(saved, result)
    return result
