"""What a managed model needs in memory: weights, KV cache budget, runtime. Plain logic, no Prefect.

- **weights**: the size of the weight files (``*.safetensors``, else ``*.bin``/``*.pt``/``*.pth``/``*.gguf``)
  of the model's folder: a local path, a builtin's folder, or its snapshot in the Hugging Face cache
  (looked up, never downloaded). ``serve.memory_gb`` states the whole need instead.
- **KV cache**: ``serve.kv_cache_gb``; else ``max_num_seqs x max_model_len`` tokens at the bytes per token
  of the model's ``config.json`` (2 x layers x KV heads x head size x dtype size), vLLM's defaults for
  what is unset (128 sequences on the CPU, 256 on a GPU; the model's context length), at most
  ``KV_CAP_GB`` but never less than one full sequence (vLLM refuses to start without room for one).
  Encoder-only models (BERT and its kin) keep no KV cache in vLLM. A value the user pins for the
  server itself (``VLLM_CPU_KVCACHE_SPACE``, ``serve.args.kv_cache_memory_bytes``) is taken as it is.
- **runtime**: what a server holds beside them: on a GPU the CUDA context, activations and CUDA
  graphs (per GPU); on the CPU the API server's, engine's and worker's processes.

All sizes are GiB (2**30 bytes), as vLLM and nvidia-smi count them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30
KV_CAP_GB = 4.0  # a default KV budget beyond this buys concurrency few batch jobs reach on one server
KV_FLOOR_GB = 1 / 16  # 64 MiB: the smallest budget handed to a server (and what the CPU backend gets for BERTs)
GPU_RUNTIME_GB = 2.0  # per GPU: CUDA context, activation peak, CUDA graphs
CPU_RUNTIME_GB = 1.75  # per server on the CPU: API server, engine core, worker (1.5-1.7 GiB PSS measured here)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet",
                "modernbert", "nomic_bert", "camembert", "xlm", "albert", "new"}
DEFAULT_MAX_NUM_SEQS = {"cpu": 128, "gpu": 256}  # vLLM 0.32's defaults for its OpenAI server


@dataclass(frozen=True)
class Need:
    """What one replica of a managed server needs, in GiB (None: not known)."""

    weights_gb: float | None
    kv_cache_gb: float
    runtime_gb: float
    stated_gb: float | None = None  # serve.memory_gb: the user's figure for the whole server
    kv_pinned: bool = False  # the user set the server's own KV cache size: modelyard passes none
    kv_note: str = ""  # how the KV budget was found

    @property
    def total_gb(self) -> float | None:
        if self.stated_gb is not None:
            return self.stated_gb
        return None if self.weights_gb is None else self.weights_gb + self.kv_cache_gb + self.runtime_gb

    def per_device_gb(self, tensor_parallel: int) -> float | None:
        """Weights and KV cache split over the tensor-parallel GPUs; each GPU keeps its own runtime."""
        if self.stated_gb is not None:
            return self.stated_gb / tensor_parallel
        if self.weights_gb is None:
            return None
        return (self.weights_gb + self.kv_cache_gb) / tensor_parallel + self.runtime_gb

    def explain(self, tensor_parallel: int = 1) -> str:
        if self.stated_gb is not None:
            return f"serve.memory_gb {self.stated_gb:g}"
        if self.weights_gb is None:
            return "weights not on disk: set serve.memory_gb"
        parts = f"weights {self.weights_gb:.2f} + KV cache {self.kv_cache_gb:.2f}"
        if tensor_parallel > 1:
            return f"({parts}) / {tensor_parallel} GPUs + runtime {self.runtime_gb:.1f} GiB"
        return f"{parts} + runtime {self.runtime_gb:.1f} GiB"


def hf_snapshot(model: str, revision: str | None = None) -> Path | None:
    """The model's snapshot folder in the local Hugging Face cache, if its config.json is there."""
    if "/" not in model or Path(model).expanduser().exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:  # an id the hub would not accept, a broken cache: unknown, not fatal
        return None
    return Path(found).parent if isinstance(found, str) else None


def weight_bytes(folder: Path) -> int | None:
    """Bytes of the weight files vLLM would load from ``folder`` (safetensors first, as vLLM does)."""
    files = [f for f in folder.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    chosen = safetensors or files
    return sum(f.stat().st_size for f in chosen) if chosen else None


def read_config(folder: Path | None) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text()) if folder else None
    except (OSError, ValueError):
        return None


