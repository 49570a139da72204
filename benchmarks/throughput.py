"""Throughput of a one-stage text pipeline against the engine's own limits.

What it measures, in one run, with ``builtin:tiny-llama`` on vLLM's CPU backend and N prompts
(default 2000) that each ask for exactly ``max_tokens`` (64) tokens (``ignore_eos: true``), so
every system produces the same number of tokens:

1. **raw ceiling**: a minimal asyncio aiohttp client sends the same chat requests to a managed
   server (started through ``modelyard.serving.REGISTRY``, so with modelyard's own server
   options), at a sweep of fixed concurrencies (32, 64, 128); the best is the ceiling. Every
   measurement gets a fresh server and the same untimed warm-up (see main()). ``--clients``
   adds the same client on httpx at 64 in flight, to show why modelyard does not use it.
2. **modelyard**: a one-stage pipeline (text output, request cache off) over the same prompts
   against the same server (an ``endpoints:`` model), run in this process under Prefect's
   ephemeral API; timed from the flow call to the committed output. The orchestrator's peak
   RSS during that run is sampled with psutil (this process only, every 50 ms; the Prefect
   API subprocess and vLLM are excluded).
3. **vllm run-batch**: ``python -m vllm.entrypoints.openai.run_batch`` on the same requests as
   an OpenAI batch file, with the managed server's engine options; its time includes its own
   engine start. So modelyard is also timed **like for like**: ``modelyard run CONFIG`` in a
   subprocess with a managed model (the command line starts the server while Prefect starts),
   from process start to exit.

Servers are stopped before the next system runs: on 2 cores nothing else may compete.

Prints a table, then as the last line
``ratio_vs_raw=R1 ratio_vs_run_batch=R2 peak_rss_mb=M`` where R1 = modelyard (in-process)
req/s / best raw req/s and R2 = modelyard like-for-like req/s / run-batch req/s (higher is
better for modelyard). Exits 0 if it ran; it asserts nothing about time.

    .venv/bin/python benchmarks/throughput.py            # 2000 prompts, a few minutes
    .venv/bin/python benchmarks/throughput.py --quick    # a few dozen prompts, CI smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (sets Prefect's environment before anything imports it)

MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 64


def managed_model() -> dict:
    return {"model": C.TINY, "serve": {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS}}


def write_input(path: Path, prompts: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"p{i:06d}" for i in range(len(prompts))], "prompt": prompts}), path)
    return path


def pipeline_config(path: Path, name: str, data: Path, out: Path, model: dict, max_tokens: int,
                    shard_rows: int | None) -> Path:
    cfg = {
        "name": name,
        "input": {"uri": str(data), "key": "id"},
        "models": {"tiny": model},
        "stages": [{"name": "generate", "model": "tiny", "prompt": "{{ prompt }}",
                    "params": C.params(max_tokens), "output": "text"}],
        "output": {"uri": str(out)},
        "cache": {"enabled": False},
        "engine": {"env": dict(C.KV_ENV)},
    }
    if shard_rows:
        cfg["shard_rows"] = shard_rows
    return C.write_yaml(path, cfg)


async def _raw(url: str, served: str, prompts: list[str], max_tokens: int, concurrency: int,
               client: str = "aiohttp") -> dict:
    """Fixed-concurrency workers over a queue: as little client overhead as asyncio allows.

    ``client``: aiohttp (the ceiling) or httpx (shown with --clients: httpx's AsyncClient stalls
    for seconds at this concurrency, encode/httpx#3215)."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    tokens = errors = 0

    async def worker(send) -> None:
        nonlocal tokens, errors
        while True:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            for attempt in range(4):
                try:
                    reply = await send(C.chat_body(served, p, max_tokens))
                    tokens += reply["usage"]["completion_tokens"]
                    break
                except Exception:  # noqa: BLE001 - counted, like a failed row
                    if attempt == 3:
                        errors += 1
                    await asyncio.sleep(0.5 * 2 ** attempt)

    async with contextlib.AsyncExitStack() as stack:
        if client == "httpx":
            import httpx

            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            hx = await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600, connect=10)))

            async def send(body: dict) -> dict:
                r = await hx.post(url + "/chat/completions", json=body)
                r.raise_for_status()
                return r.json()
        else:
            import aiohttp

            session = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=concurrency), timeout=aiohttp.ClientTimeout(total=600, sock_connect=10)))

            async def send(body: dict) -> dict:
                async with session.post(url + "/chat/completions", json=body) as r:
                    r.raise_for_status()
                    return await r.json()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(send) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"wall": wall, "tokens": tokens, "errors": errors}


