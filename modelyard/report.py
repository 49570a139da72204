"""What `run` prints at the end and what `inspect` shows: read from the manifest and the parts."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from rich.console import Console
from rich.table import Table

from modelyard.commit import ERRORS, read_manifest
from modelyard.cost import row_cost
from modelyard.errors import UserError


def load_manifest(output: str) -> dict[str, Any]:
    m = read_manifest(output)
    if m is None:
        raise UserError(f"{output}: no _manifest.json here: not a committed modelyard output (or a partitioned "
                        "dataset: name the partition folder)")
    return m


def stage_table(manifest: dict[str, Any]) -> Table:
    t = Table(title="stages")
    priced = "cost" in manifest
    for c in ("stage", "model", "kind", "ran", "skip", "err", "cached", "tokens in/out", "rows/s", "tok/s",
              "p50/p95 ms", *(("cost", "per row") if priced else ())):
        t.add_column(c, justify="left" if c in ("stage", "model", "kind") else "right", no_wrap=True)
    for name, s in manifest["stages"].items():
        model = s["model"] if s.get("strategy", "single") == "single" else f"{s['strategy']}: {', '.join(s['models'])}"
        cost = s.get("cost") or {}
        t.add_row(name, model, s["kind"], str(s["ran"]), str(s["skipped"]), str(s["errors"]), str(s["cached"]),
                  f"{s['prompt_tokens']}/{s['completion_tokens']}", f"{s['rows_per_s']:.1f}",
                  f"{s['tokens_per_s']:.0f}", f"{_ms(s.get('latency_ms_p50'))}/{_ms(s.get('latency_ms_p95'))}",
                  *((money(cost.get("total")), money(cost.get("per_row"))) if priced else ()))
    return t


def print_stages(console: Console, manifest: dict[str, Any]) -> None:
    """The stage table, then the models of multi-model stages and what they decided, then the cost."""
    console.print(stage_table(manifest))
    tiers = tier_table(manifest)
    if tiers is not None:
        console.print(tiers)
        for name, s in manifest["stages"].items():
            note = stage_note(s)
            if note:
                console.print(f"{name}: {note}", highlight=False, soft_wrap=True)
    cost = manifest.get("cost")
    if cost:
        console.print("cost: total " + money(cost["total"]) + "; by model " +
                      ", ".join(f"{m} {money(c)}" for m, c in cost["by_model"].items()) + "; by stage " +
                      ", ".join(f"{n} {money(c)}" for n, c in cost["by_stage"].items()), highlight=False,
                      soft_wrap=True)


def stage_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage, then one per model a cascade, vote or route stage asked: what the stages
    artifact shows (and ``inspect``'s tier table)."""
    rows = []
    for name, s in manifest["stages"].items():
        m = manifest["models"][s["model"]]
        cost = s.get("cost") or {}
        many = s.get("strategy", "single") != "single"
        rows.append({
            "stage": name, "strategy": s.get("strategy", "single"),
            "model": " / ".join(manifest["models"][x]["model"] for x in s.get("models", [s["model"]])) if many
            else m["model"], "revision": "-" if many else m["revision"], "rows": s["rows"], "ran": s["ran"],
            "skipped": s["skipped"], "errors": s["errors"], "cached": s["cached"],
            "prompt_tokens": s["prompt_tokens"], "completion_tokens": s["completion_tokens"],
            "rows_per_s": s["rows_per_s"], "tokens_per_s": s["tokens_per_s"],
            "latency_ms_p50": s["latency_ms_p50"], "latency_ms_p95": s["latency_ms_p95"],
            "cost": cost.get("total"), "cost_per_row": cost.get("per_row"), "note": stage_note(s), "level": "stage",
        })
        for i, t in enumerate(s.get("tiers") or []):
            tm = manifest["models"][t["model"]]
            rows.append({
                "stage": f"{name} {_position(s)} {i}", "strategy": s["strategy"], "model": tm["model"],
                "revision": tm["revision"], "rows": t["asked"], "ran": t["answered"], "skipped": None,
                "errors": None, "cached": None, "prompt_tokens": t["prompt_tokens"],
                "completion_tokens": t["completion_tokens"], "rows_per_s": None, "tokens_per_s": None,
                "latency_ms_p50": None, "latency_ms_p95": None, "cost": t.get("cost"), "cost_per_row":
                round(t["cost"] / t["asked"], 10) if t.get("cost") is not None and t["asked"] else None,
                "note": tier_note(s, i), "level": "model",
            })
    return rows


