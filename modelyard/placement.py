"""What the planner needs from this machine and from the models: capacity and sizes.

``capacity`` is the devices a run may use: ``--gpus`` / ``--gpu-memory`` when given, else what
nvidia-smi reports; without GPUs, the CPU memory node's total and available memory, where the
memory this process's own managed servers hold counts as available (a run that reuses them, or
plans again while they start, sees the same room). ``sizer`` finds each managed model's folder
(a local path, a builtin, the Hugging Face cache) and sizes it with ``modelyard.sizing``.
"""

from __future__ import annotations

from pathlib import Path

from modelyard import devices, sizing
from modelyard.errors import UserError


def capacity(gpus: int | None, gpu_memory: float | None) -> tuple[int, list[float] | None, tuple | None]:
    """(GPUs, memory per GPU or None, (CPU total, CPU available) or None) for a run here."""
    if gpus is not None and gpus < 0:
        return gpus, None, None  # the planner names the mistake
    if gpu_memory is not None and gpu_memory <= 0:
        raise UserError(f"--gpu-memory {gpu_memory:g}: give each GPU's memory in GiB, e.g. --gpu-memory 80")
    n = devices.detect_gpus() if gpus is None else gpus
    if gpu_memory is not None and not n:
        raise UserError("--gpu-memory: there is no GPU here; plan for another machine with --gpus N --gpu-memory GB")
    if gpu_memory is not None:
        memory = [float(gpu_memory)] * n
    else:  # this machine's GPUs (a plan for more GPUs than found takes the smallest for the rest)
        found = devices.gpu_memory_gb() if n else None
        memory = (found + [min(found)] * n)[:n] if found else None
    if n:
        return n, memory, None
    cpu = devices.cpu_memory_gb()
    if cpu is None:
        return 0, None, None
    from modelyard.serving import REGISTRY

    total, available = cpu
    return 0, None, (total, min(total, available + REGISTRY.held_gb()))


def model_folder(model_cfg, python: str | None) -> Path | None:
    """Where the model's files are on this machine, if they are: builtins, local folders, the HF cache."""
    ref = model_cfg.model
    if ref.startswith("builtin:"):
        if python is None:
            return None
        from modelyard.errors import EngineError
        from modelyard.serving import resolve_model

        try:
            return Path(resolve_model(ref, python)[0])
        except EngineError:
            return None
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    return sizing.hf_snapshot(ref, model_cfg.revision)


def sizer(cfg, device: str, base_dir: Path | None = None):
    """``size(name, model_cfg) -> sizing.Need`` for the planner, on ``device`` ("gpu" or "cpu")."""
    from modelyard.errors import EngineError
    from modelyard.serving import engine_is_cpu, engine_python

    try:
        python = engine_python(cfg.engine, base_dir)
        cpu_engine = engine_is_cpu(python)
    except EngineError:  # no engine here: sizes from what is on disk; the start reports the engine
        python, cpu_engine = None, device == "cpu"

    def size(name: str, model_cfg) -> sizing.Need:
        return sizing.need(model_cfg, model_folder(model_cfg, python), device, cfg.engine.env, cpu_engine)

    return size
