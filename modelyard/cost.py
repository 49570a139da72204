"""What a run cost, from the tokens each model used and the prices in the config. Plain logic.

A model priced per token costs its prompt and completion tokens at ``prompt_per_1m`` and
``completion_per_1m``. A managed model priced per GPU-hour costs the GPU-seconds its servers
were up during the run (devices x seconds; a server on the CPU counts as one device), split
across its rows by tokens: every token it handled costs the same. The manifest keeps the
per-token rate of every priced model, so the cost of any row is its tokens times those rates.
For a cascade, the run also says what the stage would have cost with every row on its last
tier: the rows that ran times the last tier's mean cost per row (from the rows it answered, or
else from the calibration sample, where every tier answered).
"""

from __future__ import annotations

from typing import Any


def usage_by_model(stage_stats: dict[str, dict]) -> dict[str, dict[str, dict[str, int]]]:
    """stage -> model -> {prompt_tokens, completion_tokens}, from the manifest's stage counts."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for name, s in stage_stats.items():
        per: dict[str, dict[str, int]] = {}

        def add(model: str, pt: int, ct: int) -> None:
            u = per.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0})
            u["prompt_tokens"] += pt or 0
            u["completion_tokens"] += ct or 0

        if s.get("tiers"):
            for t in s["tiers"]:
                add(t["model"], t["prompt_tokens"], t["completion_tokens"])
            if s.get("judge"):
                add(s["judge"]["model"], s["judge"]["prompt_tokens"], s["judge"]["completion_tokens"])
        else:
            add(s["model"], s["prompt_tokens"], s["completion_tokens"])
        out[name] = per
    return out


def rates(prices: dict[str, Any], usage: dict[str, dict[str, dict[str, int]]],
          gpu_seconds: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per priced model: the cost of one prompt token and of one completion token."""
    tokens: dict[str, int] = {}
    for per in usage.values():
        for m, u in per.items():
            tokens[m] = tokens.get(m, 0) + u["prompt_tokens"] + u["completion_tokens"]
    out = {}
    for m, price in prices.items():
        if price is None:
            continue
        if price.gpu_hour is not None:
            total = gpu_seconds.get(m, 0.0) / 3600 * price.gpu_hour
            per_token = total / tokens[m] if tokens.get(m) else 0.0
            out[m] = {"prompt": per_token, "completion": per_token}
        else:
            out[m] = {"prompt": (price.prompt_per_1m or 0.0) / 1e6, "completion": (price.completion_per_1m or 0.0) / 1e6}
    return out


def priced(rate: dict[str, float] | None, prompt_tokens: int | None, completion_tokens: int | None) -> float:
    if rate is None:
        return 0.0
    return (prompt_tokens or 0) * rate["prompt"] + (completion_tokens or 0) * rate["completion"]


def run_cost(stage_stats: dict[str, dict], prices: dict[str, Any], gpu_seconds: dict[str, float]) -> dict | None:
    """The manifest's cost figures, and each stage's ``cost`` (and each tier's) filled in place.
    None when no model has a price."""
    if not any(p is not None for p in prices.values()):
        return None
    gpu_seconds = {m: round(v, 3) for m, v in gpu_seconds.items()}  # as the manifest says them
    usage = usage_by_model(stage_stats)
    r = rates(prices, usage, gpu_seconds)
    by_model: dict[str, float] = {}
    by_stage: dict[str, float] = {}
    for name, s in stage_stats.items():
        stage_models = {m: priced(r.get(m), u["prompt_tokens"], u["completion_tokens"]) for m, u in usage[name].items()}
        total = sum(stage_models.values())
        ran = s["rows"] - s["skipped"]
        s["cost"] = {"total": _round(total), "per_row": _round(total / ran) if ran else None,
                     "by_model": {m: _round(c) for m, c in stage_models.items()}, "all_last_tier": None}
        for t in s.get("tiers") or []:
            t["cost"] = _round(priced(r.get(t["model"]), t["prompt_tokens"], t["completion_tokens"]))
        if s.get("strategy") == "cascade":
            s["cost"]["all_last_tier"] = _all_last_tier(s, r, ran)
        by_stage[name] = _round(total)
        for m, c in stage_models.items():
            by_model[m] = by_model.get(m, 0.0) + c
    return {"total": _round(sum(by_stage.values())), "by_model": {m: _round(c) for m, c in by_model.items()},
            "by_stage": by_stage, "rates": r, "gpu_seconds": gpu_seconds}


def _all_last_tier(s: dict, r: dict, ran: int) -> float | None:
    last = s["tiers"][-1]
    rate = r.get(last["model"])
    if last["asked"]:
        return _round(ran * priced(rate, last["prompt_tokens"], last["completion_tokens"]) / last["asked"])
    sample = ((s.get("calibration") or {}).get("sample")) or []
    tokens = [x["tiers"][-1] for x in sample if x["tiers"][-1].get("prompt_tokens") is not None]
    if not tokens:
        return None
    per_row = sum(priced(rate, t["prompt_tokens"], t["completion_tokens"]) for t in tokens) / len(tokens)
    return _round(ran * per_row)


def row_cost(lineage: dict[str, dict], manifest: dict) -> dict[str, float] | None:
    """One output row's cost per stage, from its lineage and the manifest's rates."""
    cost = manifest.get("cost")
    if not cost:
        return None
    r = cost["rates"]
    out = {}
    for name, rec in lineage.items():
        if rec is None:
            continue
        if rec.get("tiers"):
            out[name] = _round(sum(priced(r.get(e["model"]), e["prompt_tokens"], e["completion_tokens"])
                                   for e in rec["tiers"]))
        else:
            model = manifest["stages"][name]["model"]
            out[name] = _round(priced(r.get(model), rec["prompt_tokens"], rec["completion_tokens"]))
    return out


def wave_gpu_seconds(placements, seconds: float) -> dict[str, float]:
    """Devices x seconds of every managed server of a wave that was up for ``seconds``."""
    out: dict[str, float] = {}
    for p in placements:
        out[p.model] = out.get(p.model, 0.0) + max(1, len(p.devices)) * seconds
    return out


def _round(x: float) -> float:
    return round(x, 10)
