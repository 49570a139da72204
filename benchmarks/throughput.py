"""Throughput of a one-stage text pipeline against the engine's own limits.

What it measures, with ``builtin:tiny-llama`` on vLLM's CPU backend and N prompts (default
2000) that each ask for exactly ``max_tokens`` (64) tokens (``ignore_eos: true``), so every
system produces the same number of tokens:

1. **raw ceiling**: a minimal asyncio aiohttp client sends the same chat requests to a managed
   server (started through ``modelyard.serving.REGISTRY``, so with modelyard's own server
   options) at a sweep of fixed concurrencies (default 64, 96, 128), one run each; the best is
   the ceiling's concurrency. ``--clients`` adds the same client on httpx at 64 in flight, to
   show why modelyard does not use it.
2. **modelyard**: a one-stage pipeline (text output, request cache off) over the same prompts
   against the same server (an ``endpoints:`` model with the requests in flight modelyard gives
   a managed model of these serve options), run in this process under Prefect's ephemeral API;
   timed from the flow call to the committed output (the manifest, written last). It runs in
   ``--rounds`` pairs with the raw client at the ceiling's concurrency, back to back, the order
   alternating (raw first, then modelyard first, ...). The orchestrator's peak RSS during those
   runs is sampled with psutil (this process only, every 50 ms; the Prefect API subprocess and
   vLLM are excluded).
3. **vllm run-batch**: ``python -m vllm.entrypoints.openai.run_batch`` on the same requests as
   an OpenAI batch file, with the managed server's engine options; its time includes its own
   engine start. So modelyard is also timed **like for like**: ``modelyard run CONFIG`` in a
   subprocess with a managed model (the command line starts the server while Prefect starts),
   from process start to exit.

Fairness. Systems 1 and 2 share one server (a fresh one per measurement gave +-5 % between
servers, more than the gap being measured); before each measurement the server's prefix cache
is emptied (``/reset_prefix_cache``, dev mode), or a system sending prompts the server has
already seen would skip their prefill (+45 % here). Section 3 alternates run-batch and
``modelyard run`` for ``--start-rounds`` rounds (default 4), each with its own engine start.
Four, because on today's engine one round of each takes 40-45 s and single rounds' ratios spread
0.915-1.004: the median of two could not tell 0.95 from 0.92. Nothing else runs meanwhile (2 cores).

Prints a table (medians of each system's runs), then as the last line
``ratio_vs_raw=R1 ratio_vs_run_batch=R2 peak_rss_mb=M cpu_ratio_vs_raw=R3``: R1 is the median
over the pairs of modelyard's req/s / the raw client's req/s, R2 the median over rounds of
``modelyard run`` req/s / run-batch req/s (higher is better for modelyard). R3 is the median over
the pairs of the orchestrator's CPU seconds, modelyard's / the raw client's (this process and
Prefect's API subprocess, vLLM's processes excluded; lower is better). On this 2-core machine
vLLM's API server, engine core and worker take both cores (about 1.99 of 2 in a 20,000-prompt
run), so every CPU second of the client is taken from the engine; unlike R1, R3 does not move
with the machine's speed. Ratios are taken between neighbouring
runs because this VM's speed drifts by up to 30 % within minutes, which moves both sides of
such a ratio alike; the ratio over all pairs' time (raw) and of the medians (run-batch) are
printed too. Exits 0 if it ran; it asserts nothing about time.

    .venv/bin/python benchmarks/throughput.py            # 2000 prompts, about 13 minutes here
    .venv/bin/python benchmarks/throughput.py --quick    # a few dozen prompts, CI smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
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
    """vLLM's own offline batch runner on the same requests, engine start included, in the environment
    modelyard gives a managed server."""
    from modelyard.serving import engine_env

    inp, out = work / "batch-in.jsonl", work / "batch-out.jsonl"
    with inp.open("w") as fh:
        for i, p in enumerate(prompts):
            fh.write(json.dumps({"custom_id": f"p{i:06d}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": C.chat_body(C.TINY, p, max_tokens)}) + "\n")
    cmd = [str(C.ENGINE_PYTHON), "-m", "vllm.entrypoints.openai.run_batch", "-i", str(inp), "-o", str(out),
           "--model", model_path, "--served-model-name", C.TINY, "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-seqs", str(MAX_NUM_SEQS)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VIRTUAL_ENV"))}
    env.update({**engine_env(str(C.ENGINE_PYTHON)), **C.KV_ENV, "HF_HUB_OFFLINE": "1"})  # a managed server's
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


class PrefixCache:
    """The server's prefix cache: emptied before each measurement, its hit rate read after."""

    def __init__(self, url: str):
        self.base = url.rsplit("/v1", 1)[0]
        self.start = (0.0, 0.0)

    def _counters(self) -> tuple[float, float]:
        import httpx

        text = httpx.get(self.base + "/metrics", timeout=10).text
        got = {m[1]: float(m[2]) for m in re.finditer(r"^vllm:prefix_cache_(queries|hits)_total\{[^}]*\} (\S+)", text, re.M)}
        return got.get("queries", 0.0), got.get("hits", 0.0)

    def reset(self) -> None:
        import httpx

        r = httpx.post(self.base + "/reset_prefix_cache", timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"POST {self.base}/reset_prefix_cache answered {r.status_code}: {r.text[:300]}")
        self.start = self._counters()

    def hit_rate(self) -> float:
        q, h = self._counters()
        dq = q - self.start[0]
        return (h - self.start[1]) / dq if dq else 0.0


