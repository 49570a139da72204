"""Counts of a stage over a shard's rows, and their sum over shards. Plain functions."""

from __future__ import annotations

from typing import Any


def shard_stats(stages, results: list) -> dict[str, dict]:
    """Per stage: rows, skipped, errors, cached, tokens, and the strategy's own counts."""
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
            **st.strategy.stats(recs),
        }
    return stats


IDENTITIES = {"rule", "tier", "model", "when", "threshold"}  # name a thing; never summed


def add(a: Any, b: Any) -> Any:
    """The sum of two shards' counts: numbers add, dicts add by key, lists add item by item;
    what names a thing (a rule's index or text, a model) and anything else is kept from ``a``."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, bool) or isinstance(b, bool):
        return a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: (a.get(k, b.get(k)) if k in IDENTITIES else add(a.get(k), b.get(k)))
                for k in dict.fromkeys([*a, *b])}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [add(x, y) for x, y in zip(a, b)]
    return a


def total(stats: list[dict]) -> dict:
    out: dict = {}
    for s in stats:
        out = add(out, s)
    return out
