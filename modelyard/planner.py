"""GPU planner: which managed models run side by side, on which GPUs, in which waves. Plain logic.

Each GPU serves one tensor-parallel rank of one server at a time. If every managed model
(tensor_parallel x replicas) fits at once, one wave runs every stage; otherwise the stages are cut,
in order, into waves of as many consecutive stages as fit, each finished on every shard (and its
servers stopped) before the next starts. No GPU: all on the CPU in one wave. External models need none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from itertools import takewhile

from modelyard.errors import UserError


class PlanError(UserError):
    """The managed models cannot be placed on the GPUs available."""


def _visible() -> list[str] | None:
    """This process's CUDA_VISIBLE_DEVICES entries (CUDA stops at the first invalid one)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    parts = (p.strip() for p in raw.split(",")) if raw is not None else None
    return None if parts is None else list(takewhile(lambda p: p and not p.startswith("-"), parts))


def detect_gpus() -> int:
    """GPUs this process may use: ``nvidia-smi -L``, narrowed by CUDA_VISIBLE_DEVICES; else 0."""
    try:
        smi, exe = None, shutil.which("nvidia-smi")
        try:
            if exe:
                r = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
                smi = sum(ln.startswith("GPU ") for ln in r.stdout.splitlines()) if r.returncode == 0 else 0
        except (OSError, subprocess.SubprocessError):
            pass
        vis = _visible()
        return (smi or 0) if vis is None else len(vis) if smi is None else min(len(vis), smi)
    except Exception:  # detection must never stop a run
        return 0


@dataclass
class ModelNeed:
    """One managed model: GPUs per replica, replicas, and the stages (by index) that use it."""

    name: str
    first_stage: int
    last_stage: int
    tensor_parallel: int = 1
    replicas: int = 1
    stages: tuple[int, ...] = ()  # the exact stages using it; empty: first_stage..last_stage

    @property
    def used(self) -> tuple[int, ...]:
        return self.stages or tuple(range(self.first_stage, self.last_stage + 1))


def needs_from_config(cfg) -> list[ModelNeed]:
    """The managed models of a PipelineConfig that some stage uses, in order of first use."""
    used: dict[str, list[int]] = {}
    for i, st in enumerate(cfg.stages):
        for name in st.models_used:
            used.setdefault(name, []).append(i)
    managed = {k: m.serve for k, m in cfg.models.items() if m.managed}
    return [ModelNeed(k, idx[0], idx[-1], (managed[k] and managed[k].tensor_parallel_size) or 1,
                      getattr(managed[k], "replicas", 1) or 1, tuple(idx)) for k, idx in used.items() if k in managed]


@dataclass
class Placement:
    model: str
    replica: int
    devices: list[int] = field(default_factory=list)  # GPU indices among this process's GPUs; [] = CPU

    @property
    def cuda_visible_devices(self) -> str | None:
        """The server's CUDA_VISIBLE_DEVICES, None on the CPU. Maps through this process's own
        CUDA_VISIBLE_DEVICES, if set, so a server never sees a GPU its parent was not given."""
        if not self.devices:
            return None
        vis = _visible()
        if vis and all(d < len(vis) for d in self.devices):
            return ",".join(vis[d] for d in self.devices)
        return ",".join(str(d) for d in self.devices)

    def where(self) -> str:
        return f"GPU{'s' if len(self.devices) > 1 else ''} {self.cuda_visible_devices}" if self.devices else "CPU"


@dataclass
class Wave:
    stages: list[int]
    placements: list[Placement] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(p.model for p in self.placements))


