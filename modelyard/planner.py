"""Placement: which managed servers run side by side, on which devices, with which memory share. Plain logic.

Every managed server (each replica of each managed model) needs memory: its weights, its KV cache
budget and its runtime (``modelyard.sizing``). Servers are packed onto the GPUs by that need, tensor
parallel ranks on as many GPUs, replicas of one model on different GPUs, the emptiest GPU first; each
gets ``--gpu-memory-utilization`` equal to its share, the shares of one GPU summing to at most 0.92
(the room left on a GPU is split among its servers, so vLLM's KV caches use it). On a machine without
GPUs every server gets its own KV cache budget, and their needs must fit in 0.92 of the memory
available. A user's ``gpu_memory_utilization`` wins; servers asked for at once that cannot fit are an
error naming them, before any server starts. Stages are cut, in order, into waves only where the next
stage's models do not fit beside the current wave's: each wave finishes its stages on every shard and
stops its servers before the next starts. GPUs of unknown memory get whole GPUs per server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

from modelyard.plan_text import describe_plan, plan_markdown
from modelyard.devices import detect_gpus, visible as _visible  # noqa: F401  (re-exported)
from modelyard.errors import UserError
from modelyard.packing import LIMIT, pack, whole_block



class PlanError(UserError):
    """The managed models cannot be placed on the devices available."""


@dataclass
class ModelNeed:
    """One managed model: GPUs per replica, replicas, the stages (by index) that use it, and its memory."""

    name: str
    first_stage: int
    last_stage: int
    tensor_parallel: int = 1
    replicas: int = 1
    stages: tuple[int, ...] = ()  # the exact stages using it; empty: first_stage..last_stage
    memory_gb: float | None = None  # per replica, all its GPUs together (or on the CPU); None: unknown
    kv_cache_gb: float | None = None  # the KV cache budget inside memory_gb
    utilization: float | None = None  # serve.gpu_memory_utilization: the user's share, which wins
    kv_pinned: bool = False  # the user set the server's own KV cache size
    why: str = ""  # how memory_gb was found

    @property
    def used(self) -> tuple[int, ...]:
        return self.stages or tuple(range(self.first_stage, self.last_stage + 1))

    def per_device(self) -> float | None:
        return None if self.memory_gb is None else self.memory_gb / self.tensor_parallel


def needs_from_config(cfg, size=None) -> list[ModelNeed]:
    """The managed models of a PipelineConfig that some stage uses, in order of first use.
    ``size(name, model_cfg)`` gives a model's ``sizing.Need`` (or None); without it memory is unknown."""
    used: dict[str, list[int]] = {}
    for i, st in enumerate(cfg.stages):
        for name in st.models_used:
            used.setdefault(name, []).append(i)
    out = []
    for k, idx in used.items():
        m = cfg.models.get(k)
        if m is None or not m.managed:
            continue
        serve = m.serve
        tp = (serve and serve.tensor_parallel_size) or 1
        n = ModelNeed(k, idx[0], idx[-1], tp, getattr(serve, "replicas", 1) or 1, tuple(idx))
        need = size(k, m) if size is not None else None
        if need is not None:
            per = need.per_device_gb(tp)
            n.memory_gb = None if per is None else per * tp
            n.kv_cache_gb, n.kv_pinned, n.why = need.kv_cache_gb, need.kv_pinned, need.explain(tp)
        n.utilization = getattr(serve, "gpu_memory_utilization", None)
        out.append(n)
    return out


@dataclass
class Placement:
    model: str
    replica: int
    devices: list[int] = field(default_factory=list)  # GPU indices among this process's GPUs; [] = CPU
    share: float | None = None  # GPU: its --gpu-memory-utilization; None: vLLM's default (whole GPUs)
    memory_gb: float | None = None  # what the plan reserves for it (per GPU on GPUs)
    kv_cache_gb: float | None = None  # its KV cache budget (the CPU backend is told it)
    explicit: bool = False  # share is the user's gpu_memory_utilization
    kv_pinned: bool = False  # the user set its KV cache size: nothing is passed for it
    why: str = ""  # how its need was found

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

    def vllm_options(self, cpu_engine: bool) -> dict:
        """The server options that carry this placement: its GPU share, and on vLLM's CPU backend its
        KV cache size (without one that backend reserves 0.92 of the memory node, and a second server fails)."""
        opts: dict = {}
        if self.devices and self.share is not None and not self.explicit:
            opts["gpu_memory_utilization"] = self.share
        if cpu_engine and not self.kv_pinned and not self.explicit and self.kv_cache_gb:
            opts["kv_cache_memory_bytes"] = int(math.ceil(self.kv_cache_gb * 2**30 / 2**20)) * 2**20
        return opts


