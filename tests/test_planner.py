"""The planner: concrete plans for many GPU counts, memories and model mixes, without a GPU.

Whole GPUs per server when GPU memory is unknown (the first table); placement by memory (model
folders with real config.json files and weight files of real size, written sparse) for the cases
the placement issue names: 1 x 80 GiB with a 0.6B, an embedder and an 8B; 1 x 24 GiB with two 8B;
8 x 80 GiB with a 70B at tensor parallel 4 and an 8B with 4 replicas; explicit utilizations that
overflow; a CPU-only machine with 24 GiB and two, three and four models."""

from __future__ import annotations

import math
import os
import random
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from modelyard import devices, packing, planner
from modelyard.config import parse_config
from modelyard.errors import UserError
from modelyard.planner import ModelNeed, Placement, Plan, PlanError, Wave, detect_gpus, needs_from_config, plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_inherited_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def need(name, stages, tp=1, replicas=1):
    stages = (stages,) if isinstance(stages, int) else tuple(stages)
    return ModelNeed(name, stages[0], stages[-1], tensor_parallel=tp, replicas=replicas, stages=stages)


def shape(p: Plan) -> list[tuple[list[int], dict[str, list[int]]]]:
    """A plan as [(stages, {"model#replica": devices})] for exact comparison."""
    return [(w.stages, {f"{pl.model}#{pl.replica}": pl.devices for pl in w.placements}) for w in p.waves]


# (id, needs, gpus, expected waves, substrings expected in the notes)
CASES = [
    ("cpu-everything-one-wave", [need("a", 0), need("b", 1, tp=2, replicas=2)], 0,
     [([0, 1], {"a#0": [], "b#0": [], "b#1": []})], ["CPU memory unknown"]),
    ("1gpu-one-model-two-stages", [need("a", [0, 1])], 1,
     [([0, 1], {"a#0": [0]})], []),
    ("1gpu-two-models-two-waves", [need("a", 0), need("b", 1)], 1,
     [([0], {"a#0": [0]}), ([1], {"b#0": [0]})],
     ["stage 1 needs b (1 GPU), which does not fit beside a (1 GPU) on 1 GPU(s), whole GPUs per server"]),
    ("2gpu-two-models-side-by-side", [need("a", 0), need("b", 1)], 2,
     [([0, 1], {"a#0": [0], "b#0": [1]})], []),
    ("2gpu-demo-shape", [need("embedder", 0), need("tiny", [1, 2, 3])], 2,
     [([0, 1, 2, 3], {"embedder#0": [0], "tiny#0": [1]})], []),
    ("2gpu-tp2-then-tp1", [need("a", 0, tp=2), need("b", 1)], 2,
     [([0], {"a#0": [0, 1]}), ([1], {"b#0": [0]})], ["stage 1 needs b (1 GPU), which does not fit beside a (2 GPUs)"]),
    ("3gpu-tp2-and-tp1", [need("a", 0, tp=2), need("b", 1)], 3,
     [([0, 1], {"a#0": [0, 1], "b#0": [2]})], []),
    ("4gpu-replicas-and-tp2", [need("a", 0, replicas=2), need("b", 1, tp=2)], 4,
     [([0, 1], {"a#0": [2], "a#1": [3], "b#0": [0, 1]})], []),
    ("4gpu-tp-groups-aligned", [need("a", 0), need("b", 1, tp=2), need("c", 2)], 4,
     [([0, 1, 2], {"a#0": [2], "b#0": [0, 1], "c#0": [3]})], []),
    ("4gpu-three-tp2-models-two-waves", [need("a", 0, tp=2), need("b", 1, tp=2), need("c", 2, tp=2)], 4,
     [([0, 1], {"a#0": [0, 1], "b#0": [2, 3]}), ([2], {"c#0": [0, 1]})],
     ["stage 2 needs c (2 GPUs), which does not fit beside a (2 GPUs), b (2 GPUs) on 4 GPU(s)"]),
    ("4gpu-replicas-reduced", [need("a", 0, tp=2, replicas=3)], 4,
     [([0], {"a#0": [0, 1], "a#1": [2, 3]})], ["3 replicas of 2 GPU(s) do not fit on 4 GPU(s); running 2"]),
    ("4gpu-tp4-fills-machine", [need("a", 0, tp=4), need("b", 1, replicas=4)], 4,
     [([0], {"a#0": [0, 1, 2, 3]}), ([1], {"b#0": [0], "b#1": [1], "b#2": [2], "b#3": [3]})],
     ["b (4 GPUs), which does not fit beside a (4 GPUs)"]),
    ("8gpu-tp4-tp2x2", [need("a", 0, tp=4), need("b", 1, tp=2, replicas=2)], 8,
     [([0, 1], {"a#0": [0, 1, 2, 3], "b#0": [4, 5], "b#1": [6, 7]})], []),
    ("8gpu-mixed-aligned", [need("a", 0, replicas=2), need("b", 1, tp=2), need("c", 2, tp=4)], 8,
     [([0, 1, 2], {"a#0": [6], "a#1": [7], "b#0": [4, 5], "c#0": [0, 1, 2, 3]})], []),
    ("8gpu-more-than-fit-waves", [need("a", 0, replicas=4), need("b", 1, tp=4), need("c", 2, replicas=2)], 8,
     [([0, 1], {"a#0": [4], "a#1": [5], "a#2": [6], "a#3": [7], "b#0": [0, 1, 2, 3]}),
      ([2], {"c#0": [0], "c#1": [1]})], ["stage 2 needs c (2 GPUs), which does not fit beside a (4 GPUs), b (4 GPUs)"]),
    ("8gpu-replicas-capped", [need("a", 0, replicas=16)], 8,
     [([0], {f"a#{i}": [i] for i in range(8)})], ["16 replicas of 1 GPU(s) do not fit on 8 GPU(s); running 8"]),
    ("more-models-than-gpus", [need(m, i) for i, m in enumerate("abcde")], 2,
     [([0, 1], {"a#0": [0], "b#0": [1]}), ([2, 3], {"c#0": [0], "d#0": [1]}), ([4], {"e#0": [0]})],
     ["stage 2 needs c (1 GPU)", "stage 4 needs e (1 GPU), which does not fit beside c (1 GPU), d (1 GPU)"]),
    ("non-adjacent-restarted", [need("a", [0, 2]), need("b", 1)], 1,
     [([0], {"a#0": [0]}), ([1], {"b#0": [0]}), ([2], {"a#0": [0]})],
     ["model 'a' is used in waves 1, 3: its servers are started again in each"]),
    ("non-adjacent-fits-once", [need("a", [0, 2]), need("b", 1)], 2,
     [([0, 1, 2], {"a#0": [0], "b#0": [1]})], []),
    ("non-adjacent-shares-first-wave", [need("a", [0, 3]), need("b", 1), need("c", 2)], 2,
     [([0, 1], {"a#0": [0], "b#0": [1]}), ([2, 3], {"c#0": [0], "a#0": [1]})],
     ["model 'a' is used in waves 1, 2"]),
]


