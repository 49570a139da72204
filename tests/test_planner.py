"""The GPU planner: concrete plans for many GPU counts and model mixes, without a GPU."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from modelyard import planner
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
     [([0, 1], {"a#0": [], "b#0": [], "b#1": []})], ["no GPU"]),
    ("1gpu-one-model-two-stages", [need("a", [0, 1])], 1,
     [([0, 1], {"a#0": [0]})], []),
    ("1gpu-two-models-two-waves", [need("a", 0), need("b", 1)], 1,
     [([0], {"a#0": [0]}), ([1], {"b#0": [0]})], ["2 waves"]),
    ("2gpu-two-models-side-by-side", [need("a", 0), need("b", 1)], 2,
     [([0, 1], {"a#0": [0], "b#0": [1]})], []),
    ("2gpu-demo-shape", [need("embedder", 0), need("tiny", [1, 2, 3])], 2,
     [([0, 1, 2, 3], {"embedder#0": [0], "tiny#0": [1]})], []),
    ("2gpu-tp2-then-tp1", [need("a", 0, tp=2), need("b", 1)], 2,
     [([0], {"a#0": [0, 1]}), ([1], {"b#0": [0]})], ["3 GPUs together, 2 available: 2 waves"]),
    ("3gpu-tp2-and-tp1", [need("a", 0, tp=2), need("b", 1)], 3,
     [([0, 1], {"a#0": [0, 1], "b#0": [2]})], []),
    ("4gpu-replicas-and-tp2", [need("a", 0, replicas=2), need("b", 1, tp=2)], 4,
     [([0, 1], {"a#0": [2], "a#1": [3], "b#0": [0, 1]})], []),
    ("4gpu-tp-groups-aligned", [need("a", 0), need("b", 1, tp=2), need("c", 2)], 4,
     [([0, 1, 2], {"a#0": [2], "b#0": [0, 1], "c#0": [3]})], []),
    ("4gpu-three-tp2-models-two-waves", [need("a", 0, tp=2), need("b", 1, tp=2), need("c", 2, tp=2)], 4,
     [([0, 1], {"a#0": [0, 1], "b#0": [2, 3]}), ([2], {"c#0": [0, 1]})], ["6 GPUs together, 4 available"]),
    ("4gpu-replicas-reduced", [need("a", 0, tp=2, replicas=3)], 4,
     [([0], {"a#0": [0, 1], "a#1": [2, 3]})], ["3 replicas of 2 GPU(s) do not fit on 4 GPU(s); running 2"]),
    ("4gpu-tp4-fills-machine", [need("a", 0, tp=4), need("b", 1, replicas=4)], 4,
     [([0], {"a#0": [0, 1, 2, 3]}), ([1], {"b#0": [0], "b#1": [1], "b#2": [2], "b#3": [3]})], ["2 waves"]),
    ("8gpu-tp4-tp2x2", [need("a", 0, tp=4), need("b", 1, tp=2, replicas=2)], 8,
     [([0, 1], {"a#0": [0, 1, 2, 3], "b#0": [4, 5], "b#1": [6, 7]})], []),
    ("8gpu-mixed-aligned", [need("a", 0, replicas=2), need("b", 1, tp=2), need("c", 2, tp=4)], 8,
     [([0, 1, 2], {"a#0": [6], "a#1": [7], "b#0": [4, 5], "c#0": [0, 1, 2, 3]})], []),
    ("8gpu-more-than-fit-waves", [need("a", 0, replicas=4), need("b", 1, tp=4), need("c", 2, replicas=2)], 8,
     [([0, 1], {"a#0": [4], "a#1": [5], "a#2": [6], "a#3": [7], "b#0": [0, 1, 2, 3]}),
      ([2], {"c#0": [0], "c#1": [1]})], ["10 GPUs together, 8 available: 2 waves"]),
    ("8gpu-replicas-capped", [need("a", 0, replicas=16)], 8,
     [([0], {f"a#{i}": [i] for i in range(8)})], ["16 replicas of 1 GPU(s) do not fit on 8 GPU(s); running 8"]),
    ("more-models-than-gpus", [need(m, i) for i, m in enumerate("abcde")], 2,
     [([0, 1], {"a#0": [0], "b#0": [1]}), ([2, 3], {"c#0": [0], "d#0": [1]}), ([4], {"e#0": [0]})], ["3 waves"]),
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
    for n in notes:
        assert any(n in note for note in p.notes), (n, p.notes)
    if len(expected) == 1 and gpus:
        assert p.notes == [] or all("do not fit" in note for note in p.notes)
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
    assert planner._block(free, size) == expected


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
    assert text.splitlines()[0] == "GPU plan: 2 GPUs, 3 waves"
    assert "wave 1: stages 0:classify" in text
    assert "  small replica 0: GPU 0" in text and "  small replica 1: GPU 1" in text
    assert "wave 2: stages 1:summarize" in text and "  big replica 0: GPUs 0,1" in text
    assert "wave 3: stages 2:embed" in text and "  emb replica 0: GPU 0" in text
    assert "note: the managed models need 5 GPUs together, 2 available: 3 waves" in text
    md = p.to_markdown()
    assert md.startswith("# GPU plan")
    assert "| 2 | 1:summarize | big | 0 | 0,1 |" in md
    assert sum(line.startswith("| ") and line[2].isdigit() for line in md.splitlines()) == 4
    assert "**Notes**" in md
    cpu = plan([need("a", [0, 1])], 0, ["x", "y"])
    assert "CPU only" in cpu.describe() and "a replica 0: CPU" in cpu.describe()
    assert "| 1 | 0:x, 1:y | a | 0 | CPU |" in cpu.to_markdown()
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


def test_demo_config_needs():
    from modelyard.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", {"date": "2026-11-27"}).config
    assert [(n.name, n.used) for n in needs_from_config(cfg)] == [("embedder", (0,)), ("tiny", (1, 2, 3))]
    assert shape(planner.plan_for(cfg, 0)) == [([0, 1, 2, 3], {"embedder#0": [], "tiny#0": []})]
    assert shape(planner.plan_for(cfg, 1)) == [([0], {"embedder#0": [0]}), ([1, 2, 3], {"tiny#0": [0]})]


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
    monkeypatch.setattr(planner.shutil, "which", lambda name: "/nonexistent/nvidia-smi")
    assert detect_gpus() == 0  # OSError from subprocess is swallowed
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert detect_gpus() == 2  # nvidia-smi failed to run: CUDA_VISIBLE_DEVICES decides

    def boom(*a, **k):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(planner, "_visible", boom)
    assert detect_gpus() == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
