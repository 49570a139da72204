"""The placement plan in words: printed by ``modelyard run``, and the ``<job>-gpu-plan`` artifact.

Per server: its device(s) and memory share (``--gpu-memory-utilization`` on a GPU; on the CPU the
memory it is planned to take and the KV cache size it is given), what its need is made of, and per
wave boundary why the wave starts there.
"""

from __future__ import annotations


def _where(plan) -> str:
    if plan.gpus:
        gpus = f"{plan.gpus} GPU{'s' if plan.gpus != 1 else ''}"
        if not plan.gpu_memory_gb:
            return f"{gpus} of unknown memory (whole GPUs per server)"
        mems = sorted(set(plan.gpu_memory_gb))
        return f"{gpus} x {'/'.join(f'{m:.0f}' for m in mems)} GiB (shares of a GPU sum to at most 0.92)"
    if plan.cpu_available_gb is None:
        return "CPU only (no GPU)"
    total = f" of {plan.cpu_total_gb:.1f}" if plan.cpu_total_gb else ""
    return (f"CPU only (no GPU): {plan.cpu_available_gb:.1f}{total} GiB available, servers must fit in "
            f"{0.92 * plan.cpu_available_gb:.1f} GiB")


def share_text(p, gpu_memory: list[float] | None = None) -> str:
    """One server's memory: its GPU share (and what it needs), or its planned CPU memory and KV cache."""
    need = f"needs {p.memory_gb:.1f} GiB{' per GPU' if len(p.devices) > 1 else ''}: {p.why}" if (
        p.memory_gb is not None and p.why) else p.why
    if p.devices:
        if p.share is None:
            return "whole GPU" + ("s" if len(p.devices) > 1 else "") + " (vLLM's default share 0.92)" + (
                f" ({need})" if need else "")
        mem = min(gpu_memory[d] for d in p.devices) if gpu_memory else None
        of = f" = {p.share * mem:.1f} of {mem:.0f} GiB{' each' if len(p.devices) > 1 else ''}" if mem else ""
        if p.explicit:
            return f"gpu_memory_utilization {p.share:.2f}{of}, the user's"
        return f"gpu_memory_utilization {p.share:.2f}{of} ({need})"
    if p.explicit:
        return f"gpu_memory_utilization {p.share:g} of the memory node, the user's"
    if p.memory_gb is None:
        return f"size unknown ({p.why})" if p.why else "size unknown"
    kv = ("" if p.kv_cache_gb is None else f"; KV cache {p.kv_cache_gb:.2f} GiB, "
          + ("as the user set it" if p.kv_pinned else "given to vLLM"))
    return f"{p.memory_gb:.2f} GiB ({p.why}){kv}"


def describe_plan(plan) -> str:
    lines = [f"GPU plan: {_where(plan)}, {len(plan.waves)} wave{'s' if len(plan.waves) != 1 else ''}"]
    for w, wave in enumerate(plan.waves, 1):
        lines.append(f"wave {w}: stages {', '.join(plan.stage(s, wave) for s in wave.stages) or '-'}")
        if wave.reason:
            lines.append(f"  starts here because {wave.reason}")
        lines += [f"  {p.model} replica {p.replica}: {p.where()}, {share_text(p, plan.gpu_memory_gb)}"
                  for p in wave.placements] or ["  no managed model"]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_markdown(plan) -> str:
    md = [f"# GPU plan\n\n{_where(plan)}, {len(plan.waves)} wave(s).\n",
          "| wave | stages | model | replica | device | CUDA_VISIBLE_DEVICES | memory share |",
          "|---|---|---|---|---|---|---|"]
    for w, wave in enumerate(plan.waves, 1):
        stages = ", ".join(plan.stage(s, wave) for s in wave.stages)
        md += [f"| {w} | {stages} | {p.model} | {p.replica} | {p.where()} | {p.cuda_visible_devices or 'CPU'} | "
               f"{share_text(p, plan.gpu_memory_gb)} |" for p in wave.placements] or [
            f"| {w} | {stages} | - | - | - | - | - |"]
    reasons = [(w, wave.reason) for w, wave in enumerate(plan.waves, 1) if wave.reason]
    if reasons:
        md.append("\n**Why the waves**\n\n" + "\n".join(f"- wave {w}: {r}" for w, r in reasons))
    if plan.notes:
        md.append("\n**Notes**\n\n" + "\n".join(f"- {n}" for n in plan.notes))
    return "\n".join(md) + "\n"