@dataclass
class Plan:
    gpus: int
    waves: list[Wave]
    notes: list[str] = field(default_factory=list)
    stage_names: list[str] = field(default_factory=list)

    def _stage(self, i: int) -> str:
        return f"{i}:{self.stage_names[i]}" if i < len(self.stage_names) else str(i)

    def describe(self) -> str:
        where = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}" if self.gpus else "CPU only (no GPU)"
        lines = [f"GPU plan: {where}, {len(self.waves)} wave{'s' if len(self.waves) != 1 else ''}"]
        for w, wave in enumerate(self.waves, 1):
            lines.append(f"wave {w}: stages {', '.join(self._stage(s) for s in wave.stages) or '-'}")
            lines += [f"  {p.model} replica {p.replica}: {p.where()}" for p in wave.placements] or [
                "  no managed model"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        where = f"{self.gpus} GPUs" if self.gpus else "CPU only (no GPU)"
        md = [f"# GPU plan\n\n{where}, {len(self.waves)} wave(s).\n",
              "| wave | stages | model | replica | CUDA_VISIBLE_DEVICES |", "|---|---|---|---|---|"]
        for w, wave in enumerate(self.waves, 1):
            stages = ", ".join(self._stage(s) for s in wave.stages)
            md += [f"| {w} | {stages} | {p.model} | {p.replica} | {p.cuda_visible_devices or 'CPU'} |"
                   for p in wave.placements] or [f"| {w} | {stages} | - | - | - |"]
        if self.notes:
            md.append("\n**Notes**\n\n" + "\n".join(f"- {n}" for n in self.notes))
        return "\n".join(md) + "\n"


def _block(free: list[bool], size: int) -> list[int]:
    """Contiguous free devices, aligned to the group size if possible (tp=2 -> [0,1] or [2,3])."""
    for start in [*range(0, len(free) - size + 1, size), *range(len(free) - size + 1)]:
        if all(free[start:start + size]):
            return list(range(start, start + size))
    return [i for i, f in enumerate(free) if f][:size]


def plan(needs: list[ModelNeed], gpus: int, stage_names: list[str] | None = None) -> Plan:
    """Waves of consecutive stages and the devices of every replica (see the module docstring)."""
    if gpus < 0:
        raise PlanError(f"--gpus {gpus}: the number of GPUs cannot be negative")
    by_name = {n.name: n for n in needs}
    if len(by_name) != len(needs):
        raise ValueError("needs name a model twice")
    last = max((s for n in needs for s in n.used), default=-1)
    names = list(stage_names or [])
    users = [[n.name for n in needs if s in n.used] for s in range(max(len(names), last + 1))]
    if gpus == 0:
        cpu = [Placement(n.name, r) for n in needs for r in range(n.replicas)]
        return Plan(0, [Wave(list(range(len(users))), cpu)],
                    ["no GPU: every managed model runs on the CPU, side by side in one wave"], names)
    problems = [f"model {n.name!r} needs {n.tensor_parallel} GPUs per replica (tensor_parallel_size "
                f"{n.tensor_parallel}) but only {gpus} {'is' if gpus == 1 else 'are'} available"
                for n in needs if n.tensor_parallel > gpus]
    if problems:
        raise PlanError(f"{len(problems)} model(s) do not fit on {gpus} GPU(s)", problems)
    reps = {n.name: max(1, min(n.replicas, gpus // n.tensor_parallel)) for n in needs}
    notes = [f"model {n.name!r}: {n.replicas} replicas of {n.tensor_parallel} GPU(s) do not fit on {gpus} "
             f"GPU(s); running {reps[n.name]}" for n in needs if reps[n.name] < n.replicas]
    demand = {n.name: reps[n.name] * n.tensor_parallel for n in needs}
    groups: list[list[int]] = [[]]  # greedy: the next stage joins the current wave while its models fit
    models: set[str] = set()  # the models of the current wave
    for s, stage_users in enumerate(users):
        if groups[-1] and sum(demand[m] for m in models | set(stage_users)) > gpus:
            groups.append([])
            models = set()
        models |= set(stage_users)
        if sum(demand[m] for m in models) > gpus:
            raise PlanError(f"stage {s} uses models {', '.join(sorted(models))} at once: "
                            f"{sum(demand[m] for m in models)} GPUs, only {gpus} available")
        groups[-1].append(s)
    waves = []
    for stages in groups:
        order = list(dict.fromkeys(m for s in stages for m in users[s]))
        free, devs = [True] * gpus, {}
        for m, r in sorted(((m, r) for m in order for r in range(reps[m])),
                           key=lambda mr: -by_name[mr[0]].tensor_parallel):
            devs[m, r] = _block(free, by_name[m].tensor_parallel)
            free = [f and i not in devs[m, r] for i, f in enumerate(free)]
        waves.append(Wave(stages, [Placement(m, r, devs[m, r]) for m in order for r in range(reps[m])]))
    if len(waves) > 1:
        notes.append(f"the managed models need {sum(demand.values())} GPUs together, {gpus} available: {len(waves)} "
                     "waves, each finishing its stages on every shard and stopping its servers before the next")
        seen = {n.name: [w for w, wave in enumerate(waves, 1) if n.name in wave.models] for n in needs}
        notes += [f"model {m!r} is used in waves {', '.join(map(str, ws))}: its servers are started again in each"
                  for m, ws in seen.items() if len(ws) > 1]
    return Plan(gpus, waves, notes, names)


def plan_for(cfg, gpus: int | None = None) -> Plan:
    """The plan of a PipelineConfig on ``gpus`` GPUs (None: detected)."""
    return plan(needs_from_config(cfg), detect_gpus() if gpus is None else gpus, [s.name for s in cfg.stages])
