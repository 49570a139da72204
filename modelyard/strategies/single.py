"""The plain stage: one model answers every row."""

from __future__ import annotations

from typing import Any

from modelyard.asking import Context, ask
from modelyard.strategies.base import Outcome, Strategy


class Single(Strategy):
    name = "single"

    async def answer(self, ctx: Context, row: dict[str, Any], path: str, body: dict[str, Any],
                     resume: dict[str, Any] | None = None) -> Outcome:
        return Outcome(await ask(ctx, self.stage, self.stage.cfg.model, path, body))
