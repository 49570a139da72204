"""Charts of stages whose models work together (cascade, vote, route) and of the run's cost.

Read from the manifest's ``stages[name]["tiers"]``, ``["agreement"]``, ``["routes"]``,
``["calibration"]`` and ``["cost"]``, and from ``manifest["cost"]``; absent keys draw nothing.
"""

from __future__ import annotations

from typing import Any

from modelyard.charts.scan import Source


def _tier_names(s: dict) -> list[str]:
    return [f"{i}: {t['model']}" for i, t in enumerate(s.get("tiers") or [])]


def _one(name: str, s: dict) -> list[dict]:
    strategy, tiers = s.get("strategy"), s.get("tiers") or []
    cats = _tier_names(s)
    panels = []
    if strategy == "cascade":
        panels.append({"title": "rows per tier", "categories": cats, "stacked": False, "horizontal": False,
                       "ylabel": "rows", "series": [{"label": k, "values": [t.get(k) or 0 for t in tiers]}
                                                    for k in ("asked", "answered", "escalated")]})
        reasons = sorted({r for t in tiers for r in (t.get("reasons") or {})})
        if reasons:
            panels.append({"title": "why rows escalated", "categories": cats, "stacked": True, "horizontal": False,
                           "ylabel": "rows", "series": [{"label": r, "values": [(t.get("reasons") or {}).get(r, 0)
                                                                                for t in tiers]} for r in reasons]})
    elif strategy == "vote":
        agreement = s.get("agreement") or {}
        keys = sorted(agreement, key=float)
        panels.append({"title": "winning share of the votes", "categories": keys, "stacked": False,
                       "horizontal": False, "ylabel": "rows", "xlabel": "share of the models that agreed",
                       "series": [{"label": "rows", "values": [agreement[k] for k in keys]}]})
        panels.append({"title": "answers per model", "categories": cats, "stacked": False, "horizontal": False,
                       "ylabel": "rows", "series": [{"label": k, "values": [t.get(k) or 0 for t in tiers]}
                                                    for k in ("asked", "answered")]})
    elif strategy == "route":
        routes = s.get("routes") or []
        panels.append({"title": "rows per rule", "stacked": False, "horizontal": True, "xlabel": "rows",
                       "categories": [f"{r['rule']}: {r.get('when') or 'otherwise'} -> {r['model']}" for r in routes],
                       "series": [{"label": "rows", "values": [r["rows"] for r in routes]}]})
    return panels


def _calibration(s: dict) -> str:
    c = s.get("calibration")
    if not c:
        return ""
    th = ", ".join("-" if x is None else f"{x:.3f}" for x in c.get("thresholds") or [])
    return f"; calibrated on {c.get('rows')} rows (seed {c.get('seed')}): thresholds {th}, agreement {c.get('agreement')}"


def together(sources: list[Source]) -> list[dict]:
    charts = []
    first = sources[0].manifest["stages"]
    for name, s in first.items():
        if s.get("strategy") in (None, "single"):
            continue
        if len(sources) == 1:
            panels = _one(name, s)
        else:  # one series per partition: who answered, by tier or rule
            if s["strategy"] == "route":
                cats = [f"{r['rule']}: {r['model']}" for r in s.get("routes") or []]
                vals = [[r["rows"] for r in src.manifest["stages"][name].get("routes") or []] for src in sources]
            else:
                cats = _tier_names(s)
                vals = [[t.get("answered") or 0 for t in src.manifest["stages"][name].get("tiers") or []]
                        for src in sources]
            panels = [{"title": "rows answered per tier" if s["strategy"] != "route" else "rows per rule",
                       "categories": cats, "stacked": False, "horizontal": False, "ylabel": "rows",
                       "series": [{"label": src.label, "values": v} for src, v in zip(sources, vals)]}]
        if panels:
            charts.append({"id": f"together-{name}", "section": "Models working together", "kind": "bars",
                           "panels": panels, "title": f"{name}: {s['strategy']}" + _calibration(s)})
    return charts


def cost(sources: list[Source]) -> dict | None:
    priced = [src for src in sources if src.manifest.get("cost")]
    if not priced:
        return None
    ref = priced[0].manifest
    stages = list(ref["cost"].get("by_stage") or {})
    models = sorted({m for src in priced for m in (src.manifest["cost"].get("by_model") or {})})
    panels: list[dict[str, Any]] = [
        {"title": "cost per stage", "categories": stages, "stacked": False, "horizontal": False, "ylabel": "cost",
         "series": [{"label": src.label, "values": [src.manifest["cost"]["by_stage"].get(s, 0.0) for s in stages]}
                    for src in priced]},
        {"title": "cost per model", "categories": models, "stacked": False, "horizontal": False, "ylabel": "cost",
         "series": [{"label": src.label, "values": [src.manifest["cost"]["by_model"].get(m, 0.0) for m in models]}
                    for src in priced]},
    ]
    cascades = [n for n, s in ref["stages"].items()
                if (s.get("cost") or {}).get("all_last_tier") is not None]
    if cascades and len(priced) == 1:
        st = ref["stages"]
        panels.append({"title": "cascade: its cost, and every row on its last tier", "categories": cascades,
                       "stacked": False, "horizontal": False, "ylabel": "cost",
                       "series": [{"label": "cascade", "values": [st[n]["cost"]["total"] for n in cascades]},
                                  {"label": "all on the last tier",
                                   "values": [st[n]["cost"]["all_last_tier"] for n in cascades]}]})
    total = ", ".join(f"{src.label}: {src.manifest['cost']['total']:.4g}" for src in priced)
    return {"id": "cost", "section": "Models working together", "kind": "bars", "panels": panels,
            "title": f"cost (total {total})"}