def run_raw(url: str, served: str, prompts: list[str], max_tokens: int, concurrency: int,
            client: str = "aiohttp") -> dict:
    return asyncio.run(_raw(url, served, prompts, max_tokens, concurrency, client))


def run_batch(work: Path, model_path: str, prompts: list[str], max_tokens: int) -> dict:
    """vLLM's own offline batch runner on the same requests, engine start included."""
    inp, out = work / "batch-in.jsonl", work / "batch-out.jsonl"
    with inp.open("w") as fh:
        for i, p in enumerate(prompts):
            fh.write(json.dumps({"custom_id": f"p{i:06d}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": C.chat_body(C.TINY, p, max_tokens)}) + "\n")
    cmd = [str(C.ENGINE_PYTHON), "-m", "vllm.entrypoints.openai.run_batch", "-i", str(inp), "-o", str(out),
           "--model", model_path, "--served-model-name", C.TINY, "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-seqs", str(MAX_NUM_SEQS)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VIRTUAL_ENV"))}
    env.update({**C.KV_ENV, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    wall, rc, _ = C.run_subprocess(cmd, env=env, log_path=work / "run-batch.log")
    if rc != 0:
        raise RuntimeError(f"run_batch exited {rc}: {(work / 'run-batch.log').read_text()[-2000:]}")
    tokens = errors = 0
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("error") or not rec.get("response") or rec["response"].get("status_code") != 200:
            errors += 1
            continue
        tokens += rec["response"]["body"]["usage"]["completion_tokens"]
    return {"wall": wall, "tokens": tokens, "errors": errors}


def manifest_tokens(m: dict) -> tuple[int, int]:
    st = m["stages"]["generate"]
    return st["completion_tokens"], st["errors"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="prompts (default 2000; 48 with --quick)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="raw-client sweep (default 32 64 128; 64 with --quick)")
    ap.add_argument("--shard-rows", type=int, default=None, help="pipeline shard_rows (default: the config default)")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: few prompts, one sweep point")
    ap.add_argument("--skip-run-batch", action="store_true", help="skip run-batch and the like-for-like run")
    ap.add_argument("--clients", action="store_true",
                    help="also measure a raw httpx client at 64 in flight (not part of the ceiling)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    n = a.n or (48 if a.quick else 2000)
    sweep = a.concurrency or ([64] if a.quick else [32, 64, 128])
    prompts = C.make_prompts(n)
    rows: list[dict] = []

    def add(system: str, r: dict, note: str = "") -> float:
        rps = n / r["wall"]
        rows.append({"system": system, "requests": n, "wall_s": f"{r['wall']:.1f}", "req_s": f"{rps:.2f}",
                     "tok_s": f"{r['tokens'] / r['wall']:.0f}", "errors": r["errors"], "note": note})
        C.log(f"{system}: {rps:.2f} req/s ({r['wall']:.1f} s, {r['tokens']} tokens, {r['errors']} errors)")
        return rps

    with C.workdir("modelyard-bench-tp-", a.keep) as work:
        data = write_input(work / "prompts.parquet", prompts)
        os.environ["PREFECT_HOME"] = str(work / "prefect-inproc")
        os.environ.pop("PREFECT_API_URL", None)
        # A fresh server for every measurement, each with the same untimed warm-up, so that no
        # system inherits the state another left in the engine (all send the same 2,000 prompts).
        best_raw = 0.0
        if a.clients:
            with C.managed_servers({"tiny": managed_model()}, work) as servers:
                server = servers["tiny"]
                run_raw(server.url, server.served_name, C.make_prompts(64, seed=1), a.max_tokens, 64)
                add("raw httpx c=64", run_raw(server.url, server.served_name, prompts, a.max_tokens, 64, "httpx"),
                    "httpx.AsyncClient, not in the ceiling")
        for c in sweep:
            with C.managed_servers({"tiny": managed_model()}, work) as servers:
                server = servers["tiny"]
                url, served, model_path = server.url, server.served_name, server.path
                C.log(f"server up at {url} ({model_path})")
                run_raw(url, served, C.make_prompts(64, seed=1), a.max_tokens, 64)  # warm-up, not counted
                best_raw = max(best_raw, add(f"raw aiohttp c={c}", run_raw(url, served, prompts, a.max_tokens, c),
                                             "asyncio workers, fresh server"))
        with C.managed_servers({"tiny": managed_model()}, work) as servers:
            server = servers["tiny"]
            url, served = server.url, server.served_name
            ext = {"model": served, "endpoints": [url], "max_in_flight": MAX_NUM_SEQS}
            # a small run first (other prompts): Prefect's ephemeral API starts here, not inside the timed run
            warm = pipeline_config(work / "warm.yaml", "bench-warm",
                                   write_input(work / "warm.parquet", C.make_prompts(64, seed=1)),
                                   work / "out-warm", ext, a.max_tokens, a.shard_rows)
            C.run_flow(warm)
            if not a.skip_run_batch:  # the command line's Prefect home: created now, as by a user's first run
                exe = C.ORCH_PYTHON.with_name("modelyard")
                C.run_subprocess([str(exe), "run", str(warm), "--output", str(work / "out-warm-cli")],
                                 env=C.cli_env(work / "prefect-cli"), cwd=C.ROOT)
            cfg = pipeline_config(work / "inproc.yaml", "bench-throughput", data, work / "out-inproc", ext,
                                  a.max_tokens, a.shard_rows)
            with C.RssSampler() as rss:
                t0 = time.perf_counter()
                manifest = C.run_flow(cfg)
                wall = time.perf_counter() - t0
            tokens, errors = manifest_tokens(manifest)
            ours = add("modelyard (in-process)", {"wall": wall, "tokens": tokens, "errors": errors},
                       f"flow call to commit; {manifest['input']['shards']} shard(s), in_flight {MAX_NUM_SEQS}")
            peak_rss = rss.peak_mb
        ratio_rb = float("nan")
        if not a.skip_run_batch:
            rb = add("vllm run-batch", run_batch(work, model_path, prompts, a.max_tokens), "engine start included")
            lfl_cfg = pipeline_config(work / "managed.yaml", "bench-throughput-managed", data, work / "out-managed",
                                      managed_model(), a.max_tokens, a.shard_rows)
            exe = C.ORCH_PYTHON.with_name("modelyard")
            wall, rc, _ = C.run_subprocess([str(exe), "run", str(lfl_cfg)], env=C.cli_env(work / "prefect-cli"),
                                           cwd=C.ROOT, log_path=work / "modelyard-run.log")
            if rc != 0:
                raise RuntimeError(f"modelyard run exited {rc}: {(work / 'modelyard-run.log').read_text()[-3000:]}")
            m = json.loads((work / "out-managed" / "_manifest.json").read_text())
            tokens, errors = manifest_tokens(m)
            lfl = add("modelyard run (like for like)", {"wall": wall, "tokens": tokens, "errors": errors},
                      "subprocess, managed server start included")
            ratio_rb = lfl / rb
    print(C.table(rows, ["system", "requests", "wall_s", "req_s", "tok_s", "errors", "note"]))
    print(f"peak RSS: psutil sampling (50 ms) of the orchestrator process during the in-process modelyard run")
    print(f"ratio_vs_raw={ours / best_raw:.3f} ratio_vs_run_batch={ratio_rb:.3f} peak_rss_mb={peak_rss:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
