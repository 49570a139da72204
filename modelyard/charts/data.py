"""The numbers behind every chart of a report, as plain JSON: built from manifests and the parts.

A chart is ``{"id", "section", "title", "kind", "panels": [...]}``; the drawing code
(``draw.py``) only draws what is here, and the page embeds it, so a test (or a reader) can check
each picture against the manifest. Kinds: ``lines`` (time series, with events marked), ``hist``
and ``bars``. With several sources (the partitions of a backfill) each line or bar series is one
partition.
"""

from __future__ import annotations

from typing import Any

from modelyard.charts.distributions import scan
from modelyard.charts.scan import Source

SHARES = ("answered", "cached", "skipped", "errors")


def rates(t: list[float], cum: list[float | None]) -> tuple[list[float], list[float]]:
    """Per-second rates between neighbouring samples of a cumulative counter, at the later time."""
    xs, ys = [], []
    for i in range(1, len(t)):
        a, b, dt = cum[i - 1], cum[i], t[i] - t[i - 1]
        if a is None or b is None or dt <= 0:
            continue
        xs.append(t[i])
        ys.append(round((b - a) / dt, 3))
    return xs, ys


def _tel(m: dict) -> dict:
    return m.get("telemetry") or {"t": [], "stages": {}, "in_flight": {}, "events": []}


def throughput(sources: list[Source]) -> list[dict]:
    stages = list(sources[0].manifest["stages"])
    if len(sources) == 1:
        tel = _tel(sources[0].manifest)
        panels = []
        for metric, unit in (("rows", "rows/s"), ("tokens", "tokens/s")):
            lines = []
            for s in stages:
                xs, ys = rates(tel["t"], tel["stages"].get(s, {}).get(metric, []))
                lines.append({"label": s, "x": xs, "y": ys})
            panels.append({"title": unit, "ylabel": unit, "xlabel": "seconds since the run started", "lines": lines})
        return [{"id": "throughput", "section": "Throughput", "kind": "lines", "events": tel["events"],
                 "title": "rows/s and tokens/s per stage (servers starting shaded, waves marked)", "panels": panels}]
    out = []
    for metric, unit in (("rows", "rows/s"), ("tokens", "tokens/s")):
        panels = []
        for s in stages:
            lines = []
            for src in sources:
                tel = _tel(src.manifest)
                xs, ys = rates(tel["t"], tel["stages"].get(s, {}).get(metric, []))
                lines.append({"label": src.label, "x": xs, "y": ys})
            panels.append({"title": f"{s}: {unit}", "ylabel": unit, "xlabel": "seconds since the run started",
                           "lines": lines})
        out.append({"id": f"throughput-{metric}", "section": "Throughput", "kind": "lines", "events": [], "cols": 2,
                    "title": f"{unit} per stage, one line per partition", "panels": panels})
    return out


def in_flight(src: Source) -> dict | None:
    tel = _tel(src.manifest)
    lines = [{"label": k, "x": tel["t"], "y": v["values"]} for k, v in tel["in_flight"].items()]
    if not lines:
        return None
    return {"id": "in-flight", "section": "Latency", "kind": "lines", "events": tel["events"],
            "title": "requests in flight per endpoint", "panels": [
                {"title": "in flight", "ylabel": "requests", "xlabel": "seconds since the run started", "lines": lines}]}


def latency(sources: list[Source], dist: dict) -> dict | None:
    panels = []
    for stage, h in dist["latency"].items():
        if not sum(h["total"].values()):
            continue
        marks = []
        if len(sources) == 1:
            s = sources[0].manifest["stages"][stage]
            marks = [{"label": q, "x": s.get(f"latency_ms_{q}")} for q in ("p50", "p95")
                     if s.get(f"latency_ms_{q}") is not None]
        panels.append({"title": stage, "xlabel": "latency (ms)", **h, "marks": marks})
    if not panels:
        return None
    return {"id": "latency", "section": "Latency", "kind": "hist", "panels": panels,
            "title": "latency per stage (cached rows at 0 ms; p50 and p95 marked)"}


