"""Votes: several models, or several samples of one, answer every row; the majority wins.

Choice and regex answers are counted by value, numbers by value, JSON objects field by field
(each field its own majority; the combined object must still satisfy the schema, else the
whole-answer majority is kept). Ties go to the earlier voter. The confidence is the winning
share of the voters asked (for JSON, the smallest share among its fields). The voters of one
row are asked together: the stage takes as long as its slowest voter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from typing import Any

from modelyard.asking import Answer, Context, ask, ask_samples
from modelyard.stages import OutputInvalid
from modelyard.strategies.base import Outcome, Strategy, entry
from modelyard.strategies.route import tier_counts

_MISSING = object()


def _key(v: Any) -> str:
    if v is _MISSING:
        return "\0missing"
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def majority(values: list[Any]) -> tuple[Any, int]:
    """The most common value (ties: the one seen first) and how many voters gave it."""
    counts = Counter(_key(v) for v in values)
    best = max(counts.values())
    for v in values:
        if counts[_key(v)] == best:
            return v, best
    raise ValueError("no values")


class Vote(Strategy):
    name = "vote"
    multi = True

    def __init__(self, stage):
        super().__init__(stage)
        v = stage.cfg.vote
        self.samples = v.samples or 1
        # (model, sample): every model once, or one model `samples` times, in tie-break order
        self.voters = [(m, k) for m in v.voters for k in range(self.samples)]
        self.by_field = stage.schema is not None and stage.schema.get("type") == "object"

    async def answer(self, ctx: Context, row: dict[str, Any], path: str, body: dict[str, Any],
                     resume: dict[str, Any] | None = None) -> Outcome:
        models = list(dict.fromkeys(m for m, _ in self.voters))
        if self.samples > 1:  # one request per model for all its samples (vLLM's `n`), cached as one
            per_model = await asyncio.gather(*(ask_samples(ctx, self.stage, m, path, body, self.samples, durable=True)
                                               for m in models))
            asked = [a for answers in per_model for a in answers]  # the voters' order: (model, sample)
        else:
            asked = list(await asyncio.gather(*(ask(ctx, self.stage, m, path, body, durable=True) for m in models)))
        valid = [(i, a) for i, a in enumerate(asked) if a.ok]
        if not valid:
            tiers = [entry(a, "voter", i, "failed" if a.failed else "invalid") for i, a in enumerate(asked)]
            why = "; ".join(f"{a.model}: {a.error}" for a in asked)
            return Outcome(asked[0], tiers, None, None, asked, parallel=True, error=f"every voter failed ({why})")
        value, share = self.decide([a.value for _, a in valid], len(asked))
        agree = [i for i, a in valid if _key(a.value) == _key(value)]
        winner = agree[0] if agree else valid[0][0]
        tiers = [entry(a, "voter", i, ("agrees" if i in agree else "disagrees") if a.ok
                       else ("failed" if a.failed else "invalid")) for i, a in enumerate(asked)]
        kept = _with_value(asked[winner], value)
        return Outcome(kept, tiers, winner, share, asked, parallel=True)

    def decide(self, values: list[Any], voters: int) -> tuple[Any, float]:
        """The majority of the valid answers and its share of all ``voters``."""
        whole, n = majority(values)
        if not (self.by_field and all(isinstance(v, dict) for v in values)):
            return whole, round(n / voters, 6)
        combined, shares = {}, []
        for k in dict.fromkeys(k for v in values for k in v):
            won, c = majority([v.get(k, _MISSING) for v in values])
            shares.append(c / voters)
            if won is not _MISSING:
                combined[k] = won
        try:
            self.stage.validate(json.dumps(combined))
        except OutputInvalid:  # field-wise winners that the schema refuses together
            return whole, round(n / voters, 6)
        return combined, round(min(shares), 6)

    def stats(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        agreement: dict[str, int] = {}
        for rec in records:
            if rec.get("confidence") is not None and not rec.get("error"):
                k = f"{rec['confidence']:.2f}"
                agreement[k] = agreement.get(k, 0) + 1
        tiers = tier_counts(records, [m for m, _ in self.voters])
        for t in tiers:
            t["agreed"] = 0
        for rec in records:
            for e in rec.get("tiers") or []:
                tiers[e["tier"]]["agreed"] += e["reason"] == "agrees"
        return {"agreement": agreement, "tiers": tiers}

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "voters": [m for m, _ in self.voters], "samples": self.samples}


def _with_value(a: Answer, value: Any) -> Answer:
    """The winning voter's answer holding the decided value (a field-wise JSON majority may be no
    single voter's answer)."""
    if _key(a.value) == _key(value):
        return a
    return dataclasses.replace(a, value=value)