class Results:
    """Runs per system; the table shows each system's median, range and run count."""

    def __init__(self, n: int):
        self.n = n
        self.runs: dict[str, list[dict]] = {}
        self.notes: dict[str, str] = {}

    def add(self, system: str, r: dict, note: str = "") -> float:
        rps = self.n / r["wall"]
        self.runs.setdefault(system, []).append({**r, "rps": rps})
        self.notes.setdefault(system, note)
        hit = f", prefix cache hits {r['prefix_hit']:.1%}" if "prefix_hit" in r else ""
        C.log(f"{system}: {rps:.2f} req/s ({r['wall']:.1f} s, {r['tokens']} tokens, {r['errors']} errors{hit})")
        return rps

    def median(self, system: str) -> float:
        return statistics.median(x["rps"] for x in self.runs[system])

    def paired(self, system: str, baseline: str) -> list[float]:
        """``system`` / ``baseline`` round by round: runs of one round are minutes apart, so a
        machine that drifts (this VM's speed moved by up to 20 % within a quarter of an hour)
        moves both sides of each ratio alike."""
        return [a["rps"] / b["rps"] for a, b in zip(self.runs[system], self.runs[baseline])]

    def rows(self) -> list[dict]:
        out = []
        for system, runs in self.runs.items():
            rps = [x["rps"] for x in runs]
            hits = [x["prefix_hit"] for x in runs if "prefix_hit" in x]
            cpus = [x["cpu_s"] for x in runs if "cpu_s" in x]
            out.append({"system": system, "runs": len(runs), "req_s": f"{self.median(system):.2f}",
                        "range": f"{min(rps):.2f}-{max(rps):.2f}",
                        "wall_s": f"{statistics.median(x['wall'] for x in runs):.1f}",
                        "cpu_s": f"{statistics.median(cpus):.1f}" if cpus else "-",
                        "tok_s": f"{statistics.median(x['tokens'] / x['wall'] for x in runs):.0f}",
                        "errors": sum(x["errors"] for x in runs),
                        "prefix_hit": f"{max(hits):.1%}" if hits else "-", "note": self.notes[system]})
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="prompts (default 2000; 48 with --quick)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="raw-client sweep (default 64 96 128; 64 with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="pairs of modelyard and the raw client at its best concurrency (default 4; 1 with --quick)")
    ap.add_argument("--start-rounds", type=int, default=None,
                    help="turns of run-batch and modelyard run, engine start included (default 4; 1 with --quick)")
    ap.add_argument("--in-flight", type=int, default=None,
                    help="modelyard's requests in flight (default: what it gives a managed model with max_num_seqs 64)")
    ap.add_argument("--shard-rows", type=int, default=None, help="pipeline shard_rows (default: the config default)")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: few prompts, one sweep point, one round")
    ap.add_argument("--skip-run-batch", action="store_true", help="skip run-batch and the like-for-like run")
    ap.add_argument("--clients", action="store_true",
                    help="also measure a raw httpx client at 64 in flight, before the sweep (not in the ceiling)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    from modelyard.config import ModelConfig

    n = a.n or (48 if a.quick else 2000)
    sweep = a.concurrency or ([64] if a.quick else [64, 96, 128])
    rounds = a.rounds or (1 if a.quick else 4)
    start_rounds = a.start_rounds or (1 if a.quick else 4)
    in_flight = a.in_flight or ModelConfig.model_validate(managed_model()).in_flight
    prompts = C.make_prompts(n)
    res = Results(n)
    peak_rss = 0.0

    with C.workdir("modelyard-bench-tp-", a.keep) as work:
        data = write_input(work / "prompts.parquet", prompts)
        os.environ["PREFECT_HOME"] = str(work / "prefect-inproc")
        os.environ.pop("PREFECT_API_URL", None)
        with C.managed_servers({"tiny": managed_model()}, work, {"VLLM_SERVER_DEV_MODE": "1"}) as servers:
            server = servers["tiny"]
            url, served, model_path = server.url, server.served_name, server.path
            C.log(f"server up at {url} ({model_path})")
            cache = PrefixCache(url)
            ext = {"model": served, "endpoints": [url], "max_in_flight": in_flight}
            # Untimed warm-up (other prompts): the engine's first batches, Prefect's ephemeral API,
            # the command line's Prefect home (created now, as by a user's first run).
            warm_data = write_input(work / "warm.parquet", C.make_prompts(64, seed=1))
            run_raw(url, served, C.make_prompts(64, seed=1), a.max_tokens, 64)
            warm = pipeline_config(work / "warm.yaml", "bench-warm", warm_data, work / "out-warm", ext,
                                   a.max_tokens, a.shard_rows)
            C.run_flow(warm)
            if not a.skip_run_batch:
                exe = C.ORCH_PYTHON.with_name("modelyard")
                C.run_subprocess([str(exe), "run", str(warm), "--output", str(work / "out-warm-cli")],
                                 env=C.cli_env(work / "prefect-cli"), cwd=C.ROOT)
            # 1. the sweep: each raw concurrency once; the best is the ceiling's concurrency
            if a.clients:
                cache.reset()
                res.add("raw httpx c=64", {**run_raw(url, served, prompts, a.max_tokens, 64, "httpx"),
                                           "prefix_hit": cache.hit_rate()}, "httpx.AsyncClient, not in the ceiling")
            for c in sweep:
                cache.reset()
                cpu0 = C.cpu_seconds()
                raw = run_raw(url, served, prompts, a.max_tokens, c)
                res.add(f"raw aiohttp c={c}", {**raw, "prefix_hit": cache.hit_rate(), "cpu_s": C.cpu_seconds() - cpu0},
                        "asyncio workers, fixed concurrency")
            best_c = max(sweep, key=lambda c: res.median(f"raw aiohttp c={c}"))
            best = f"raw aiohttp c={best_c}"
            C.log(f"best raw concurrency: {best_c}")
            # 2. pairs: modelyard and the raw client at that concurrency, back to back, the order
            # alternating (raw first, then modelyard first, ...) so that a steady drift of the
            # machine's speed favours neither
            pairs: list[tuple[float, float]] = []
            cpu_pairs: list[tuple[float, float]] = []
            for r in range(rounds):
                got: dict[str, float] = {}
                cpu: dict[str, float] = {}
                for system in (["raw", "modelyard"] if r % 2 == 0 else ["modelyard", "raw"]):
                    cache.reset()
                    cpu0 = C.cpu_seconds()
                    if system == "raw":
                        with C.RssSampler():  # its polling costs the same CPU on both sides of the pair
                            raw = run_raw(url, served, prompts, a.max_tokens, best_c)
                        cpu[system] = C.cpu_seconds() - cpu0
                        got[system] = res.add(best, {**raw, "prefix_hit": cache.hit_rate(), "cpu_s": cpu[system]})
                        continue
                    cfg = pipeline_config(work / f"inproc-{r}.yaml", "bench-throughput", data,
                                          work / f"out-inproc-{r}", ext, a.max_tokens, a.shard_rows)
                    with C.RssSampler() as rss:
                        t0 = time.time()
                        manifest = C.run_flow(cfg)
                        returned = time.time() - t0
                    cpu[system] = C.cpu_seconds() - cpu0
                    peak_rss = max(peak_rss, rss.peak_mb)
                    # the measure: flow start to committed output, here the moment the
                    # manifest (written last, then moved into place) was written; after that
                    # Prefect still finishes the flow run (its final state)
                    wall = (work / f"out-inproc-{r}" / "_manifest.json").stat().st_mtime - t0
                    tokens, errors = manifest_tokens(manifest)
                    got[system] = res.add("modelyard (in-process)",
                                          {"wall": wall, "returned": returned, "tokens": tokens, "errors": errors,
                                           "prefix_hit": cache.hit_rate(), "cpu_s": cpu[system]},
                                          f"flow call to commit; {manifest['input']['shards']} shard(s), "
                                          f"in flight {in_flight}")
                pairs.append((got["modelyard"], got["raw"]))
                cpu_pairs.append((cpu["modelyard"], cpu["raw"]))
        ratios_raw = [m / r for m, r in pairs]
        ratio_raw = statistics.median(ratios_raw)
        ratio_cpu = statistics.median(m / r for m, r in cpu_pairs)
        my_runs = res.runs["modelyard (in-process)"]
        notes = [f"modelyard / raw c={best_c}, pair by pair: {' '.join(f'{x:.3f}' for x in ratios_raw)}; "
                 f"all pairs' time, raw over modelyard: {sum(n / r for _, r in pairs) / sum(n / m for m, _ in pairs):.3f}",
                 f"orchestrator CPU seconds per run (this process and Prefect's API subprocess; vLLM's "
                 f"processes excluded), modelyard / raw client, pair by pair: "
                 f"{' '.join(f'{m:.1f}/{r:.1f}' for m, r in cpu_pairs)}",
                 f"modelyard from the flow call to its return (Prefect finishing the flow run): median "
                 f"{statistics.median(n / r['returned'] for r in my_runs):.2f} req/s"]
        ratio_rb = float("nan")
        if not a.skip_run_batch:
            exe = C.ORCH_PYTHON.with_name("modelyard")
            for r in range(start_rounds):
                for system in (["rb", "lfl"] if r % 2 == 0 else ["lfl", "rb"]):
                    if system == "rb":
                        res.add("vllm run-batch", run_batch(work, model_path, prompts, a.max_tokens),
                                "engine start included")
                        continue
                    out = work / f"out-managed-{r}"
                    cfg = pipeline_config(work / f"managed-{r}.yaml", "bench-throughput-managed", data, out,
                                          managed_model(), a.max_tokens, a.shard_rows)
                    log = work / f"modelyard-run-{r}.log"
                    wall, rc, _ = C.run_subprocess([str(exe), "run", str(cfg)], env=C.cli_env(work / "prefect-cli"),
                                                   cwd=C.ROOT, log_path=log)
                    if rc != 0:
                        raise RuntimeError(f"modelyard run exited {rc}: {log.read_text()[-3000:]}")
                    tokens, errors = manifest_tokens(json.loads((out / "_manifest.json").read_text()))
                    res.add("modelyard run (like for like)", {"wall": wall, "tokens": tokens, "errors": errors},
                            "subprocess, managed server start included")
            ratios_rb = res.paired("modelyard run (like for like)", "vllm run-batch")
            ratio_rb = statistics.median(ratios_rb)
            notes.append(f"modelyard run / run-batch round by round: {' '.join(f'{x:.3f}' for x in ratios_rb)}; "
                         f"ratio of the medians "
                         f"{res.median('modelyard run (like for like)') / res.median('vllm run-batch'):.3f}")
            # what a run costs beyond the engine, in seconds: the same whatever the number of prompts
            extra = [mine["wall"] - theirs["wall"] for mine, theirs in zip(res.runs["modelyard run (like for like)"],
                                                                           res.runs["vllm run-batch"])]
            notes.append(f"modelyard run - run-batch, seconds, round by round: {' '.join(f'{x:+.1f}' for x in extra)}; "
                         f"median {statistics.median(extra):+.1f} s")
    print(C.table(res.rows(), ["system", "runs", "req_s", "range", "wall_s", "cpu_s", "tok_s", "errors", "prefix_hit", "note"]))
    print(f"{n} prompts of {a.max_tokens} tokens; req_s, wall_s, cpu_s (the orchestrator's), tok_s: medians of the runs; prefix_hit: the highest "
          f"prefix-cache hit rate of a run (the cache is emptied before each); best raw concurrency: {best_c}")
    print("\n".join(notes))
    print("ratios below: the medians of the pair-by-pair (raw) and round-by-round (run-batch) ratios")
    print("peak RSS: psutil sampling (50 ms) of the orchestrator process during the in-process modelyard runs")
    print("cpu_ratio_vs_raw: the median over the pairs of the orchestrator's CPU seconds, modelyard's over the raw "
          "client's (lower is better: on a CPU server every second of it is taken from the engine)")
    print(f"ratio_vs_raw={ratio_raw:.3f} ratio_vs_run_batch={ratio_rb:.3f} peak_rss_mb={peak_rss:.0f} "
          f"cpu_ratio_vs_raw={ratio_cpu:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