@pytest.mark.parametrize("needs,gpus,expected,notes", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_table(needs, gpus, expected, notes):
    p = plan(needs, gpus)
    assert shape(p) == expected
    assert p.gpus == gpus
    said = p.notes + [w.reason for w in p.waves]
    for n in notes:
        assert any(n in note for note in said), (n, said)
    assert [bool(w.reason) for w in p.waves] == [False] + [True] * (len(p.waves) - 1)
    if gpus:
        assert any("GPU memory unknown: every server gets whole GPUs" in n for n in p.notes)
        assert all(pl.share is None for w in p.waves for pl in w.placements)  # vLLM's default: the whole GPU
    check_invariants(p, needs, gpus)


def check_invariants(p: Plan, needs: list[ModelNeed], gpus: int, n_stages: int | None = None) -> None:
    stages = [s for w in p.waves for s in w.stages]
    assert stages == list(range(n_stages if n_stages is not None else max(s for n in needs for s in n.used) + 1))
    by_name = {n.name: n for n in needs}
    for w in p.waves:
        used = [d for pl in w.placements for d in pl.devices]
        assert len(used) == len(set(used)), f"a device is used twice in a wave: {w}"
        assert all(0 <= d < gpus for d in used)
        assert len(used) <= gpus
        for pl in w.placements:
            tp = by_name[pl.model].tensor_parallel
            if gpus:
                assert len(pl.devices) == tp
                assert pl.devices == list(range(pl.devices[0], pl.devices[0] + tp))
                if gpus % tp == 0:
                    assert pl.devices[0] % tp == 0, f"tp group not aligned: {pl}"
            else:
                assert pl.devices == []
        for n in needs:  # a model is in a wave exactly when one of the wave's stages uses it
            uses = any(s in n.used for s in w.stages)
            reps = [pl.replica for pl in w.placements if pl.model == n.name]
            if uses:
                expected = n.replicas if not gpus else max(1, min(n.replicas, gpus // n.tensor_parallel))
                assert reps == list(range(expected))
            else:
                assert reps == []


def test_invariants_over_many_mixes():
    rnd = random.Random(7)
    for _ in range(400):
        gpus = rnd.choice([0, 1, 2, 4, 8])
        n_stages = rnd.randint(1, 6)
        models = [f"m{i}" for i in range(rnd.randint(1, 4))]
        used: dict[str, list[int]] = {}
        for s in range(n_stages):
            used.setdefault(rnd.choice(models), []).append(s)
        needs = [need(m, idx, tp=rnd.choice([1, 1, 2, 4]), replicas=rnd.choice([1, 1, 2, 3]))
                 for m, idx in used.items()]
        if any(n.tensor_parallel > gpus for n in needs) and gpus:
            with pytest.raises(PlanError):
                plan(needs, gpus)
            continue
        p = plan(needs, gpus)
        check_invariants(p, needs, gpus, n_stages)
        if gpus == 0 or sum(n.tensor_parallel * n.replicas for n in needs) <= gpus:
            assert len(p.waves) == 1
        else:  # greedy: no wave could have taken the next wave's first stage
            for w, nxt in zip(p.waves, p.waves[1:]):
                joined = {n.name for n in needs if any(s in n.used for s in w.stages + nxt.stages[:1])}
                demand = sum(by.tensor_parallel * min(by.replicas, gpus // by.tensor_parallel)
                             for by in needs if by.name in joined)
                assert demand > gpus
        text = p.describe()
        for i in range(1, len(p.waves) + 1):
            assert f"wave {i}:" in text


@pytest.mark.parametrize("needs,gpus,fragments", [
    ([need("big", 0, tp=4)], 2, ["'big'", "4 GPUs per replica", "tensor_parallel_size 4", "only 2 are available"]),
    ([need("a", 0), need("big", 1, tp=2)], 1, ["'big'", "2 GPUs per replica", "only 1 is available"]),
    ([need("huge", 0, tp=8), need("ok", 1, tp=2)], 4, ["'huge'", "8 GPUs per replica", "only 4 are available"]),
])
def test_model_too_big(needs, gpus, fragments):
    with pytest.raises(PlanError) as e:
        plan(needs, gpus)
    assert isinstance(e.value, UserError)
    for f in fragments:
        assert f in str(e.value)
    assert "'ok'" not in str(e.value)


def test_every_model_too_big_is_listed():
    with pytest.raises(PlanError) as e:
        plan([need("x", 0, tp=4), need("y", 1, tp=8)], 2)
    assert len(e.value.problems) == 2
    assert "'x'" in str(e.value) and "'y'" in str(e.value)


@pytest.mark.parametrize("free,size,expected", [
    ([False, True, True, True], 2, [2, 3]),  # never [1, 2]
    ([True, True, False, True, True, True], 2, [0, 1]),
    ([False, True, True, True, True, True, True, False], 4, [1, 2, 3, 4]),  # no aligned block: contiguous
    ([True, False, True, False], 2, [0, 2]),  # last resort: any free devices
    ([False, False, True, True, True, True, True, True], 3, [3, 4, 5]),  # aligned to 3
])
def test_device_blocks(free, size, expected):
    assert packing.whole_block(free, size) == expected


def test_too_big_is_fine_on_cpu():
    assert shape(plan([need("big", 0, tp=8)], 0)) == [([0], {"big#0": []})]


def test_negative_gpus():
    with pytest.raises(PlanError, match="--gpus -1"):
        plan([need("a", 0)], -1)


def test_external_stages_join_the_running_wave():
    # stage 1 uses an external model (no need); the pipeline has 4 stages
    p = plan([need("a", 0), need("b", 2)], 1, ["cls", "ext", "sum", "ext2"])
    assert shape(p) == [([0, 1], {"a#0": [0]}), ([2, 3], {"b#0": [0]})]
    assert plan([], 2, ["only_external"]).waves == [Wave([0], [])]


def test_describe_and_markdown():
    needs = [need("small", 0, replicas=2), need("big", 1, tp=2), need("emb", 2)]
    p = plan(needs, 2, ["classify", "summarize", "embed"])
    text = p.describe()
    assert text.splitlines()[0] == "GPU plan: 2 GPUs of unknown memory (whole GPUs per server), 3 waves"
    assert "wave 1: stages 0:classify" in text
    assert "  small replica 0: GPU 0, whole GPU (vLLM's default share 0.92)" in text
    assert "  small replica 1: GPU 1, whole GPU (vLLM's default share 0.92)" in text
    assert "wave 2: stages 1:summarize" in text and "  big replica 0: GPUs 0,1, whole GPUs" in text
    assert ("  starts here because stage 1:summarize needs big (2 GPUs), which does not fit beside small "
            "(2 GPUs) on 2 GPU(s), whole GPUs per server") in text
    assert "wave 3: stages 2:embed" in text and "  emb replica 0: GPU 0" in text
    md = p.to_markdown()
    assert md.startswith("# GPU plan")
    assert "| 2 | 1:summarize | big | 0 | GPUs 0,1 | 0,1 | whole GPUs (vLLM's default share 0.92) |" in md
    assert sum(line.startswith("| ") and line[2].isdigit() for line in md.splitlines()) == 4
    assert "**Why the waves**" in md and "- wave 3: stage 2:embed needs emb (1 GPU)" in md
    cpu = plan([need("a", [0, 1])], 0, ["x", "y"])
    assert "CPU only" in cpu.describe() and "a replica 0: CPU" in cpu.describe()
    assert "| 1 | 0:x, 1:y | a | 0 | CPU | CPU |" in cpu.to_markdown()
    assert "no managed model" in plan([], 1, ["e"]).describe()


def test_cuda_visible_devices(monkeypatch):
    assert Placement("a", 0, [2, 3]).cuda_visible_devices == "2,3"
    assert Placement("a", 0, []).cuda_visible_devices is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # this process was given GPUs 4-7
    assert Placement("a", 0, [0, 1]).cuda_visible_devices == "4,5"
    assert Placement("a", 0, [3]).cuda_visible_devices == "7"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb")
    assert Placement("a", 1, [1]).cuda_visible_devices == "GPU-bbb"


def _yaml(models: str, stages: str) -> str:
    return f"""
name: t
input: {{uri: x.jsonl}}
models:
{models}
stages:
{stages}
output: {{uri: out/}}
"""


def test_needs_from_config():
    cfg = parse_config(_yaml(
        "  small: {model: m1, serve: {max_model_len: 512}}\n"
        "  big: {model: m2, serve: {tensor_parallel_size: 2}}\n"
        "  remote: {model: m3, endpoints: ['http://h:8000/v1']}\n"
        "  plain: {model: m4}\n"
        "  unused: {model: m5, serve: {tensor_parallel_size: 8}}\n",
        "  - {name: a, model: small, prompt: x, output: a}\n"
        "  - {name: b, model: remote, prompt: x, output: b}\n"
        "  - {name: c, model: big, prompt: x, output: c}\n"
        "  - {name: d, model: small, prompt: x, output: d}\n"
        "  - {name: e, model: plain, prompt: x, output: e}\n"), "t.yaml")
    needs = needs_from_config(cfg)
    assert needs == [ModelNeed("small", 0, 3, 1, 1, (0, 3)), ModelNeed("big", 2, 2, 2, 1, (2,)),
                     ModelNeed("plain", 4, 4, 1, 1, (4,))]
    p = planner.plan_for(cfg, gpus=2)
    assert shape(p) == [([0, 1], {"small#0": [0]}), ([2], {"big#0": [0, 1]}),
                        ([3, 4], {"small#0": [0], "plain#0": [1]})]
    assert p.stage_names == ["a", "b", "c", "d", "e"]


def test_needs_reads_replicas_when_present():
    serve = SimpleNamespace(tensor_parallel_size=None, replicas=3)
    cfg = SimpleNamespace(models={"m": SimpleNamespace(managed=True, serve=serve)},
                          stages=[SimpleNamespace(model="m", name="s", models_used=["m"])])
    assert needs_from_config(cfg) == [ModelNeed("m", 0, 0, 1, 3, (0,))]
    assert shape(plan(needs_from_config(cfg), 4)) == [([0], {"m#0": [0], "m#1": [1], "m#2": [2]})]


def test_demo_config_needs(monkeypatch):
    from modelyard.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", {"date": "2026-11-27"}).config
    assert [(n.name, n.used) for n in needs_from_config(cfg)] == [("embedder", (0,)), ("tiny", (1, 2, 3)),
                                                                  ("small", (1,))]
    monkeypatch.setattr(devices, "cpu_memory_gb", lambda: (16.0, 12.0))
    assert shape(planner.plan_for(cfg, 0)) == [([0, 1, 2, 3], {"embedder#0": [], "tiny#0": [], "small#0": []})]
    with pytest.raises(PlanError, match=r"stage 1:classify asks models tiny, small at once"):
        planner.plan_for(cfg, 1)  # the cascade asks both: two whole GPUs
    # 5 GiB: the cascade's two models share the GPU, the embedder gets its own wave
    p = planner.plan_for(cfg, 1, gpu_memory=5)
    assert shape(p) == [([0], {"embedder#0": [0]}), ([1, 2, 3], {"tiny#0": [0], "small#0": [0]})]
    assert p.waves[1].reason.startswith("stage 1:classify needs tiny (2.1 GiB), small (2.1 GiB), which does not "
                                        "fit beside embedder (2.1 GiB) on 1 GPU(s) of 5 GiB")
    assert shape(planner.plan_for(cfg, 1, gpu_memory=16)) == [
        ([0, 1, 2, 3], {"embedder#0": [0], "tiny#0": [0], "small#0": [0]})]


def _fake_smi(tmp_path: Path, body: str) -> None:
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("smi,cvd,expected", [
    (None, None, 0),
    (None, "0,1,2", 3),
    (None, "", 0),
    (None, "-1", 0),
    (None, "0,-1,2", 1),
    ("printf 'GPU 0: A100 (UUID: GPU-a)\\nGPU 1: A100 (UUID: GPU-b)\\n'", None, 2),
    ("printf 'GPU 0: A100 (UUID: GPU-a)\\n  MIG 1g.5gb Device 0: (UUID: MIG-x)\\n'", None, 1),
    ("printf 'GPU 0: x\\nGPU 1: x\\nGPU 2: x\\nGPU 3: x\\n'", "1,3", 2),
    ("printf 'GPU 0: x\\n'", "0,1,2", 1),
    ("echo 'No devices were found'; exit 6", None, 0),
    ("echo 'No devices were found'; exit 6", "0", 0),
])
def test_detect_gpus(tmp_path, monkeypatch, smi, cvd, expected):
    if smi is not None:
        _fake_smi(tmp_path, smi)
    monkeypatch.setenv("PATH", str(tmp_path))
    if cvd is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
    assert detect_gpus() == expected


def test_detect_gpus_never_raises(monkeypatch):
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/nonexistent/nvidia-smi")
    assert detect_gpus() == 0  # OSError from subprocess is swallowed
    assert devices.gpu_memory_gb() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert detect_gpus() == 2  # nvidia-smi failed to run: CUDA_VISIBLE_DEVICES decides

    def boom(*a, **k):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(devices, "visible", boom)
    assert detect_gpus() == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


# --- placement by memory -------------------------------------------------------------------------

# config.json fields of real checkpoints (Hugging Face), and the sizes of their weight files
ARCH = {
    "qwen3-0.6b": ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 28,
                    "max_position_embeddings": 40960, "torch_dtype": "bfloat16"}, [1_503_300_328]),
    "qwen3-1.7b": ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 28,
                    "max_position_embeddings": 40960, "torch_dtype": "bfloat16"}, [3_441_185_608, 622_329_984]),
    "bge-base": ({"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 768,
                  "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 512,
                  "torch_dtype": "float32"}, [437_951_328]),
    "llama-3.1-8b": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
                      "max_position_embeddings": 131072, "torch_dtype": "bfloat16"},
                     [4_976_698_672, 4_999_802_720, 4_915_916_176, 1_168_138_808]),
    "llama-3.1-70b": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
                       "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
                       "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}, [4_703_580_464] * 30),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """One folder per checkpoint: its config.json and weight files of their real size (sparse: no disk)."""
    import json

    root = tmp_path_factory.mktemp("models")
    for name, (config, sizes) in ARCH.items():
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        for i, size in enumerate(sizes):
            with open(d / f"model-{i:05d}-of-{len(sizes):05d}.safetensors", "wb") as fh:
                fh.truncate(size)
        (d / "pytorch_model.bin").write_bytes(b"x" * 10)  # vLLM loads safetensors when both are there
    return root


def memory_cfg(model_dirs, models: dict[str, tuple[str, str]], stages: list[tuple[str, str]]):
    """A PipelineConfig: models {key: (checkpoint, extra yaml)}, stages [(name, model key or yaml)]."""
    lines = [f"  {k}: {{model: '{model_dirs / ckpt}'{', ' + extra if extra else ''}}}" for k, (ckpt, extra) in models.items()]
    st = []
    for name, what in stages:
        emb = "embed" in models.get(what, ("", ""))[1]
        who = f"model: {what}" if what in models else what
        st.append(f"  - {{name: {name}, {who}, {'input' if emb else 'prompt'}: x, output: {name}"
                  + ("" if what in models else ", choice: [a, b]") + "}")
    return parse_config(_yaml("\n".join(lines) + "\n", "\n".join(st) + "\n"), "t.yaml")


@pytest.fixture
def cpu_machine(monkeypatch):
    """No GPU; a memory node of the given GiB, all of it available; no servers of ours running."""
    from modelyard.serving import REGISTRY

    monkeypatch.setattr(devices, "detect_gpus", lambda: 0)
    monkeypatch.setattr(REGISTRY, "held_gb", lambda: 0.0)

    def machine(gib: float):
        monkeypatch.setattr(devices, "cpu_memory_gb", lambda: (gib, gib))
    return machine


SERVE = "serve: {max_model_len: 8192, max_num_seqs: 64}"


def test_sizes_come_from_weight_files_and_config_json(model_dirs):
    from modelyard import sizing
    from modelyard.config import ModelConfig

    llama = sizing.read_config(model_dirs / "llama-3.1-8b")
    assert sizing.kv_bytes_per_token(llama) == 2 * 32 * 8 * 128 * 2  # K and V, layers, KV heads, head size, bf16
    assert sizing.kv_bytes_per_token(llama, "float32") == 2 * 32 * 8 * 128 * 4
    assert sizing.kv_bytes_per_token(llama, kv_dtype="fp8") == 2 * 32 * 8 * 128
    assert sizing.weight_bytes(model_dirs / "llama-3.1-8b") == sum(ARCH["llama-3.1-8b"][1])  # not the .bin

    def need(extra: str, device: str = "gpu", env: dict | None = None, cpu_engine: bool = True):
        m = ModelConfig.model_validate(__import__("yaml").safe_load("{model: x, " + extra + "}"))
        return sizing.need(m, model_dirs / "llama-3.1-8b", device, env, cpu_engine)

    n = need("serve: {max_model_len: 1024, max_num_seqs: 16}")  # 16 x 1024 tokens x 128 KiB = 2 GiB
    assert n.kv_cache_gb == pytest.approx(2.0) and "16 sequences x 1024 tokens" in n.kv_note
    assert n.weights_gb == pytest.approx(sum(ARCH["llama-3.1-8b"][1]) / 2**30)
    assert n.total_gb == pytest.approx(n.weights_gb + 2.0 + sizing.GPU_RUNTIME_GB)
    assert need(SERVE).kv_cache_gb == sizing.KV_CAP_GB  # 64 x 8192 tokens would be 64 GiB
    assert need("serve: {}").kv_cache_gb == pytest.approx(16.0)  # never less than one 131072-token sequence
    assert need("serve: {max_model_len: 1024, kv_cache_gb: 7}").kv_cache_gb == 7
    assert need("serve: {memory_gb: 30}", "gpu").per_device_gb(2) == 15
    pinned = need("serve: {max_model_len: 1024}", "cpu", {"VLLM_CPU_KVCACHE_SPACE": "3"})
    assert pinned.kv_cache_gb == 3 and pinned.kv_pinned
    assert not need("serve: {max_model_len: 1024}", "gpu", {"VLLM_CPU_KVCACHE_SPACE": "3"}, cpu_engine=False).kv_pinned
    assert need("serve: {args: {kv_cache_memory_bytes: 1073741824}}").kv_pinned
    bert = sizing.need(ModelConfig(model="x", task="embed"), model_dirs / "bge-base", "cpu")
    assert bert.kv_cache_gb == sizing.KV_FLOOR_GB and "encoder-only" in bert.kv_note
    unknown = sizing.need(ModelConfig(model="org/not-here"), None, "gpu")
    assert unknown.total_gb is None and "serve.memory_gb" in unknown.explain()


def test_hf_cache_snapshot_is_found_without_a_download(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    snap = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text(__import__("json").dumps(ARCH["qwen3-0.6b"][0]))
    with open(snap / "model.safetensors", "wb") as fh:
        fh.truncate(ARCH["qwen3-0.6b"][1][0])
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from modelyard import placement, sizing

    assert sizing.hf_snapshot("Qwen/Qwen3-0.6B") == snap
    assert sizing.hf_snapshot("Qwen/Qwen3-8B") is None
    cfg = parse_config(_yaml("  m: {model: Qwen/Qwen3-0.6B, serve: {max_model_len: 4096, max_num_seqs: 8}}\n",
                             "  - {name: a, model: m, prompt: x, output: a}\n"), "t.yaml")
    n = placement.sizer(cfg, "gpu")("m", cfg.models["m"])
    assert n.weights_gb == pytest.approx(1_503_300_328 / 2**30)
    assert n.kv_cache_gb == pytest.approx(8 * 4096 * 114688 / 2**30)


def test_one_80gb_gpu_holds_a_small_model_an_embedder_and_an_8b(model_dirs, capsys):
    cfg = memory_cfg(model_dirs, {"small": ("qwen3-0.6b", SERVE), "embedder": ("bge-base", "task: embed"),
                                  "big": ("llama-3.1-8b", SERVE)},
                     [("classify", "small"), ("embed", "embedder"), ("summarize", "big")])
    p = planner.plan_for(cfg, gpus=1, gpu_memory=80)
    assert shape(p) == [([0, 1, 2], {"big#0": [0], "small#0": [0], "embedder#0": [0]})]
    shares = {pl.model: pl.share for pl in p.waves[0].placements}
    assert 0.92 - 0.01 * len(shares) <= sum(shares.values()) <= 0.92 + 1e-9  # the GPU's room is used (rounded down)
    for pl in p.waves[0].placements:
        assert pl.share * 80 >= pl.memory_gb  # every share holds what its server needs
        assert pl.vllm_options(cpu_engine=False) == {"gpu_memory_utilization": pl.share}
    assert shares["big"] > shares["small"] > shares["embedder"]
    text = p.describe()
    print(text)  # the plan as `modelyard run` prints it (kept in the test log)
    assert text.splitlines()[0] == "GPU plan: 1 GPU x 80 GiB (shares of a GPU sum to at most 0.92), 1 wave"
    for pl in p.waves[0].placements:
        assert (f"  {pl.model} replica 0: GPU 0, gpu_memory_utilization {pl.share:.2f} = {pl.share * 80:.1f} of 80 GiB "
                f"(needs {pl.memory_gb:.1f} GiB: weights ") in text
    assert "big replica 0: GPU 0, gpu_memory_utilization 0.60 = 48.0 of 80 GiB (needs 21.0 GiB: weights 14.96 + " \
           "KV cache 4.00 + runtime 2.0 GiB)" in text
    assert "| 1 | 0:classify, 1:embed, 2:summarize | big | 0 | GPU 0 | 0 | gpu_memory_utilization" in p.to_markdown()


def test_two_8b_models_on_one_24gb_gpu_run_in_two_waves(model_dirs):
    cfg = memory_cfg(model_dirs, {"a": ("llama-3.1-8b", SERVE), "b": ("llama-3.1-8b", SERVE)},
                     [("summarize", "a"), ("extract", "b")])
    p = planner.plan_for(cfg, gpus=1, gpu_memory=24)
    print(p.describe())
    assert shape(p) == [([0], {"a#0": [0]}), ([1], {"b#0": [0]})]
    assert [pl.share for w in p.waves for pl in w.placements] == [0.92, 0.92]  # alone: the whole budget
    assert p.waves[1].reason == ("stage 1:extract needs b (21.0 GiB), which does not fit beside a (21.0 GiB) on "
                                 "1 GPU(s) of 24 GiB, 0.92 of each usable")
    assert "starts here because stage 1:extract needs b (21.0 GiB)" in p.describe()
    # without max_model_len an 8B keeps room for one 131072-token sequence (16 GiB): no 24 GiB GPU holds it
    big = memory_cfg(model_dirs, {"a": ("llama-3.1-8b", "")}, [("summarize", "a")])
    with pytest.raises(PlanError) as e:
        planner.plan_for(big, gpus=1, gpu_memory=24)
    assert "model 'a' needs 33.0 GiB per GPU (weights 14.96 + KV cache 16.00 + runtime 2.0 GiB)" in str(e.value)
    assert "lower max_model_len" in str(e.value)


def test_8_gpus_a_70b_at_tensor_parallel_4_and_an_8b_with_4_replicas(model_dirs):
    cfg = memory_cfg(model_dirs, {"big": ("llama-3.1-70b", "serve: {max_model_len: 8192, tensor_parallel_size: 4}"),
                                  "small": ("llama-3.1-8b", "serve: {max_model_len: 8192, replicas: 4}")},
                     [("draft", "small"), ("review", "big")])
    p = planner.plan_for(cfg, gpus=8, gpu_memory=80)
    print(p.describe())
    assert shape(p) == [([0, 1], {"small#0": [4], "small#1": [5], "small#2": [6], "small#3": [7],
                                   "big#0": [0, 1, 2, 3]})]  # the 70B's ranks and the replicas on empty GPUs
    assert all(pl.share == 0.92 for pl in p.waves[0].placements)
    # two 70B replicas fill all eight GPUs: the 8B replicas share them, one per GPU
    cfg2 = memory_cfg(model_dirs, {"big": ("llama-3.1-70b", "serve: {max_model_len: 8192, tensor_parallel_size: 4, "
                                           "replicas: 2}"),
                                   "small": ("llama-3.1-8b", "serve: {max_model_len: 8192, replicas: 4}")},
                      [("draft", "small"), ("review", "big")])
    p2 = planner.plan_for(cfg2, gpus=8, gpu_memory=80)
    print(p2.describe())
    got = shape(p2)[0][1]
    assert got["big#0"] == [0, 1, 2, 3] and got["big#1"] == [4, 5, 6, 7]
    assert [got[f"small#{i}"] for i in range(4)] == [[0], [4], [1], [5]]  # spread: two beside each 70B
    assert {pl.share for pl in p2.waves[0].placements if pl.model == "big"} == {0.57}
    per_gpu = [0.0] * 8
    for pl in p2.waves[0].placements:
        for d in pl.devices:
            per_gpu[d] += pl.share
    assert max(per_gpu) <= 0.92 + 1e-9


def test_explicit_utilizations_win_and_overflow_is_an_error(model_dirs):
    two = {"a": ("qwen3-0.6b", "serve: {gpu_memory_utilization: 0.6}"),
           "b": ("qwen3-0.6b", "serve: {gpu_memory_utilization: 0.6}")}
    vote = "vote: {models: [a, b]}"
    with pytest.raises(PlanError) as e:  # a vote asks both at once: 1.2 of one GPU
        planner.plan_for(memory_cfg(model_dirs, two, [("label", vote)]), gpus=1, gpu_memory=80)
    assert str(e.value) == ("stage 0:label asks models a, b at once, and they do not fit together: a "
                            "(gpu_memory_utilization 0.6), b (gpu_memory_utilization 0.6) on 1 GPU(s) of 80 GiB, "
                            "0.92 of each usable")
    p = planner.plan_for(memory_cfg(model_dirs, two, [("x", "a"), ("y", "b")]), gpus=1, gpu_memory=80)
    assert shape(p) == [([0], {"a#0": [0]}), ([1], {"b#0": [0]})]  # in separate stages: waves
    assert "gpu_memory_utilization 0.6" in p.waves[1].reason
    assert [pl.share for w in p.waves for pl in w.placements] == [0.6, 0.6]
    assert p.waves[0].placements[0].vllm_options(cpu_engine=False) == {}  # the user's flag is passed as given
    fit = {"a": ("qwen3-0.6b", "serve: {gpu_memory_utilization: 0.5}"),
           "b": ("qwen3-0.6b", "serve: {gpu_memory_utilization: 0.45}")}
    p = planner.plan_for(memory_cfg(model_dirs, fit, [("label", vote)]), gpus=1, gpu_memory=80)
    assert shape(p) == [([0], {"a#0": [0], "b#0": [0]})]  # the user's values may fill the GPU (0.95)
    mixed = {"a": ("qwen3-0.6b", "serve: {gpu_memory_utilization: 0.85}"), "b": ("qwen3-0.6b", SERVE)}
    with pytest.raises(PlanError, match="stage 0:label asks models a, b at once"):
        planner.plan_for(memory_cfg(model_dirs, mixed, [("label", vote)]), gpus=1, gpu_memory=80)


@pytest.mark.parametrize("models,waves", [
    (["embedder", "small"], 1),
    (["embedder", "small", "medium"], 1),
    (["embedder", "small", "medium", "big"], 2),
])
def test_cpu_only_24gib(model_dirs, cpu_machine, models, waves):
    cpu_machine(24.0)
    catalog = {"embedder": ("bge-base", "task: embed"), "small": ("qwen3-0.6b", SERVE),
               "medium": ("qwen3-1.7b", SERVE), "big": ("llama-3.1-8b", SERVE)}
    cfg = memory_cfg(model_dirs, {m: catalog[m] for m in models}, [(f"s_{m}", m) for m in models])
    p = planner.plan_for(cfg)
    print(p.describe())
    assert p.gpus == 0 and len(p.waves) == waves
    assert p.describe().splitlines()[0].startswith(
        f"GPU plan: CPU only (no GPU): 24.0 of 24.0 GiB available, servers must fit in 22.1 GiB, {waves} wave")
    for w in p.waves:
        assert sum(pl.memory_gb for pl in w.placements) <= 0.92 * 24
        for pl in w.placements:
            assert pl.devices == [] and pl.share is None
            opts = pl.vllm_options(cpu_engine=True)
            assert opts == {"kv_cache_memory_bytes": int(math.ceil(pl.kv_cache_gb * 1024)) * 2**20}
    if waves == 2:
        assert p.waves[1].stages == [3] and p.waves[1].reason.startswith(
            "stage 3:s_big needs big (20.7 GiB), which does not fit beside embedder (2.2 GiB), small (7.2 GiB), "
            "medium (9.5 GiB) in 22.1 GiB usable (0.92 of 24.0 GiB available)")


def test_cpu_models_of_unknown_size_get_waves_unless_a_stage_asks_them_together(cpu_machine):
    cpu_machine(24.0)
    cfg = parse_config(_yaml("  a: {model: org/a, serve: {}}\n  b: {model: org/b, serve: {}}\n",
                             "  - {name: x, model: a, prompt: x, output: x}\n"
                             "  - {name: y, model: b, prompt: x, output: y}\n"
                             "  - {name: z, vote: {models: [a, b]}, prompt: x, choice: [p, q], output: z}\n"), "t.yaml")
    p = planner.plan_for(cfg)
    assert shape(p) == [([0], {"a#0": []}), ([1, 2], {"b#0": [], "a#0": []})]
    assert any("asks models of unknown size at once" in n for n in p.notes)
    assert "size unknown" in p.describe()


def test_a_cascade_whose_tiers_do_not_fit_together_runs_tier_by_tier_in_waves(tmp_path):
    """Two 10 GiB models on one 16 GiB GPU: tier 1 on every shard in one wave, tier 2 (and what
    follows) in the next; a calibrated cascade cannot be split (every tier answers its sample)."""
    from modelyard.config import parse_config
    from modelyard.planner import plan_for, plan_steps, wave_models

    text = f"""