def _first(cfg: dict, *keys: str):
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def dtype_bytes(name: str | None) -> int:
    """Bytes per element of a KV cache of this dtype; vLLM's ``auto`` halves float32 checkpoints."""
    n = str(name or "auto").lower().removeprefix("torch.")
    if n.startswith("fp8") or n.startswith("float8") or n == "int8":
        return 1
    return 4 if n in ("float32", "float", "fp32") else 2


def kv_bytes_per_token(config: dict, dtype: str | None = None, kv_dtype: str | None = None) -> int | None:
    """2 (K and V) x layers x KV heads x head size x dtype size; None when config.json does not say."""
    c = config.get("text_config") or config.get("llm_config") or config
    layers = _first(c, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _first(c, "num_attention_heads", "n_head", "num_heads")
    hidden = _first(c, "hidden_size", "n_embd", "d_model")
    if not layers or not heads:
        return None
    kv_heads = _first(c, "num_key_value_heads", "n_kv_heads", "num_kv_heads") or (1 if c.get("multi_query") else heads)
    head_dim = _first(c, "head_dim") or (hidden // heads if hidden else None)
    if not head_dim:
        return None
    if kv_dtype and kv_dtype != "auto":
        size = dtype_bytes(kv_dtype)
    elif dtype and dtype != "auto":
        size = dtype_bytes(dtype)
    else:
        size = 2  # auto: float16/bfloat16 for float32, float16 and bfloat16 checkpoints alike
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * size


def max_model_len(config: dict | None, serve) -> int:
    if serve is not None and serve.max_model_len:
        return serve.max_model_len
    c = (config or {}).get("text_config") or config or {}
    return int(_first(c, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                      "max_sequence_length") or 2048)


def pinned_kv_gb(serve, engine_env: dict[str, str], cpu_engine: bool) -> float | None:
    """A KV cache size the user set for the server itself: it wins, and modelyard passes none."""
    args = serve.args if serve is not None else {}
    if args.get("kv_cache_memory_bytes"):
        return float(args["kv_cache_memory_bytes"]) / GiB
    env = {**engine_env, **(serve.env if serve is not None else {})}
    if cpu_engine and str(env.get("VLLM_CPU_KVCACHE_SPACE", "")).strip():
        return float(env["VLLM_CPU_KVCACHE_SPACE"])  # integer GiB, as vLLM reads it
    return None


def need(model_cfg, folder: Path | None, device: str, engine_env: dict[str, str] | None = None,
         cpu_engine: bool = True) -> Need:
    """One replica's need on ``device`` ("gpu" or "cpu") from its config and its folder (None: not on disk)."""
    serve = model_cfg.serve
    config = read_config(folder)
    weights = weight_bytes(folder) if folder is not None else None
    runtime = GPU_RUNTIME_GB if device == "gpu" else CPU_RUNTIME_GB
    stated = serve.memory_gb if serve is not None else None
    pinned = pinned_kv_gb(serve, engine_env or {}, cpu_engine)
    per_token = None
    if config is not None:
        args = serve.args if serve is not None else {}
        per_token = kv_bytes_per_token(config, serve.dtype if serve else None, args.get("kv_cache_dtype"))
    if pinned is not None:
        kv, note = pinned, "set for the server by the user"
    elif serve is not None and serve.kv_cache_gb:
        kv, note = serve.kv_cache_gb, "serve.kv_cache_gb"
    elif config is not None and str(config.get("model_type", "")).lower() in ENCODER_ONLY:
        kv, note = KV_FLOOR_GB, "encoder-only model: vLLM keeps no KV cache"
    elif per_token is None:
        kv, note = 1.0, "config.json not found: 1 GiB assumed"
    else:
        tp = (serve.tensor_parallel_size if serve else None) or 1
        seqs = (serve.max_num_seqs if serve else None) or DEFAULT_MAX_NUM_SEQS[device] * (tp if device == "cpu" else 1)
        length = max_model_len(config, serve)
        wanted = seqs * length * per_token / GiB
        one = length * per_token / GiB
        kv = max(min(wanted, KV_CAP_GB), one, KV_FLOOR_GB)
        note = (f"{seqs} sequences x {length} tokens x {per_token} bytes"
                + (f", capped at {KV_CAP_GB:g} GiB" if wanted > KV_CAP_GB and kv == KV_CAP_GB else ""))
    return Need(None if weights is None else weights / GiB, kv, runtime, stated, pinned is not None, note)
