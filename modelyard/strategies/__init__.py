"""Stage strategies: how a stage gets each row's answer from its model or models.

``single`` (one model), ``cascade`` (tiers that escalate only the rows they are unsure of),
``vote`` (a majority of models or samples) and ``route`` (a model per row by rule). Each turns a
row's rendered request into an ``Outcome``; the row loop (``modelyard.rows``) treats them alike.
"""

from __future__ import annotations

from pathlib import Path

from modelyard.stages import Stage
from modelyard.strategies.base import Outcome, Strategy
from modelyard.strategies.cascade import Cascade
from modelyard.strategies.route import Route
from modelyard.strategies.single import Single
from modelyard.strategies.vote import Vote

__all__ = ["Cascade", "Outcome", "Route", "Single", "Strategy", "Vote", "strategy_for"]


def strategy_for(stage: Stage, config, base_dir: Path, calibrated: list[float | None] | None = None,
                 span: tuple[int, int] | None = None) -> Strategy:
    """The compiled strategy of a stage (``calibrated``: a cascade's thresholds set by calibration;
    ``span``: the cascade tiers this pass asks, when GPU waves split them)."""
    kind = stage.cfg.strategy
    if kind == "cascade":
        return Cascade(stage, config, base_dir, calibrated, span)
    if kind == "vote":
        return Vote(stage)
    if kind == "route":
        return Route(stage)
    return Single(stage)
