"""The orchestrator's own rate: modelyard against an endpoint that answers at once.

On a GPU the engine is fast and the orchestrator's cost per row is what limits a run. This
script measures that cost alone, against an OpenAI-compatible endpoint that costs nothing
measurable: Debian's nginx with fixed replies (``benchmarks/_instant.py``; chat replies are a
valid ``choice`` answer, ``/v1/embeddings`` answers as many vectors as inputs). nginx runs one
worker process, so on 2 cores the orchestrator has the other.

What one run measures, on the same endpoint:

1. **bare client**: a minimal asyncio aiohttp client sends the chat request modelyard's stage
   sends, at a sweep of fixed concurrencies (default 16 32 64), each on asyncio's own event loop
   and on uvloop (the loop modelyard's dispatcher runs); the best of all is the baseline. The
   same bare loop over ``modelyard.wire`` (modelyard's way out to ``http://`` endpoints) is shown
   beside it, not as the baseline: what modelyard's HTTP costs without the rest. It must
   reach ``--min-bare`` req/s (default 4,000), or the machine is too busy to measure the
   orchestrator and the script stops (exit 1). The same client on ``/v1/embeddings`` with one
   input and with 32 inputs per request shows what the endpoint gives embeddings. The sweep's
   best concurrency is measured again between rounds and at the end, and the baseline is the
   median of those runs and its first.
2. **modelyard** (``flows.pipeline.run_pipeline`` in this process under Prefect's ephemeral API,
   as ``modelyard run`` does; an ``endpoints:`` model as a user writes it, with modelyard's default
   ``max_in_flight`` (96 for an external endpoint; ``--in-flight N`` sets it, e.g. to the bare
   client's best concurrency); the request cache on, as by default) on a one-stage ``choice`` pipeline
   and on a one-stage embed pipeline, at two input sizes (default 20,000 and 100,000 rows of
   distinct texts). Each rate is **marginal**: (rows2 - rows1) / (time2 - time1), from the flow
   call to its committed output (the manifest, written last), so the fixed cost of a run (Prefect's flow and subflow runs, planning,
   commit) cancels. This VM's speed drifts by 20-30 % within minutes, and a marginal rate is the
   difference of two timed runs, so one pair moves a lot: the runs go in ``--rounds`` rounds
   (default 3), each round every size and pipeline in turn with a new output (so a new request
   cache), and each rate is the median of the rounds' marginal rates.
3. **cached**: the ``choice`` pipelines again, unchanged, every request answered by the request
   cache (marginal too).
4. **CPU time** of this process (all threads) during each run, and the marginal rows per
   CPU-second: what a row costs the orchestrator, which other load on a shared machine moves
   far less than wall time (printed beside the rates, not in the last line).
5. **peak RSS** of this process (psutil, every 50 ms) during each modelyard run; in the first
   round every run of the small size comes before any of the large one, so the ratio between
   the sizes' peaks in that round shows whether memory grows with the input (``peak_rss_mb``:
   the highest of all runs).

Prints a table of every measurement, then as the last line
``chat_rows_s=N chat_ratio_vs_bare=R embed_rows_s=N cached_rows_s=N peak_rss_mb=M``
(R: modelyard's marginal chat rows/s over the bare client's req/s). Exits 0 if it ran; it
asserts nothing about time. Targets (issue 12): R >= 0.8 and chat >= 4,000; embed >= 10,000;
cached >= 20,000; RSS ratio <= 1.2.

    make bench-orchestrator                            # 20,000 and 100,000 rows, 3 rounds, about 4 minutes
    .venv/bin/python benchmarks/orchestrator.py --quick  # 1,000 and 4,000 rows, CI smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (sets Prefect's environment before anything imports it)
import _instant as I  # noqa: E402

LOOPS = ("asyncio", "uvloop")  # the bare client's event loops (modelyard's: MODELYARD_EVENT_LOOP, uvloop by default)
PROMPT = "Classify this ticket: {{ text }}"
PARAMS = {"temperature": 0, "max_tokens": 4}


def texts(n: int, start: int = 0) -> list[str]:
    """Distinct short ticket texts (so that no two rows share a cache key)."""
    w = C.WORDS
    return [f"Ticket {i}: my {w[i % len(w)]} stopped working after the {w[(i * 7 + 3) % len(w)]} update, "
            f"please help." for i in range(start, start + n)]


def write_input(path: Path, n: int, start: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"t{i:07d}" for i in range(start, start + n)], "text": texts(n, start)}), path)
    return path


def config(path: Path, kind: str, data: Path, out: Path, url: str, in_flight: int | None, batch: int | None,
           ray_workers: int | None = None) -> Path:
    """A one-stage pipeline on the instant endpoint; ``in_flight`` None: modelyard's default."""
    bound = {"max_in_flight": in_flight} if in_flight else {}
    if kind == "chat":
        model = {"model": I.CHAT, "endpoints": [url], **bound}
        stage = {"name": "label", "model": "m", "prompt": PROMPT, "choice": I.CHOICES, "params": PARAMS,
                 "output": "label"}
    else:
        model = {"model": I.EMBED, "task": "embed", "endpoints": [url], **bound}
        stage = {"name": "embed", "model": "m", "input": "{{ text }}", "output": "embedding"}
        if batch is not None:
            stage["batch_size"] = batch
    runner = {"runner": {"kind": "ray", "num_cpus": ray_workers}} if ray_workers else {}
    return C.write_yaml(path, {"name": f"bench-orch-{kind}", "input": {"uri": str(data), "key": "id"},
                               "models": {"m": model}, "stages": [stage], "output": {"uri": str(out)}, **runner})


