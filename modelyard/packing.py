"""Packing servers onto GPUs of known memory: devices, and each server's --gpu-memory-utilization.

A server of tensor parallel size t takes t GPUs (an aligned block if one fits: tp=2 -> [0,1] or
[2,3]); each of them must keep room for its share (need per GPU / GPU memory, or the user's
``gpu_memory_utilization``). Replicas of one model go to different GPUs, a model of unknown size gets
its GPUs alone, and of the blocks that fit the emptiest is taken (among equals, the one whose
neighbours hold fewest replicas of the same model), so that load spreads. The shares
given on one GPU sum to at most ``LIMIT`` (up to 1.0 only where every server is the user's). Each
server's share is its need rounded up to 0.01, plus its part (by need) of what its GPUs leave over,
so that vLLM's KV caches use the whole budget.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelyard.planner import ModelNeed

LIMIT = 0.92  # shares modelyard gives the servers of one GPU sum to at most this (vLLM's default share)


def _ceil2(x: float) -> float:
    return math.ceil(x * 100 - 1e-9) / 100


def _floor2(x: float) -> float:
    return math.floor(x * 100 + 1e-9) / 100


def blocks(n: int, size: int) -> list[list[int]]:
    """Candidate device groups: aligned blocks (tp=2 -> [0,1], [2,3]), then any contiguous run."""
    aligned = [list(range(s, s + size)) for s in range(0, n - size + 1, size)]
    return aligned + [list(range(s, s + size)) for s in range(n - size + 1) if s % size]


def whole_block(free: list[bool], size: int) -> list[int]:
    """Whole-GPU mode: contiguous free devices, aligned to the group size if possible."""
    for b in blocks(len(free), size):
        if all(free[d] for d in b):
            return b
    return [i for i, f in enumerate(free) if f][:size]


class GpuPacking:
    """Packing onto GPUs of known memory: per device the shares taken and who took them."""

    def __init__(self, memory: list[float]):
        self.memory = memory
        self.used = [0.0] * len(memory)
        self.on: list[list[tuple[ModelNeed, int]]] = [[] for _ in memory]
        self.blocks: dict[tuple[str, int], list[int]] = {}  # each server's GPUs

    def fraction(self, n: ModelNeed, d: int) -> float:
        if n.utilization is not None:
            return n.utilization
        per = n.per_device()
        return LIMIT if per is None else _ceil2(per / self.memory[d])  # in steps of 0.01, as it is passed

    def fits(self, n: ModelNeed, block: list[int]) -> bool:
        for d in block:
            if any(m.name == n.name for m, _ in self.on[d]):
                return False  # replicas of a model spread over GPUs
            if n.per_device() is None and n.utilization is None and self.on[d]:
                return False  # unknown size: alone on its GPUs
            if any(m.per_device() is None and m.utilization is None for m, _ in self.on[d]):
                return False
            explicit = n.utilization is not None and all(m.utilization is not None for m, _ in self.on[d])
            if self.used[d] + self.fraction(n, d) > (1.0 if explicit else LIMIT) + 1e-9:
                return False
        return True

    def place(self, n: ModelNeed, r: int) -> list[int] | None:
        ok = [b for b in blocks(len(self.memory), n.tensor_parallel) if self.fits(n, b)]
        if not ok:  # last resort: any GPUs that each have room
            single = sorted((d for d in range(len(self.memory)) if self.fits(n, [d])), key=lambda d: self.used[d])
            ok = [sorted(single[:n.tensor_parallel])] if len(single) >= n.tensor_parallel else []
        if not ok:
            return None
        best = max(ok, key=lambda b: (round(min(1 - self.used[d] for d in b), 2), -self._crowd(n, b)))
        self.blocks[n.name, r] = best
        for d in best:
            self.used[d] += self.fraction(n, d)
            self.on[d].append((n, r))
        return best

    def _crowd(self, n: ModelNeed, block: list[int]) -> int:
        """Replicas of ``n`` on GPUs that share a server with ``block``'s: among equally empty GPUs,
        replicas go beside different neighbours (say, different tensor-parallel groups)."""
        near = set(block)
        for b in self.blocks.values():
            if near & set(b):
                near |= set(b)
        return sum(1 for (m, _), b in self.blocks.items() if m == n.name and near & set(b))

    def shares(self) -> dict[tuple[str, int], float | None]:
        """Each server's share: its need rounded up, plus its part of what its GPUs leave over."""
        per_dev: dict[tuple[str, int], list[float]] = {}
        for d, servers in enumerate(self.on):
            planned = [(n, r) for n, r in servers if n.utilization is None and n.per_device() is not None]
            fixed = sum(n.utilization for n, _ in servers if n.utilization is not None)
            base = {(n.name, r): self.fraction(n, d) for n, r in planned}
            left = max(0.0, LIMIT - fixed - sum(base.values()))
            total = sum(self.fraction(n, d) for n, _ in planned) or 1.0
            for n, r in planned:
                per_dev.setdefault((n.name, r), []).append(
                    _floor2(base[n.name, r] + left * self.fraction(n, d) / total))
        return {k: min(v) for k, v in per_dev.items()}


def pack(needs, names, reps, memory: list[float]) -> GpuPacking | None:
    """Every replica of ``names`` placed, the widest and largest first; None if they do not fit."""
    by, g = {n.name: n for n in needs}, GpuPacking(memory)
    servers = [(by[m], r) for m in names for r in range(reps[m])]
    for n, r in sorted(servers, key=lambda s: (-s[0].tensor_parallel, -g.fraction(s[0], 0))):
        if g.place(n, r) is None:
            return None
    return g
