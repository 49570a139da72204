"""Per-row routes: each row goes to the model of the first rule whose `when` holds."""

from __future__ import annotations

from typing import Any

from modelyard.asking import Context, ask
from modelyard.strategies.base import Outcome, Strategy, entry
from modelyard.templates import Condition


class Route(Strategy):
    name = "route"
    multi = True

    def __init__(self, stage):
        super().__init__(stage)
        self.rules = [(Condition(r.when) if r.when else None, r.model) for r in stage.cfg.route]
        self.reads = set().union(*(c.variables for c, _ in self.rules if c is not None))

    def rule_for(self, row: dict[str, Any]) -> int:
        """The index of the first rule that holds for the row (the last has no condition)."""
        for i, (cond, _) in enumerate(self.rules):
            if cond is None or cond(row):
                return i
        return len(self.rules) - 1

    async def answer(self, ctx: Context, row: dict[str, Any], path: str, body: dict[str, Any],
                     resume: dict[str, Any] | None = None) -> Outcome:
        i = self.rule_for(row)  # a `when` that fails on the row raises RenderError: an error row
        a = await ask(ctx, self.stage, self.rules[i][1], path, body)
        reason = f"rule {i}" if a.ok else ("failed" if a.failed else "invalid")
        return Outcome(a, [entry(a, "answer", i, reason)], i, a.confidence)

    def stats(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [0] * len(self.rules)
        for rec in records:
            if rec.get("tier") is not None:
                rows[rec["tier"]] += 1
        return {"routes": [{"rule": i, "when": r.when, "model": r.model, "rows": rows[i]}
                           for i, r in enumerate(self.stage.cfg.route)],
                "tiers": tier_counts(records, [m for _, m in self.rules])}

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "rules": [{"when": r.when, "model": r.model} for r in self.stage.cfg.route]}


def tier_counts(records: list[dict[str, Any]], models: list[str]) -> list[dict[str, Any]]:
    """Per position (tier, voter, rule): rows asked, rows it answered, tokens; from lineage records."""
    out = [{"model": m, "asked": 0, "answered": 0, "prompt_tokens": 0, "completion_tokens": 0} for m in models]
    for rec in records:
        for e in rec.get("tiers") or []:
            if e["role"] == "judge":
                continue
            t = out[e["tier"]]
            t["asked"] += 1
            t["prompt_tokens"] += e["prompt_tokens"] or 0
            t["completion_tokens"] += e["completion_tokens"] or 0
        if rec.get("tier") is not None and not rec.get("error"):
            out[rec["tier"]]["answered"] += 1
    return out