name: t
input: {{uri: {tmp_path / 'in.jsonl'}}}
models:
  small: {{model: a/small, serve: {{memory_gb: 10}}}}
  big: {{model: a/big, serve: {{memory_gb: 10}}}}
stages:
  - name: label
    prompt: "{{{{ x }}}}"
    choice: [a, b]
    cascade: [{{model: small, min_confidence: 0.5}}, {{model: big}}]
    judge: {{model: small, prompt: "ok? {{{{ label }}}}", choice: ["yes", "no"], output: v, accept_when: "v == 'yes'"}}
    output: label
  - {{name: after, model: big, prompt: "{{{{ label }}}}", output: more}}
output: {{uri: {tmp_path / 'out'}}}
"""
    cfg = parse_config(text, "t.yaml")
    assert [(i, j, m) for i, j, _, m in plan_steps(cfg)] == [(0, 0, ["small"]), (0, 1, ["big"]), (1, None, ["big"])]
    p = plan_for(cfg, gpus=1, gpu_memory=16)
    assert [(w.stages, w.tiers, w.models) for w in p.waves] == [([0], {0: (0, 0)}, ["small"]),
                                                                 ([0, 1], {0: (1, 1)}, ["big"])]
    assert [wave_models(cfg, w) for w in p.waves] == [["small"], ["big"]]
    text_plan = p.describe()
    assert "wave 1: stages 0:label (cascade tier 0)" in text_plan and "wave 2: stages 0:label (cascade tier 1), 1:after" in text_plan
    assert "label[tier 1] needs big" in text_plan  # why the second wave starts there
    whole = plan_for(cfg, gpus=1, gpu_memory=48)  # both fit: one wave, the cascade whole
    assert [(w.stages, w.tiers) for w in whole.waves] == [([0, 1], {})]
    calibrated = parse_config(text.replace("min_confidence: 0.5", "min_confidence: auto"), "t.yaml")
    with pytest.raises(PlanError, match="do not fit together"):
        plan_for(calibrated, gpus=1, gpu_memory=16)