@dataclass
class Wave:
    stages: list[int]
    placements: list[Placement] = field(default_factory=list)
    reason: str = ""  # why this wave starts where it does (empty for the first)
    tiers: dict[int, tuple[int, int]] = field(default_factory=dict)  # cascade stage -> its tiers here, if split

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(p.model for p in self.placements))


@dataclass
class Plan:
    gpus: int
    waves: list[Wave]
    notes: list[str] = field(default_factory=list)
    stage_names: list[str] = field(default_factory=list)
    gpu_memory_gb: list[float] | None = None  # per GPU; None: unknown (whole GPUs per server)
    cpu_available_gb: float | None = None  # no GPU: the memory the servers must fit in (before the 0.92)
    cpu_total_gb: float | None = None

    def stage(self, i: int, wave: Wave | None = None) -> str:
        name = f"{i}:{self.stage_names[i]}" if i < len(self.stage_names) else str(i)
        span = wave.tiers.get(i) if wave is not None else None
        if span is None:
            return name
        return f"{name} (cascade tier{'s' if span[0] != span[1] else ''} {'-'.join(dict.fromkeys(map(str, span)))})"

    def describe(self) -> str:
        return describe_plan(self)

    def to_markdown(self) -> str:
        return plan_markdown(self)


def _cpu_need(n: ModelNeed, total: float | None) -> float | None:
    if n.utilization is not None:
        return None if total is None else n.utilization * total
    return n.memory_gb


def _cpu_fits(needs, names, reps, usable: float | None, total: float | None, strict: bool = True) -> bool:
    """Do these models' servers fit in ``usable`` GiB? A model of unknown size shares with no other
    model across stages (``strict``); a stage that asks for it beside others gets them together."""
    by = {n.name: n for n in needs}
    if usable is None or len(names) <= 1:
        return True  # unknown memory, or one model alone: vLLM decides
    sizes = [_cpu_need(by[m], total) for m in names for _ in range(reps[m])]
    if strict and any(s is None for s in sizes):
        return False
    return sum(s or 0.0 for s in sizes) <= usable + 1e-9


def _describe_need(n: ModelNeed, mode: str, reps: dict[str, int]) -> str:
    """A model's need in a reason or an error: GPUs (whole-GPU mode), its share, or its memory."""
    r = reps.get(n.name, n.replicas)
    times = f" x {r} replicas" if r > 1 else ""
    if mode == "whole":
        k = n.tensor_parallel * r
        return f"{n.name} ({k} GPU{'s' if k > 1 else ''})"
    if n.utilization is not None:
        return f"{n.name} (gpu_memory_utilization {n.utilization:g}{times})"
    if n.memory_gb is None:
        return f"{n.name} (size unknown{times})"
    each = f"{n.per_device():.1f} GiB per GPU" if mode == "gpu" and n.tensor_parallel > 1 else f"{n.memory_gb:.1f} GiB"
    return f"{n.name} ({each}{times})"