# -- the bare client --------------------------------------------------------------------------

def new_loop(kind: str):
    """A new event loop of ``kind``: ``asyncio`` (the standard library's) or ``uvloop``."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def _bare(url: str, path: str, bodies: list[dict], concurrency: int, decode: bool = False,
                wire: bool = False) -> float:
    """Fixed-concurrency workers over the bodies; returns the wall time. Any error stops it.
    ``decode``: turn base64 vectors into float lists, as a client that uses them must.
    ``wire``: through ``modelyard.wire`` instead of aiohttp."""
    import array
    import base64

    import aiohttp

    it = iter(bodies)
    if wire:  # modelyard's own way out (modelyard.wire), bare: shown beside the baseline
        from modelyard import fastjson
        from modelyard.wire import Wire, header_block

        w, headers = Wire(url), header_block({"Content-Type": "application/json"})

        async def wire_worker() -> None:
            for body in it:
                status, raw = await w.post(path, fastjson.dumps(body), headers, 60)
                if status != 200:
                    raise RuntimeError(f"{url}{path} answered {status}")
                fastjson.loads(raw)

        t0 = time.perf_counter()
        await asyncio.gather(*(wire_worker() for _ in range(concurrency)))
        return time.perf_counter() - t0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def worker() -> None:
            for body in it:
                async with session.post(url + path, json=body) as r:
                    r.raise_for_status()
                    reply = await r.json()
                if decode:
                    for d in reply["data"]:
                        array.array("f", base64.b64decode(d["embedding"])).tolist()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0


def bare(url: str, kind: str, n: int, concurrency: int, per_request: int = 1, encoding: str | None = None,
         loop: str = "asyncio", wire: bool = False) -> dict:
    """``n`` rows through the bare client on a ``loop`` event loop; rows/s and requests/s.
    Embeddings: ``per_request`` inputs per request, as float lists or (``encoding="base64"``)
    base64, decoded to floats. ``wire``: chat through ``modelyard.wire`` instead of aiohttp."""
    rows = texts(n, start=10_000_000)
    if kind == "chat":
        path = "/chat/completions"
        bodies = [{"model": I.CHAT, **PARAMS, "messages": [{"role": "user", "content": f"Classify this ticket: {t}"}],
                   "structured_outputs": {"choice": I.CHOICES}} for t in rows]
    else:
        path = "/embeddings"
        groups = [rows[i:i + per_request] for i in range(0, n, per_request)]
        bodies = [{"model": I.EMBED, "input": g if per_request > 1 else g[0],
                   **({"encoding_format": encoding} if encoding else {})} for g in groups]
    c0 = _cpu()
    with asyncio.Runner(loop_factory=lambda: new_loop(loop)) as runner:
        wall = runner.run(_bare(url, path, bodies, concurrency, decode=encoding == "base64", wire=wire))
    return {"rows": n, "wall": wall, "cpu": _cpu() - c0, "rows_s": n / wall, "req_s": len(bodies) / wall}


# -- modelyard --------------------------------------------------------------------------------

def modelyard(cfg: Path, out: Path, stage: str) -> dict:
    """One in-process flow run; wall time from the flow call to its committed output (the manifest,
    written last), peak RSS, the stage's counts.

    Prefect's heartbeats are on, as in a user's run; modelyard's flows do not wait for their thread
    as a run ends (``flows/heartbeats.py``; before that every run ended on a whole second after its
    start, and this benchmark turned heartbeats off). The flow's return is kept as ``returned``."""
    with C.RssSampler() as rss:
        c0, l0, t0, w0 = _cpu(), _thread_cpu(LOOP), time.perf_counter(), time.time()
        manifest = C.run_flow(cfg)
        returned, cpu, loop = time.perf_counter() - t0, _cpu() - c0, _thread_cpu(LOOP) - l0
    wall = (out / "_manifest.json").stat().st_mtime - w0
    st = manifest["stages"][stage]
    return {"rows": manifest["rows"], "wall": wall, "returned": returned, "rows_s": manifest["rows"] / wall,
            "rss": rss.peak_mb, "cpu": cpu, "loop": loop, "errors": st["errors"], "cached": st["cached"],
            "shards": manifest["input"]["shards"]}


