"""Do stages on different models overlap? A two-stage pipeline against its stages run alone.

What it measures: a pipeline of two stages on two different managed vLLM servers -- ``generate``
(``builtin:tiny-llama``, chat, ``max_tokens`` tokens with ``ignore_eos``) and ``embed``
(``builtin:minilm`` on ``/v1/embeddings``) -- over N rows (default 1000), run in this process under
Prefect's ephemeral API and timed from the flow call to the committed output. The same rows are
then run through each stage alone (two one-stage pipelines on the same servers). With
``overlap_ratio = wall(two stages) / (wall(generate alone) + wall(embed alone))``, 1.0 means the
stages ran one after the other and 0.5 means perfect overlap of two equal stages (lower is better).

Both servers are started once, side by side, through ``modelyard.serving.REGISTRY`` with the same
options the configs name, so every run finds them running; they are stopped at the end. On this
2-core machine each engine is pinned to its own core (``VLLM_CPU_OMP_THREADS_BIND`` in the
models' ``serve.env``): by default both would bind core 0 and could not run at the same time.
The embedded texts are short (8 words): vLLM CPU embeds long texts very slowly (here 2 req/s at
190 tokens, 30 at 12), and these sizes give the two stages comparable times.

Last line: ``overlap_ratio=R`` (target <= 0.8). Exits 0 if it ran; it asserts nothing.

    .venv/bin/python benchmarks/overlap.py            # 1000 rows
    .venv/bin/python benchmarks/overlap.py --quick    # a few dozen rows, CI smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODELS = {
    "gen": {"model": C.TINY, "serve": {"max_model_len": 1024, "max_num_seqs": 64,
                                      "env": {"VLLM_CPU_OMP_THREADS_BIND": "0"}}},
    "emb": {"model": C.MINILM, "task": "embed", "serve": {"max_model_len": 256, "max_num_seqs": 64,
                                                          "env": {"VLLM_CPU_OMP_THREADS_BIND": "1"}}},
}


def write_input(path: Path, n: int, embed_words: int) -> Path:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(3)
    prompts = C.make_prompts(n)
    docs = [" ".join(rng.choice(C.WORDS) for _ in range(embed_words)) for _ in range(n)]
    pq.write_table(pa.table({"id": [f"r{i:06d}" for i in range(n)], "prompt": prompts, "doc": docs}), path)
    return path


def stage(kind: str, max_tokens: int) -> dict:
    if kind == "generate":
        return {"name": "generate", "model": "gen", "prompt": "{{ prompt }}", "params": C.params(max_tokens),
                "output": "text"}
    return {"name": "embed", "model": "emb", "input": "{{ doc }}", "output": "embedding"}


def config(path: Path, data: Path, out: Path, kinds: list[str], max_tokens: int) -> Path:
    used = {"generate": "gen", "embed": "emb"}
    return C.write_yaml(path, {
        "name": f"bench-overlap-{'-'.join(kinds)}",
        "input": {"uri": str(data), "key": "id"},
        "models": {used[k]: MODELS[used[k]] for k in kinds},
        "stages": [stage(k, max_tokens) for k in kinds],
        "output": {"uri": str(out)},
        "cache": {"enabled": False},
        "engine": {"env": dict(C.KV_ENV)},
    })


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="rows (default 1000; 48 with --quick)")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per generation")
    ap.add_argument("--embed-words", type=int, default=8, help="words per embedded text (vLLM CPU embeds long texts slowly)")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: a few dozen rows")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    n = a.n or (48 if a.quick else 1000)
    rows = []
    with C.workdir("modelyard-bench-overlap-", a.keep) as work:
        os.environ["PREFECT_HOME"] = str(work / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        data = write_input(work / "rows.parquet", n, a.embed_words)
        warm = write_input(work / "warm.parquet", 16, a.embed_words)
        with C.managed_servers(MODELS, work):
            C.log("both servers up")
            # warm-up: Prefect's ephemeral API starts here, and both engines see traffic once
            C.run_flow(config(work / "warm.yaml", warm, work / "out-warm", ["generate", "embed"], a.max_tokens))
            walls = {}
            for kinds in (["generate"], ["embed"], ["generate", "embed"]):
                label = "+".join(kinds)
                cfg = config(work / f"{label}.yaml", data, work / f"out-{label}", kinds, a.max_tokens)
                t0 = time.perf_counter()
                m = C.run_flow(cfg)
                walls[label] = wall = time.perf_counter() - t0
                errors = sum(s["errors"] for s in m["stages"].values())
                rows.append({"pipeline": label, "rows": n, "wall_s": f"{wall:.1f}", "rows_s": f"{n / wall:.1f}",
                             "errors": errors})
                C.log(f"{label}: {wall:.1f} s ({errors} errors)")
    ratio = walls["generate+embed"] / (walls["generate"] + walls["embed"])
    rows.append({"pipeline": "generate alone + embed alone", "rows": n,
                 "wall_s": f"{walls['generate'] + walls['embed']:.1f}"})
    print(C.table(rows, ["pipeline", "rows", "wall_s", "rows_s", "errors"]))
    print("wall: flow call to committed output, in this process, servers already running")
    print(f"overlap_ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