def plan(needs: list[ModelNeed], gpus: int, stage_names: list[str] | None = None,
         gpu_memory_gb: float | list[float] | None = None, cpu_memory_gb: float | None = None,
         cpu_total_gb: float | None = None) -> Plan:
    """Waves of consecutive stages, and each server's devices and memory share (see the module docstring).
    ``gpu_memory_gb``: per GPU (one number for all); ``cpu_memory_gb``: available on a machine without GPUs."""
    if gpus < 0:
        raise PlanError(f"--gpus {gpus}: the number of GPUs cannot be negative")
    by_name = {n.name: n for n in needs}
    if len(by_name) != len(needs):
        raise ValueError("needs name a model twice")
    last = max((s for n in needs for s in n.used), default=-1)
    names = list(stage_names or [])
    users = [[n.name for n in needs if s in n.used] for s in range(max(len(names), last + 1))]
    stage = (lambda s: f"{s}:{names[s]}" if s < len(names) else str(s))
    memory = None
    if gpus and gpu_memory_gb is not None:
        memory = [float(gpu_memory_gb)] * gpus if isinstance(gpu_memory_gb, (int, float)) else list(gpu_memory_gb)[:gpus]
        memory += [min(memory)] * (gpus - len(memory))
    notes: list[str] = []
    if gpus:
        problems = [f"model {n.name!r} needs {n.tensor_parallel} GPUs per replica (tensor_parallel_size "
                    f"{n.tensor_parallel}) but only {gpus} {'is' if gpus == 1 else 'are'} available"
                    for n in needs if n.tensor_parallel > gpus]
        if memory:
            problems += [f"model {n.name!r} needs {n.per_device():.1f} GiB per GPU ({n.why}) but a GPU has "
                         f"{max(memory):.1f} GiB, {LIMIT} of it usable: raise tensor_parallel_size, lower "
                         "max_model_len or serve.kv_cache_gb, or state serve.memory_gb"
                         for n in needs if n.tensor_parallel <= gpus and n.utilization is None
                         and n.per_device() is not None and n.per_device() > LIMIT * max(memory)]
        if problems:
            raise PlanError(f"{len(problems)} model(s) do not fit on {gpus} GPU(s)", problems)
        reps = {n.name: max(1, min(n.replicas, gpus // n.tensor_parallel)) for n in needs}
        notes += [f"model {n.name!r}: {n.replicas} replicas of {n.tensor_parallel} GPU(s) do not fit on {gpus} "
                  f"GPU(s); running {reps[n.name]}" for n in needs if reps[n.name] < n.replicas]
        if memory is None:
            notes.append("GPU memory unknown: every server gets whole GPUs (give --gpu-memory GB to share "
                         "GPUs by memory)")
            demand = {n.name: reps[n.name] * n.tensor_parallel for n in needs}
            fits = (lambda ms, strict=True: sum(demand[m] for m in ms) <= gpus)
        else:
            fits = (lambda ms, strict=True: pack(needs, sorted(ms, key=list(by_name).index), reps, memory) is not None)
    else:
        reps = {n.name: n.replicas for n in needs}
        usable = None if cpu_memory_gb is None else LIMIT * cpu_memory_gb
        fits = (lambda ms, strict=True: _cpu_fits(needs, sorted(ms, key=list(by_name).index), reps, usable,
                                                  cpu_total_gb, strict))
        if usable is None:
            notes.append("CPU memory unknown: every managed server runs on the CPU, side by side in one wave")
        for n in needs:
            size = _cpu_need(n, cpu_total_gb)
            if usable is not None and size is not None and size > usable:
                notes.append(f"model {n.name!r} needs {size:.1f} GiB, more than the {usable:.1f} GiB usable here; "
                             "it runs alone and vLLM decides")
    mode = "cpu" if not gpus else "gpu" if memory else "whole"
    where = (f"on {gpus} GPU(s) of {min(memory):.0f} GiB, {LIMIT} of each usable" if mode == "gpu"
             else f"on {gpus} GPU(s), whole GPUs per server" if mode == "whole"
             else f"in {LIMIT * cpu_memory_gb:.1f} GiB usable ({LIMIT} of {cpu_memory_gb:.1f} GiB available)"
             if cpu_memory_gb is not None else "on the CPU")
    say = (lambda ms: ", ".join(_describe_need(by_name[m], mode, reps) for m in ms))
    groups: list[list[int]] = [[]]
    reasons = [""]
    models: list[str] = []  # the models of the current wave, in order
    for s, stage_users in enumerate(users):
        joined = list(dict.fromkeys(models + stage_users))
        free_join = set(models) <= set(stage_users) and fits(joined, strict=False)  # the stage needs them anyway
        if groups[-1] and not fits(joined) and not free_join:
            new = [m for m in stage_users if m not in models] or stage_users
            reasons.append(f"stage {stage(s)} needs {say(new)}, which does not fit beside {say(models)} {where}")
            groups.append([])
            models = []
        models = list(dict.fromkeys(models + stage_users))
        if not fits(models, strict=False):
            raise PlanError(f"stage {stage(s)} asks models {', '.join(models)} at once, and they do not fit "
                            f"together: {say(models)} {where}")
        if not fits(models):
            notes.append(f"stage {stage(s)} asks models of unknown size at once ({say(models)}): they run side by "
                         "side; state serve.memory_gb to plan them")
        groups[-1].append(s)
    waves = [_wave(needs, stages, users, reps, gpus, memory, reason) for stages, reason in zip(groups, reasons)]
    if len(waves) > 1:
        seen = {n.name: [w for w, wave in enumerate(waves, 1) if n.name in wave.models] for n in needs}
        notes += [f"model {m!r} is used in waves {', '.join(map(str, ws))}: its servers are started again in each"
                  for m, ws in seen.items() if len(ws) > 1]
    return Plan(gpus, waves, list(dict.fromkeys(notes)), names, memory, None if gpus else cpu_memory_gb,
                None if gpus else cpu_total_gb)


def _wave(needs, stages, users, reps, gpus, memory, reason) -> Wave:
    by_name = {n.name: n for n in needs}
    order = list(dict.fromkeys(m for s in stages for m in users[s]))
    devs: dict[tuple[str, int], list[int]] = {}
    shares: dict[tuple[str, int], float | None] = {}
    if gpus and memory:
        g = pack(needs, order, reps, memory)
        for d, servers in enumerate(g.on):
            for n, r in servers:
                devs.setdefault((n.name, r), []).append(d)
        shares = g.shares()
    elif gpus:
        free = [True] * gpus
        for n, r in sorted(((by_name[m], r) for m in order for r in range(reps[m])), key=lambda s: -s[0].tensor_parallel):
            devs[n.name, r] = whole_block(free, n.tensor_parallel)
            free = [f and i not in devs[n.name, r] for i, f in enumerate(free)]
    out = []
    for m in order:
        n = by_name[m]
        for r in range(reps[m]):
            share = n.utilization if n.utilization is not None else shares.get((m, r))
            mem = n.per_device() if gpus else n.memory_gb
            out.append(Placement(m, r, devs.get((m, r), []), share, mem, n.kv_cache_gb, n.utilization is not None,
                                 n.kv_pinned, n.why))
    return Wave(list(stages), out, reason)


def plan_for(cfg, gpus: int | None = None, gpu_memory: float | None = None, base_dir=None) -> Plan:
    """The plan of a PipelineConfig: on ``gpus`` GPUs of ``gpu_memory`` GiB (None: this machine's)."""
    from modelyard.placement import capacity, sizer

    n_gpus, memory, cpu = capacity(gpus, gpu_memory)
    size = sizer(cfg, "gpu" if n_gpus else "cpu", base_dir)
    steps = plan_steps(cfg)
    as_steps = SimpleNamespace(models=cfg.models, stages=[SimpleNamespace(name=n, models_used=m)
                                                          for _, _, n, m in steps])
    p = plan(needs_from_config(as_steps, size), n_gpus, [n for _, _, n, _ in steps], memory,
             None if cpu is None else cpu[1], None if cpu is None else cpu[0])
    return _by_stage(p, steps, [s.name for s in cfg.stages], cfg)


def plan_steps(cfg) -> list[tuple[int, int | None, str, list[str]]]:
    """What the planner cuts into waves: (stage, cascade tier or None, name, models) in order. A
    cascade is one step per tier (its model, and the judge of the tiers before the last), so that
    tiers whose models cannot be resident together run in waves: tier 1 on every shard, then tier 2
    on the rows it sent on. A calibrated cascade stays whole: every tier answers its sample."""
    out = []
    for i, st in enumerate(cfg.stages):
        tiers = st.cascade or []
        if len(tiers) > 1 and st.calibrate is None:
            judge = [st.judge.model] if st.judge else []
            out += [(i, j, f"{st.name}[tier {j}]", list(dict.fromkeys([t.model, *(judge if j < len(tiers) - 1 else [])])))
                    for j, t in enumerate(tiers)]
        else:
            out.append((i, None, st.name, st.models_used))
    return out


def _by_stage(p: Plan, steps, stage_names: list[str], cfg) -> Plan:
    """The plan of steps as a plan of stages: a wave's stages, and the tiers of a cascade it holds
    only some of."""
    for wave in p.waves:
        held = [steps[k] for k in wave.stages]
        wave.stages = list(dict.fromkeys(i for i, _, _, _ in held))
        for i in wave.stages:
            tiers = [j for s, j, _, _ in held if s == i and j is not None]
            if tiers and len(tiers) < len(cfg.stages[i].cascade):
                wave.tiers[i] = (min(tiers), max(tiers))
    p.stage_names = stage_names
    return p


def wave_models(cfg, wave: Wave) -> list[str]:
    """The models a wave's stages ask (only the tiers it holds of a cascade split across waves)."""
    out: list[str] = []
    for i in wave.stages:
        st = cfg.stages[i]
        span = wave.tiers.get(i)
        if span is None:
            out += st.models_used
        else:
            last = len(st.cascade) - 1
            out += [st.cascade[j].model for j in range(span[0], span[1] + 1)]
            out += [st.judge.model] if st.judge and span[0] < last else []
    return list(dict.fromkeys(out))