def _position(s: dict) -> str:
    return {"cascade": "tier", "vote": "voter", "route": "rule"}[s["strategy"]]


def stage_note(s: dict) -> str:
    """What a stage's strategy decided, in a line: thresholds, agreement, routes, what it saved."""
    kind = s.get("strategy", "single")
    cost = s.get("cost") or {}
    parts = []
    if kind == "cascade":
        th = ", ".join("-" if t is None else f"{t:.3g}" for t in s.get("thresholds", []))
        parts.append(f"thresholds {th}")
        cal = s.get("calibration")
        if cal:
            parts.append(f"calibrated on {cal['rows']} rows: agreement {cal['agreement']} (target {cal['target']})")
        if cost.get("all_last_tier") is not None:
            parts.append(f"all rows on the last tier would cost {money(cost['all_last_tier'])}")
    elif kind == "vote":
        hist = s.get("agreement") or {}
        parts.append("agreement " + ", ".join(f"{k}: {v}" for k, v in sorted(hist.items(), reverse=True)))
    elif kind == "route":
        parts.append("; ".join(f"rule {r['rule']} ({r['when'] or 'else'}) -> {r['model']}: {r['rows']}"
                               for r in s.get("routes", [])))
    return "; ".join(parts)


def tier_note(s: dict, i: int) -> str:
    t = s["tiers"][i]
    if s["strategy"] == "cascade":
        reasons = ", ".join(f"{k} {v}" for k, v in t.get("reasons", {}).items() if v)
        return f"escalated {t.get('escalated', 0)}" + (f" ({reasons})" if reasons else "")
    if s["strategy"] == "vote":
        return f"agreed with the majority on {t.get('agreed', 0)} of {t['asked']}"
    return ""


def tier_table(manifest: dict[str, Any]) -> Table | None:
    rows = [r for r in stage_rows(manifest) if r["level"] == "model"]
    if not rows:
        return None
    t = Table(title="models of cascade, vote and route stages")
    for c in ("stage", "model", "asked", "answered", "tokens in/out", "cost", "note"):
        t.add_column(c, justify="right" if c in ("asked", "answered", "cost") else "left")
    for r in rows:
        t.add_row(r["stage"], r["model"], str(r["rows"]), str(r["ran"]),
                  f"{r['prompt_tokens']}/{r['completion_tokens']}", money(r["cost"]), r["note"])
    return t


