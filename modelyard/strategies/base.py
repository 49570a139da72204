"""What every stage strategy shares: the outcome it hands the row loop, and its lineage entries.

A strategy turns one rendered request of one row into an ``Outcome``: the answer kept, and for
stages that ask several models, every model's attempt (``tiers``), which one gave the answer
(``tier``) and how sure it was (``confidence``). The row loop does the rest (skips, upstream
failures, error rows) the same way for every strategy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from modelyard.asking import Answer, Context
from modelyard.lineage import MULTI_LINEAGE, STAGE_LINEAGE
from modelyard.stages import Stage


def entry(a: Answer, role: str, tier: int, reason: str) -> dict[str, Any]:
    """One model's attempt, as ``_lineage.<stage>.tiers`` keeps it."""
    return {"model": a.model, "role": role, "tier": tier, "answer": a.text(), "confidence": a.confidence,
            "reason": reason, "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
            "latency_ms": a.latency_ms, "cached": a.cached}


@dataclass
class Outcome:
    """The answer a stage keeps for a row, and (several models) how it was reached."""

    answer: Answer
    tiers: list[dict[str, Any]] | None = None
    tier: int | None = None
    confidence: float | None = None
    asked: list[Answer] = field(default_factory=list)  # every attempt, in order (several models)
    parallel: bool = False  # the attempts went out together (a vote): the stage took the slowest one's time
    error: str | None = None  # overrides the kept answer's error (e.g. every voter failed)
    pending: int | None = None  # a cascade cut by GPU waves: the tier a later wave asks next (no answer yet)
    carried: dict[str, Any] | None = None  # the stage's lineage from an earlier wave, for its sums

    @property
    def ok(self) -> bool:
        return self.answer.ok and self.error is None

    def record(self, job) -> dict[str, Any]:
        """The row's lineage fields of the stage (the base fields come from ``new_record``)."""
        a = self.answer
        rt = job.models[a.model]
        if not self.asked and self.carried is None and self.tiers is None and self.pending is None:
            # one model asked once (most rows of most stages): the general sums below, for one answer
            lat = a.latency_ms
            return {"model": rt.model_id, "model_revision": rt.revision, "engine_version": rt.engine_version,
                    "finish_reason": a.finish_reason, "endpoint": a.endpoint, "prompt_tokens": a.prompt_tokens,
                    "completion_tokens": a.completion_tokens, "latency_ms": None if lat is None else round(lat, 3),
                    "attempts": a.attempts, "cached": bool(a.cached)}
        rec = {"model": rt.model_id, "model_revision": rt.revision, "engine_version": rt.engine_version,
               "finish_reason": a.finish_reason, "endpoint": a.endpoint}
        asked = self.asked or [a]
        before = self.carried or {}
        lat = [x.latency_ms for x in asked if x.latency_ms is not None] + (
            [before["latency_ms"]] if before.get("latency_ms") is not None else [])
        rec.update(prompt_tokens=_sum([*(x.prompt_tokens for x in asked), before.get("prompt_tokens")]),
                   completion_tokens=_sum([*(x.completion_tokens for x in asked), before.get("completion_tokens")]),
                   latency_ms=(max(lat) if self.parallel else round(sum(lat), 3)) if lat else None,
                   attempts=sum(x.attempts for x in asked) + (before.get("attempts") or 0),
                   cached=all(x.cached for x in asked) and before.get("cached", True))
        if self.tiers is not None:
            rec.update(confidence=self.confidence, tier=self.tier, tiers=self.tiers)
        if self.pending is not None:
            rec.update(model=None, finish_reason=None, endpoint=None, confidence=None, tier=None,
                       _pending=self.pending)
        return rec


def _sum(values) -> int | None:
    vals = [v for v in values if v is not None]
    return sum(vals) if vals else None


class Strategy(ABC):
    """How a stage gets its answer for a row. Subclasses: Single, Cascade, Vote, Route."""

    name = "single"
    multi = False  # asks several models: its lineage has confidence, tier and tiers

    def __init__(self, stage: Stage):
        self.stage = stage
        self.reads: set[str] = set()  # row columns the strategy reads besides the stage's templates

    @property
    def lineage_type(self) -> pa.StructType:
        return MULTI_LINEAGE if self.multi else STAGE_LINEAGE

    @property
    def models(self) -> list[str]:
        return self.stage.cfg.models_used

    @abstractmethod
    async def answer(self, ctx: Context, row: dict[str, Any], path: str, body: dict[str, Any],
                     resume: dict[str, Any] | None = None) -> Outcome:
        """The stage's answer for ``row`` whose rendered request is (``path``, ``body``); ``resume``:
        the stage's lineage from an earlier GPU wave that left it pending (cascades only)."""

    def stats(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """This strategy's own counts over a shard's lineage records of the stage (summed across
        shards by ``modelyard.stats.add``)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the manifest says of the strategy, besides its counts."""
        return {"strategy": self.name}