LOOP = "modelyard-dispatcher"  # the thread whose event loop sends every row (modelyard.client.Dispatcher)


def _thread_cpu(name: str) -> float:
    """CPU seconds the thread called ``name`` has used (0 before it exists; Linux's /proc, else 0): the
    event loop is one thread, so its CPU per row bounds the rate whatever the other threads do."""
    tid = next((t.native_id for t in threading.enumerate() if t.name == name), None)
    try:
        with open(f"/proc/self/task/{tid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu() -> float:
    """CPU seconds this process has used (every thread): what a row costs the orchestrator, which
    other processes on the machine slow down far less than they slow down wall time."""
    t = os.times()
    return t.user + t.system


def marginal(small: dict, big: dict, key: str = "wall") -> float:
    """(rows2 - rows1) / (time2 - time1): the rate with a run's fixed cost taken out. A quick run
    that is too short to tell (the difference lost in noise) gives the large run's plain rate.
    ``key="cpu"``: rows per CPU-second of this process instead of per second."""
    dt = big[key] - small[key]
    return (big["rows"] - small["rows"]) / dt if dt > 0 else big["rows"] / big[key]


def fixed_cost(small: dict, big: dict) -> float:
    """Seconds of a run that no row accounts for (the line through both runs at 0 rows): Prefect's
    flow and subflow runs, planning, the commit. A rough figure: a marginal rate off by 10 % moves it
    by a tenth of the small run's row time."""
    return small["wall"] - small["rows"] / marginal(small, big)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=None, help="rows of the two inputs (default 20000 100000)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="bare-client sweep (default 16 32 64; 64 with --quick)")
    ap.add_argument("--bare-n", type=int, default=None, help="requests per bare-client run (default 20000)")
    ap.add_argument("--min-bare", type=float, default=None,
                    help="least bare req/s to go on measuring (default 4000; 0 with --quick)")
    ap.add_argument("--in-flight", type=int, default=None,
                    help="modelyard's max_in_flight (default: left out of the config, so modelyard's own, 96)")
    ap.add_argument("--batch-size", type=int, default=None, help="the embed stage's batch_size (default: its default)")
    ap.add_argument("--dimensions", type=int, default=384, help="embedding dimension (default 384, MiniLM's)")
    ap.add_argument("--only", nargs="+", choices=["chat", "cached", "embed"], default=None,
                    help="measure only these modelyard pipelines (for profiling)")
    ap.add_argument("--ray", action="store_true",
                    help="also the chat pipeline on a local Ray cluster of 1 and of 2 workers (marginal rows/s; "
                    "every worker gets its share of max_in_flight)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of the modelyard runs, every size in each (default 3; 1 with --quick); rates are "
                    "the medians of the rounds' marginal rates")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: small inputs, one sweep point")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    sizes = a.sizes or ([1_000, 4_000] if a.quick else [20_000, 100_000])
    sweep = a.concurrency or ([64] if a.quick else [16, 32, 64])
    bare_n = a.bare_n or (3_000 if a.quick else 20_000)
    min_bare = a.min_bare if a.min_bare is not None else (0 if a.quick else 4_000)
    rounds = max(1, a.rounds or (1 if a.quick else 3))
    only = set(a.only or ["chat", "cached", "embed"])
    if "cached" in only:
        only.add("chat")
    rows: list[dict] = []

    with C.workdir("modelyard-bench-orch-", a.keep) as work, I.instant_endpoint(work, a.dimensions) as url:
        os.environ["PREFECT_HOME"] = str(work / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        C.log(f"instant endpoint at {url}")
        bare(url, "chat", min(bare_n, 2_000), sweep[-1])  # warm-up
        first = {}
        for c in sweep:  # on both event loops: modelyard's dispatcher runs uvloop, the baseline is the best
            for lp in LOOPS:
                r = first[(c, lp)] = bare(url, "chat", bare_n, c, loop=lp)
                rows.append({"system": f"bare aiohttp chat c={c} {lp}", **r})
                C.log(f"bare chat c={c} {lp}: {r['req_s']:.0f} req/s")
        best = max(first, key=lambda k: first[k]["req_s"])
        best_c, best_loop = best
        if first[best]["req_s"] < min_bare:
            print(f"the bare client reached {first[best]['req_s']:.0f} req/s, under --min-bare {min_bare:.0f}: "
                  f"the machine is too busy to measure the orchestrator (uptime: load {load()})")
            return 1
        for per, enc in ((1, None), (32, None), (32, "base64")):
            r = bare(url, "embed", bare_n, best_c, per, enc, loop=best_loop)
            what = f"{per}/request" + (f" {enc}" if enc else "")
            rows.append({"system": f"bare aiohttp embed c={best_c} {best_loop}, {what}", **r})
            C.log(f"bare embed {what}: {r['rows_s']:.0f} rows/s")
        r = bare(url, "chat", bare_n, best_c, loop=best_loop, wire=True)
        rows.append({"system": f"bare wire chat c={best_c} {best_loop}", **r,
                     "note": "modelyard.wire's own cost, not the baseline"})
        C.log(f"bare wire chat: {r['req_s']:.0f} req/s")
        in_flight = a.in_flight  # None: the config leaves max_in_flight out, as a user's does
        from modelyard.config import ModelConfig

        shown = in_flight or ModelConfig(model=I.CHAT, endpoints=[url]).in_flight
        shown = f"{shown}" if in_flight else f"{shown} (default)"
        # untimed warm-up: Prefect's ephemeral API, imports, the first flow run's one-off costs
        warm = write_input(work / "warm.parquet", 2_000, start=20_000_000)
        C.run_flow(config(work / "warm.yaml", "chat", warm, work / "out-warm", url, in_flight, None))
        got: dict[tuple[str, int, int], dict] = {}
        bares = [first[best]]
        inputs = {n: write_input(work / f"in-{n}.parquet", n) for n in sizes}
        plan = [("chat", "chat", "label"), ("cached", "chat", "label"), ("embed", "embed", "embed")]
        for k in range(rounds):  # in each round every small run comes before any large one (RSS: round 1)
            for n in sizes:
                for what, kind, stage in plan:
                    if what not in only:
                        continue
                    out = work / f"out-{kind}-{n}-{k}"  # a new output, so a new request cache, each round
                    cfg = config(work / f"{kind}-{n}-{k}.yaml", kind, inputs[n], out, url, in_flight, a.batch_size)
                    r = got[(what, n, k)] = modelyard(cfg, out, stage)
                    note = f"{r['shards']} shards, in flight {shown}, {r['cached']} cached, {r['errors']} errors"
                    rows.append({"system": f"modelyard {what} {n} rows" + (f", round {k + 1}" if rounds > 1 else ""),
                                 **r, "note": note})
                    C.log(f"modelyard {what} {n} (round {k + 1}): {r['rows_s']:.0f} rows/s ({r['wall']:.1f} s, "
                          f"{r['cpu']:.1f} CPU-s, peak RSS {r['rss']:.0f} MB; {note})")
            if k < rounds - 1:  # the baseline again between rounds: the machine's speed drifts
                r = bare(url, "chat", bare_n, best_c, loop=best_loop)
                bares.append(r)
                rows.append({"system": f"bare aiohttp chat c={best_c} {best_loop} (after round {k + 1})", **r})
        for workers in ((1, 2) if a.ray else ()):
            for n in sizes:
                out = work / f"out-ray{workers}-{n}"
                cfg = config(work / f"ray{workers}-{n}.yaml", "chat", inputs[n], out, url, in_flight, None, workers)
                r = got[(f"ray{workers}", n, 0)] = modelyard(cfg, out, "label")
                rows.append({"system": f"modelyard chat on Ray, {workers} worker(s), {n} rows", **r,
                             "note": f"{r['shards']} shards, in flight {shown} in all"})
                C.log(f"modelyard chat on Ray ({workers}) {n}: {r['rows_s']:.0f} rows/s ({r['wall']:.1f} s)")
        again = bare(url, "chat", bare_n, best_c, loop=best_loop)
        bares.append(again)
        rows.append({"system": f"bare aiohttp chat c={best_c} {best_loop} (again)", **again})
    bare_rate = statistics.median(b["req_s"] for b in bares)
    bare_cpu = statistics.median(b["rows"] / b["cpu"] for b in bares)
    bare_each = " ".join(f"{b['req_s']:.0f}" for b in bares)

    def per_round(w: str, key: str = "wall") -> list[float]:
        return [marginal(got[(w, sizes[0], k)], got[(w, sizes[1], k)], key) for k in range(rounds)]

    rate = {w: statistics.median(per_round(w)) for w in ("chat", "cached", "embed") if w in only}
    for w, v in rate.items():
        per_cpu = statistics.median(per_round(w, "cpu"))
        per_loop = statistics.median(per_round(w, "loop")) if got[(w, sizes[1], 0)]["loop"] else 0
        each = " ".join(f"{x:.0f}" for x in per_round(w))
        fixed = statistics.median(fixed_cost(got[(w, sizes[0], k)], got[(w, sizes[1], k)]) for k in range(rounds))
        rows.append({"system": f"modelyard {w}, marginal {sizes[0]}->{sizes[1]}", "rows_s": v,
                     "note": f"{v / bare_rate:.3f} x bare; {per_cpu:.0f} rows/CPU-s, {per_cpu / bare_cpu:.3f} x bare; "
                             f"{per_loop:.0f} rows/loop-CPU-s; fixed {fixed:.2f} s a run" + (f"; rounds: {each}" if rounds > 1 else "")})
    for workers in ((1, 2) if a.ray else ()):
        v = marginal(got[(f"ray{workers}", sizes[0], 0)], got[(f"ray{workers}", sizes[1], 0)])
        rows.append({"system": f"modelyard chat on Ray, {workers} worker(s), marginal {sizes[0]}->{sizes[1]}",
                     "rows_s": v, "note": f"{v / bare_rate:.3f} x bare (Ray's start cancels out)"})
    peaks = {n: max(got[(w, n, 0)]["rss"] for w in only) for n in sizes}
    peak_all = max(r["rss"] for r in got.values())
    print(C.table([fmt(r) for r in rows], ["system", "rows", "wall_s", "cpu_s", "rows_s", "req_s", "rss_mb", "note"]))
    print("cpu_s: CPU time of this process (all its threads) during the run; rows per CPU-second is what a row "
          "costs the orchestrator, far less moved by other load on the machine than rows/s; rows per loop-CPU-s: "
          "per CPU-second of the dispatcher's event-loop thread alone, the one thread every row passes through")
    print("modelyard's wall time: from the flow call to its committed output (the manifest), Prefect's flow run "
          f"heartbeats on; its dispatcher's event loop: {os.environ.get('MODELYARD_EVENT_LOOP', 'uvloop')}; its requests: "
          f"{os.environ.get('MODELYARD_HTTP', 'wire')} (MODELYARD_HTTP)")
    print(f"bare baseline: c={best_c} on {best_loop}, median of its {len(bares)} runs (first, between rounds, at the end): "
          f"{bare_rate:.0f} req/s ({bare_each}), {bare_cpu:.0f} requests per "
          "CPU-second of this process")
    if rounds > 1:
        print(f"modelyard: {rounds} rounds, each every size in turn; a rate is the median of the rounds' marginal "
              "rates (each from the two sizes of one round, minutes apart at most)")
    print(f"peak RSS (this process, psutil every 50 ms), round 1: {peaks[sizes[0]]:.0f} MB at {sizes[0]} rows, "
          f"{peaks[sizes[1]]:.0f} MB at {sizes[1]} rows, ratio {peaks[sizes[1]] / peaks[sizes[0]]:.3f}; "
          f"the highest of all runs {peak_all:.0f} MB")
    print(f"load average at the end: {load()}")
    print(f"chat_rows_s={rate.get('chat', 0):.0f} chat_ratio_vs_bare={rate.get('chat', 0) / bare_rate:.3f} "
          f"embed_rows_s={rate.get('embed', 0):.0f} cached_rows_s={rate.get('cached', 0):.0f} "
          f"peak_rss_mb={peak_all:.0f}")
    return 0


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt(r: dict) -> dict:
    out = {"system": r["system"], "note": r.get("note", "")}
    for k, col, f in (("rows", "rows", "{:d}"), ("wall", "wall_s", "{:.2f}"), ("cpu", "cpu_s", "{:.2f}"),
                      ("rows_s", "rows_s", "{:.0f}"),
                      ("req_s", "req_s", "{:.0f}"), ("rss", "rss_mb", "{:.0f}")):
        if k in r:
            out[col] = f.format(r[k])
    return out


if __name__ == "__main__":
    sys.exit(main())
