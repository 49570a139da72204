"""What this machine offers managed servers: its GPUs and their memory, or its CPU memory. Plain logic.

GPUs come from ``nvidia-smi`` narrowed by ``CUDA_VISIBLE_DEVICES``. On the CPU, vLLM's backend binds a
server's memory to the NUMA node of its first CPU and checks that node's available memory
(``MemFree + Active(file) + Inactive(file) + SReclaimable``, clamped to the cgroup's limit), so the
planner counts the same way. Detection never stops a run: what cannot be read is unknown (None).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from itertools import takewhile
from pathlib import Path

GiB = 2**30


def visible() -> list[str] | None:
    """This process's CUDA_VISIBLE_DEVICES entries (CUDA stops at the first invalid one)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    parts = (p.strip() for p in raw.split(",")) if raw is not None else None
    return None if parts is None else list(takewhile(lambda p: p and not p.startswith("-"), parts))


def _smi(*args: str) -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.splitlines() if r.returncode == 0 else []


def detect_gpus() -> int:
    """GPUs this process may use: ``nvidia-smi -L``, narrowed by CUDA_VISIBLE_DEVICES; else 0."""
    try:
        lines = _smi("-L")
        smi = None if lines is None else sum(ln.startswith("GPU ") for ln in lines)
        vis = visible()
        return (smi or 0) if vis is None else len(vis) if smi is None else min(len(vis), smi)
    except Exception:  # detection must never stop a run
        return 0


def gpu_memory_gb() -> list[float] | None:
    """Total memory of each GPU this process may use, in GiB, in CUDA's order; None if unknown."""
    try:
        rows = [[c.strip() for c in ln.split(",")] for ln in _smi(
            "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits") or []]
        mem = {r[0]: float(r[2]) / 1024 for r in rows if len(r) == 3}
        mem.update({r[1]: float(r[2]) / 1024 for r in rows if len(r) == 3})
        if not rows:
            return None
        vis = visible()
        if vis is None:
            return [float(r[2]) / 1024 for r in rows]
        found = [next((m for k, m in mem.items() if k == v or (v.startswith("GPU-") and k.startswith(v))), None)
                 for v in vis]
        return [m if m is not None else min(mem.values()) for m in found[:len(rows)]]
    except (ValueError, IndexError):
        return None


def _node_of_first_cpu() -> int:
    try:
        cpu = min(os.sched_getaffinity(0))
        nodes = [p.name for p in Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*")]
        return int(nodes[0][4:]) if nodes else 0
    except (OSError, ValueError, AttributeError):
        return 0


def _cgroup_limit() -> tuple[int | None, int | None]:
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit).read_text().strip()
            if raw != "max" and int(raw) < 2**60:
                return int(raw), int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
    return None, None


def cpu_memory_gb() -> tuple[float, float] | None:
    """(total, available) GiB of the memory node vLLM's CPU backend binds a server to; None if unknown."""
    try:
        info = {}
        path = Path(f"/sys/devices/system/node/node{_node_of_first_cpu()}/meminfo")
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                info[parts[2].rstrip(":")] = int(parts[3]) * 1024
            total = info["MemTotal"]
            avail = info["MemFree"] + info["Active(file)"] + info["Inactive(file)"] + info["SReclaimable"]
        else:
            import psutil

            vm = psutil.virtual_memory()
            total, avail = vm.total, vm.available
        limit, usage = _cgroup_limit()
        if limit is not None and limit < total:
            total, avail = limit, max(0, min(avail, limit - (usage or 0)))
        return total / GiB, avail / GiB
    except Exception:  # detection must never stop a run
        return None