def outputs(dist: dict) -> list[dict]:
    by_stage: dict[str, list] = {}
    for p in dist["outputs"]:
        by_stage.setdefault(p["stage"], []).append(p)
    for stage, h in dist["confidence"].items():
        if sum(h["total"].values()):
            by_stage.setdefault(stage, []).append({**h, "name": "confidence", "what": "number"})
    charts = []
    for stage, probes in by_stage.items():
        panels = []
        for p in probes:
            label = {"length": f"{p['name']} length (characters)", "norm": f"{p['name']}",
                     "items": p["name"]}.get(p["what"], p["name"])
            panels.append({"title": label, "xlabel": label, **p})
        kinds = {p["type"] for p in panels}
        charts.append({"id": f"output-{stage}", "section": "Outputs", "panels": panels,
                       "kind": kinds.pop() if len(kinds) == 1 else "mixed",
                       "title": f"{stage}: distribution of its output"})
    return charts


def shares(sources: list[Source]) -> dict:
    panels = []
    for src in sources:
        cats, series = [], {k: [] for k in SHARES}
        for name, s in src.manifest["stages"].items():
            cats.append(name)
            counts = {"cached": s["cached"], "skipped": s["skipped"], "errors": s["errors"]}
            counts["answered"] = s["rows"] - s["skipped"] - s["errors"] - s["cached"]
            for k in SHARES:
                series[k].append(counts[k])
        panels.append({"title": src.label if len(sources) > 1 else "rows per stage", "categories": cats,
                       "series": [{"label": k, "values": v} for k, v in series.items()],
                       "stacked": True, "horizontal": True, "normalize": True, "xlabel": "share of rows"})
    return {"id": "shares", "section": "Skipped and cached", "kind": "bars", "panels": panels,
            "title": "answered by a model, from the request cache, skipped by `when`, failed"}


def errors(dist: dict) -> dict | None:
    e = dist["errors"]
    if not e["total"]:
        return None
    top = list(reversed(e["top"]))
    return {"id": "errors", "section": "Errors", "kind": "bars", "table": e["top"], "total": e["total"],
            "by_group": e["by_group"], "title": f"errors by reason (top {len(e['top'])} of {e['reasons']})",
            "panels": [{"title": f"{e['total']} stage errors", "categories": [f"{x['stage']}: {x['reason'][:60]}" for x in top],
                        "series": [{"label": "rows", "values": [x["count"] for x in top]}],
                        "stacked": False, "horizontal": True, "xlabel": "rows"}]}


def build(sources: list[Source]) -> dict[str, Any]:
    """Every chart of the page (and of the Prefect artifact) for one output or several partitions."""
    from modelyard.charts.together import cost, together

    dist = scan(sources)
    charts = [*throughput(sources)]
    if len(sources) == 1:
        charts.append(in_flight(sources[0]))
    charts += [latency(sources, dist), *outputs(dist), *together(sources), cost(sources), errors(dist),
               shares(sources)]
    return {"runs": [run_facts(s) for s in sources], "charts": [c for c in charts if c]}


def run_facts(src: Source) -> dict[str, Any]:
    m = src.manifest
    return {"label": src.label, "job": m["job"], "run_id": m["run_id"], "rows": m["rows"],
            "output": m["output"]["uri"], "partition": m["output"].get("partition"), "params": m.get("params"),
            "committed": m["timing"]["committed"], "wall_s": m["timing"]["wall_s"],
            "errors": m["errors"]["rows"], "files": len(m["files"]),
            "cost": (m.get("cost") or {}).get("total"),
            "stages": {n: {k: s.get(k) for k in ("model", "models", "kind", "strategy", "rows", "ran", "skipped", "errors",
                                                  "cached", "prompt_tokens", "completion_tokens", "rows_per_s",
                                                  "tokens_per_s", "latency_ms_p50", "latency_ms_p95")}
                       for n, s in m["stages"].items()}}
