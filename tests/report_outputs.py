"""Committed outputs built for the report's unit tests: real Parquet parts and a manifest in the
shape the pipeline writes (cascade, vote and route stages included, as SPEC.md describes them)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LABELS = ["billing", "bug", "feature", "other"]
TIER = pa.struct([("model", pa.string()), ("answer", pa.string()), ("confidence", pa.float64()),
                  ("reason", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                  ("latency_ms", pa.float64()), ("cached", pa.bool_())])
RECORD = [("model", pa.string()), ("latency_ms", pa.float64()), ("error", pa.string()), ("cached", pa.bool_()),
          ("skipped", pa.bool_()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())]
TOGETHER = [*RECORD, ("confidence", pa.float64()), ("tier", pa.int64()), ("tiers", pa.list_(TIER))]
STAGES = {"classify": "cascade", "topic": "vote", "summary": "route", "extract": "single", "embed": "single"}


def telemetry(seconds: int, stages: dict[str, int], seed: int) -> dict:
    """What modelyard.telemetry.snapshot() returns for a run of ``seconds`` that finished ``stages`` rows."""
    rnd = random.Random(seed)
    t = [round(0.5 * i, 3) for i in range(2 * seconds + 1)]
    out = {}
    for name, total in stages.items():
        steps = sorted(rnd.random() for _ in range(len(t) - 2))
        rows = [0, *(int(total * s) for s in steps), total]
        out[name] = {"rows": rows, "tokens": [r * 12 for r in rows], "errors": [0] * len(t), "cached": [0] * len(t)}
    inflight = {"tiny http://127.0.0.1:9/v1": {"model": "tiny", "endpoint": "http://127.0.0.1:9/v1",
                                               "values": [None, *(rnd.randint(0, 96) for _ in t[1:])]}}
    events = [{"kind": "server-start", "model": "tiny", "port": 9, "t": 0.0},
              {"kind": "server-healthy", "model": "tiny", "port": 9, "t": 2.0},
              {"kind": "wave", "wave": 1, "waves": 1, "stages": list(stages), "t": 2.5},
              {"kind": "server-stop", "model": "tiny", "port": 9, "t": seconds - 0.5}]
    return {"started": 1_800_000_000.0, "interval_s": 0.5, "max_points": 400, "t": t, "stages": out,
            "in_flight": inflight, "events": events, "events_dropped": 0}


def make_output(folder: Path, rows: int = 400, seed: int = 0, partition: str | None = None) -> dict:
    """Write part-00000.parquet and _manifest.json into ``folder``; returns the manifest."""
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cols: dict[str, list] = {k: [] for k in ("ticket_id", "label", "topic", "summary", "details", "embedding")}
    lineage = []
    stats = {s: {"rows": rows, "skipped": 0, "errors": 0, "cached": 0, "prompt_tokens": 0, "completion_tokens": 0}
             for s in STAGES}
    tiers = [{"asked": 0, "answered": 0, "escalated": 0, "reasons": {}} for _ in range(2)]
    for i in range(rows):
        key = f"T{seed}-{i:05d}"
        cols["ticket_id"].append(key)
        rec = {}
        for s in STAGES:
            err = None
            if rnd.random() < 0.04:
                err = rnd.choice([f"too long: the prompt has {rnd.randint(1100, 1500)} tokens, the model's context is 1024",
                                  "output is not valid JSON: Expecting ',' delimiter: line 1 column 9"])
            cached, skipped = rnd.random() < 0.1, s == "extract" and rnd.random() < 0.5
            if skipped:
                err, cached = None, False
            st = stats[s]
            st["errors"] += err is not None
            st["skipped"] += skipped
            st["cached"] += cached
            st["prompt_tokens"] += 0 if skipped else 30
            st["completion_tokens"] += 0 if skipped else 4
            r = {"model": "tiny", "latency_ms": None if skipped or err else (0.0 if cached else rnd.uniform(50, 900)),
                 "error": err, "cached": cached, "skipped": skipped, "prompt_tokens": 30, "completion_tokens": 4}
            if STAGES[s] != "single":
                tier = 0 if rnd.random() < 0.7 else 1
                r.update(confidence=rnd.random(), tier=tier, tiers=[
                    {"model": m, "answer": "bug", "confidence": 0.5, "reason": None, "prompt_tokens": 30,
                     "completion_tokens": 4, "latency_ms": 100.0, "cached": False} for m in ("small", "big")[:tier + 1]])
                if s == "classify":
                    tiers[0]["asked"] += 1
                    if tier:
                        tiers[0]["escalated"] += 1
                        tiers[0]["reasons"]["low_confidence"] = tiers[0]["reasons"].get("low_confidence", 0) + 1
                        tiers[1]["asked"] += 1
                    tiers[tier]["answered"] += 1
            rec[s] = r
        lineage.append(rec)
        ok = {s: rec[s]["error"] is None and not rec[s]["skipped"] for s in STAGES}
        cols["label"].append(rnd.choice(LABELS) if ok["classify"] else None)
        cols["topic"].append(rnd.choice(["work", "life"]) if ok["topic"] else None)
        cols["summary"].append("x" * rnd.randint(5, 200) if ok["summary"] else None)
        cols["details"].append({"product": rnd.choice(["app", "web", "api"]), "urgent": rnd.random() < 0.3,
                                "severity": rnd.randint(1, 5)} if ok["extract"] else None)
        v = [rnd.gauss(0, 1) for _ in range(8)]
        cols["embedding"].append(v if ok["embed"] else None)
    ltype = pa.struct([(s, pa.struct(TOGETHER if STAGES[s] != "single" else RECORD)) for s in STAGES])
    table = pa.table({
        "ticket_id": pa.array(cols["ticket_id"]), "label": pa.array(cols["label"]).dictionary_encode(),
        "topic": pa.array(cols["topic"]), "summary": pa.array(cols["summary"]),
        "details": pa.array(cols["details"], pa.struct([("product", pa.string()), ("urgent", pa.bool_()),
                                                        ("severity", pa.int64())])),
        "embedding": pa.array(cols["embedding"], pa.list_(pa.float32(), 8)),
        "_row_key": pa.array(cols["ticket_id"]), "_run_id": pa.array([f"run-{seed}"] * rows),
        "_lineage": pa.array(lineage, ltype)})
    pq.write_table(table, folder / "part-00000.parquet")
    manifest = manifest_for(folder, rows, seed, stats, tiers, partition)
    (folder / "_manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def manifest_for(folder: Path, rows: int, seed: int, stats: dict, tiers: list, partition: str | None) -> dict:
    outputs = {"classify": ("label", "choice"), "topic": ("topic", "choice"), "summary": ("summary", "text"),
               "extract": ("details", "json_schema"), "embed": ("embedding", "embed")}
    stages = {}
    for s, (col, kind) in outputs.items():
        st = stats[s]
        stages[s] = {"model": None if STAGES[s] != "single" else "tiny", "output": col, "kind": kind,
                     "strategy": STAGES[s], **st, "ran": st["rows"] - st["skipped"], "rows_per_s": 10.0,
                     "tokens_per_s": 120.0, "latency_ms_p50": 420.0, "latency_ms_p95": 860.0}
    tier_models = ("small", "big")
    stages["classify"].update(
        tiers=[{"model": m, **t, "threshold": 0.8 if k == 0 else None, "prompt_tokens": 30 * t["asked"],
                "completion_tokens": 4 * t["asked"], "cost": 0.01 * (k + 1) * t["asked"]}
               for k, (m, t) in enumerate(zip(tier_models, tiers))],
        calibration={"rows": 50, "seed": 7, "agreement": 0.96, "thresholds": [0.8, None]},
        cost={"total": 4.0, "per_row": 4.0 / rows, "by_model": {"small": 1.0, "big": 3.0}, "all_last_tier": 8.0})
    stages["topic"].update(
        tiers=[{"model": m, "asked": rows, "answered": rows // 3, "escalated": 0, "reasons": {}, "threshold": None,
                "prompt_tokens": 30 * rows, "completion_tokens": 4 * rows, "cost": None} for m in ("a", "b", "c")],
        agreement={"0.67": rows // 2 + seed, "1.0": rows - rows // 2 - seed})
    stages["summary"].update(routes=[{"rule": 0, "when": "body | length > 2000", "model": "big", "rows": rows // 4},
                                     {"rule": 1, "when": None, "model": "small", "rows": rows - rows // 4}])
    return {
        "format": "modelyard.manifest/1", "run_id": f"run-{seed}", "job": "tickets", "params": {},
        "rows": rows, "output": {"uri": str(folder), "dataset": str(folder.parent), "partition": partition},
        "stages": stages, "files": [{"path": "part-00000.parquet", "rows": rows}],
        "errors": {"path": "_errors/errors.parquet", "rows": sum(s["errors"] for s in stats.values())},
        "timing": {"started": "2026-11-27T00:00:00+00:00", "committed": "2026-11-27T00:01:00+00:00",
                   "wall_s": 60.0, "processing_s": 55.0},
        "cost": {"total": 4.5, "by_model": {"small": 1.0, "big": 3.5}, "by_stage": {"classify": 4.0, "summary": 0.5}},
        "telemetry": telemetry(30 + 5 * seed, {s: st["rows"] for s, st in stats.items()}, seed),
    }
