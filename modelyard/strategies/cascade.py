"""Cascades: every row goes to the first tier; only the rows it is unsure of, or gets wrong, go on.

A tier's answer moves the row on to the next tier when it failed, is invalid, was cut at
max_tokens (free text; a structured answer that is complete and valid counts as whole even when
the end-of-text token did not fit), has a confidence under the tier's ``min_confidence``, makes ``escalate_when`` hold,
or is rejected by the ``judge``; the last tier answers whatever reaches it. Each row moves on its
own, so the next tier works on the rows escalated so far while the first still works on others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelyard.asking import Answer, Context, ask
from modelyard.config import StageConfig
from modelyard.errors import ConfigError
from modelyard.stages import Stage
from modelyard.strategies.base import Outcome, Strategy, entry
from modelyard.strategies.route import tier_counts
from modelyard.templates import Condition, RenderError

REASONS = ("failed", "invalid", "truncated", "low_confidence", "escalate_when", "judge")


class Cascade(Strategy):
    name = "cascade"
    multi = True

    def __init__(self, stage: Stage, config, base_dir: Path, calibrated: list[float | None] | None = None,
                 span: tuple[int, int] | None = None):
        super().__init__(stage)
        cfg = stage.cfg
        self.tiers = cfg.cascade
        # the tiers this pass may ask: all, or those of its GPU wave when the tiers' models cannot be
        # resident together (a row the wave's last tier sends on waits, pending, for the next wave)
        self.span = span or (0, len(self.tiers) - 1)
        self.calibrated = calibrated
        self.escalate = Condition(cfg.escalate_when) if cfg.escalate_when else None
        self.judge = judge_stage(cfg, config, base_dir) if cfg.judge else None
        self.accept = Condition(cfg.judge.accept_when) if cfg.judge else None
        own = {cfg.output} | ({cfg.judge.output} if cfg.judge else set())
        self.reads = ((self.escalate.variables if self.escalate else set())
                      | (self.judge.reads if self.judge else set())
                      | (self.accept.variables if self.accept else set())) - own

    @property
    def models(self) -> list[str]:
        """The models this pass may ask: its tiers, and the judge of the tiers before the last."""
        lo, hi = self.span
        judge = [self.stage.cfg.judge.model] if self.judge is not None and lo < len(self.tiers) - 1 else []
        return list(dict.fromkeys([*(t.model for t in self.tiers[lo:hi + 1]), *judge]))

    def threshold(self, i: int) -> float | None:
        """Tier ``i``'s min_confidence: as configured, or as calibrated for `auto` (None until then)."""
        t = self.tiers[i].min_confidence
        if t == "auto":
            return self.calibrated[i] if self.calibrated else None
        return t

    def wants_confidence(self, i: int) -> bool:
        return self.tiers[i].min_confidence is not None

    async def ask_tier(self, ctx: Context, i: int, path: str, body: dict[str, Any]) -> Answer:
        return await ask(ctx, self.stage, self.tiers[i].model, path, body, want_confidence=self.wants_confidence(i))

    async def answer(self, ctx: Context, row: dict[str, Any], path: str, body: dict[str, Any],
                     resume: dict[str, Any] | None = None) -> Outcome:
        tiers: list[dict[str, Any]] = list(resume["tiers"]) if resume else []
        asked: list[Answer] = []
        last = len(self.tiers) - 1
        start = resume["_pending"] if resume else 0
        done = lambda a, i: Outcome(a, tiers, i, a.confidence, asked, carried=resume)  # noqa: E731
        for i in range(start, self.span[1] + 1):
            a = await self.ask_tier(ctx, i, path, body)
            asked.append(a)
            e = entry(a, "answer", i, "")
            tiers.append(e)
            if i == last:
                e["reason"] = "accepted" if a.ok else ("failed" if a.failed else "invalid")
                return done(a, i)
            reason = await self.why_escalate(ctx, row, i, a, tiers, asked)
            e["reason"] = reason or "accepted"
            if reason is None:
                return done(a, i)
            if not all(x.cached for x in asked):
                await ctx.durable()  # what this tier said is on disk before the next one is asked
        return Outcome(asked[-1], tiers, None, None, asked, pending=self.span[1] + 1, carried=resume)

    async def why_escalate(self, ctx: Context, row: dict[str, Any], i: int, a: Answer, tiers: list, asked: list
                           ) -> str | None:
        """Why tier ``i``'s answer sends the row on, or None to keep it. The judge is asked last,
        only about answers that pass every other test."""
        if a.failed:
            return "failed"
        if not a.ok:
            return "truncated" if a.truncated else "invalid"
        if a.truncated and self.stage.cfg.constraint is None:  # free text cut at max_tokens
            return "truncated"
        t = self.threshold(i)
        if t is not None and (a.confidence is None or a.confidence < t):
            return "low_confidence"
        seen = {**row, self.stage.cfg.output: a.value}
        try:
            if self.escalate is not None and self.escalate(seen):
                return "escalate_when"
        except RenderError:
            return "escalate_when"  # it cannot be decided on this answer: a later tier decides
        if self.judge is None:
            return None
        j = self.stage.cfg.judge
        try:
            path, body = self.judge.request(seen)
        except RenderError:
            return "judge"
        v = await ask(ctx, self.judge, j.model, path, body)
        asked.append(v)
        accepted = False
        if v.ok:
            try:
                accepted = bool(self.accept({**seen, j.output: v.value}))
            except RenderError:
                accepted = False
        tiers.append(entry(v, "judge", i, "accepted" if accepted else ("rejected" if v.ok else "failed")))
        return None if accepted else "judge"

    def stats(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        tiers = tier_counts(records, [t.model for t in self.tiers])
        for t in tiers:
            t.update(escalated=0, reasons={r: 0 for r in REASONS})
        judge = {"model": self.stage.cfg.judge.model, "asked": 0, "rejected": 0, "prompt_tokens": 0,
                 "completion_tokens": 0} if self.judge else None
        for rec in records:
            for e in rec.get("tiers") or []:
                if e["role"] == "judge":
                    judge["asked"] += 1
                    judge["rejected"] += e["reason"] != "accepted"
                    judge["prompt_tokens"] += e["prompt_tokens"] or 0
                    judge["completion_tokens"] += e["completion_tokens"] or 0
                elif e["reason"] in REASONS and e["tier"] < len(self.tiers) - 1:
                    tiers[e["tier"]]["escalated"] += 1
                    tiers[e["tier"]]["reasons"][e["reason"]] += 1
        return {"tiers": tiers, **({"judge": judge} if judge else {})}

    def describe(self) -> dict[str, Any]:
        cfg = self.stage.cfg
        return {"strategy": self.name, "escalate_when": cfg.escalate_when,
                "thresholds": [self.threshold(i) for i in range(len(self.tiers))],
                "tier_models": [t.model for t in self.tiers],
                "judge": {"model": cfg.judge.model, "accept_when": cfg.judge.accept_when} if cfg.judge else None}


def judge_stage(cfg: StageConfig, config, base_dir: Path) -> Stage:
    """The judge of a cascade stage, compiled as a stage of its own (its prompt reads the row and
    the stage's output)."""
    j = cfg.judge
    sc = StageConfig(name=f"{cfg.name}_judge", model=j.model, prompt=j.prompt, prompt_file=j.prompt_file,
                     system=j.system, choice=j.choice, regex=j.regex, json_schema=j.json_schema, params=j.params,
                     output=j.output)
    m = config.models[j.model]
    try:
        return Stage(sc, m, m.model, base_dir)
    except ConfigError as e:
        raise ConfigError(f"stages.{cfg.name}.judge: {e}") from None