def money(v) -> str:
    """A cost in the prices' unit, to three significant digits and never in e-notation
    (0.0000237, not 2.36826e-05; 1234.57 for large ones): per-row costs are small numbers people compare by eye."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1:
        return f"{v:.2f}"
    import numpy as np

    return np.format_float_positional(v, precision=3, unique=False, fractional=False, trim="-")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def print_summary(console: Console, manifest: dict[str, Any]) -> None:
    print_stages(console, manifest)
    errors = manifest["errors"]["rows"]
    console.print(f"committed {manifest['rows']} rows in {len(manifest['files'])} file(s) "
                  f"in {manifest['timing']['wall_s']:.1f} s, {errors} stage error(s)")
    if errors:
        console.print(f"errors: {posixpath.join(manifest['output']['uri'], ERRORS)}")
    console.print(f"output: {manifest['output']['uri']}")


def print_manifest(console: Console, output: str) -> None:
    m = load_manifest(output)
    console.print(f"[bold]{m['job']}[/]  run {m['run_id']}  committed {m['timing']['committed']}")
    console.print(f"config {m['config']['path']} sha256 {m['config']['sha256'][:16]}…  params {m['params']}")
    console.print(f"input {m['input']['uri']} ({m['input']['rows']} rows, {m['input']['shards']} shards, "
                  f"fingerprint {m['input']['fingerprint'][:16]}…)")
    t = Table(title="models")
    for c in ("name", "model", "revision", "engine", "served by"):
        t.add_column(c)
    for n, x in m["models"].items():
        t.add_row(n, x["model"], str(x["revision"]), str(x["engine_version"]),
                  "managed" if x["managed"] else ", ".join(x["endpoints"]))
    console.print(t)
    print_stages(console, m)
    ft = Table(title="files")
    for c in ("path", "rows", "bytes", "sha256"):
        ft.add_column(c)
    for f in m["files"]:
        ft.add_row(f["path"], str(f["rows"]), str(f["bytes"]), f["sha256"][:16] + "…")
    console.print(ft)
    console.print(f"errors: {m['errors']['rows']} in {m['errors']['path']}")


def find_row(output: str, key: str) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    """(manifest, the row, its error records) for a row key, reading only the listed parts."""
    m = load_manifest(output)
    fs, base = url_to_fs(output)
    for f in m["files"]:
        with fs.open(posixpath.join(base, f["path"]), "rb") as fh:
            table = pq.read_table(fh, filters=[("_row_key", "=", key)])
        if table.num_rows:
            row = table.slice(0, 1).to_pylist()[0]
            errors = []
            ep = posixpath.join(base, ERRORS)
            if fs.exists(ep):
                with fs.open(ep, "rb") as fh:
                    et = pq.read_table(fh)
                errors = et.filter(pc.equal(et.column("_row_key"), pa.scalar(key))).to_pylist()
            return m, row, errors
    raise UserError(f"{output}: no row with key {key!r}")


def print_row(console: Console, output: str, key: str) -> None:
    m, row, errors = find_row(output, key)
    lineage = row.pop("_lineage")
    console.print(f"[bold]row {key}[/]  from {row.pop('_source')}  run {row.pop('_run_id')}")
    row.pop("_row_key")
    outputs = {s["output"] for s in m["stages"].values()}
    console.print("input: " + json.dumps({k: v for k, v in row.items() if k not in outputs}, default=str)[:2000])
    costs = row_cost(lineage, m) or {}
    for name, rec in lineage.items():
        s = m["stages"][name]
        value = row.get(s["output"])
        if isinstance(value, list) and len(value) > 8:
            value = f"[{', '.join(f'{x:.4f}' for x in value[:8])}, …] ({len(value)} values)"
        console.print(f"\n[bold]stage {name}[/] → {s['output']} = {value!r}", highlight=False)
        for k, v in rec.items():
            if k != "tiers":
                console.print(f"  {k}: {v}", highlight=False)
        if name in costs:
            console.print(f"  cost: {money(costs[name])}", highlight=False)
        for e in rec.get("tiers") or []:
            conf = "-" if e["confidence"] is None else f"{e['confidence']:.3f}"
            console.print(f"  {e['role']} {e['tier']} {e['model']}: {e['answer']!r} confidence {conf} -> "
                          f"{e['reason']} ({e['prompt_tokens']}/{e['completion_tokens']} tokens, "
                          f"{'cached' if e['cached'] else _ms(e['latency_ms']) + ' ms'})", highlight=False)
        console.print(f"  prompt template: {s['prompt']!r}", highlight=False)
        console.print(f"  params: {json.dumps(s['params'])}  constraint: {json.dumps(s['constraint'])[:200]}",
                      highlight=False)
    for e in errors:
        console.print(f"\n[red]error in {e['stage']}[/]: {e['error']}\n  raw: {e['raw']!r}", highlight=False)
