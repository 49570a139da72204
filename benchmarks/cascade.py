"""Cascade benchmark: accuracy and cost of the small model alone, the big one alone, and cascades.

    python benchmarks/cascade.py [--n 300] [--quick]

On the demo's tickets with their true kind kept (configs/data/make_tickets.py), one `choice`
stage labels each ticket billing, bug, feature or other: with the small model only, the big
model only, and a two-tier cascade small -> big at several thresholds (the quartiles of the
small model's own confidences, and `auto` calibrated to 90 % agreement with the big model).
Each system runs on its own fresh request cache, through the real flow, on managed vLLM CPU
servers of builtin:tiny-llama (small) and builtin:small-llama (big). Prices are illustrative
per-token prices; cost is what the manifest says.

On these random-weight models the accuracies are noise (about one in four); the point is that
the script measures what a user needs to choose a threshold: on a GPU with real models (edit
MODELS) the same run gives real figures. Last line:
``small_acc=A big_acc=B best_cascade_acc=C best_cascade_cost_vs_big=R escalated=E``, where
"best" is the cheapest cascade whose accuracy is within 1 point of the big model's (else the
most accurate one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks._common as C  # noqa: E402
from configs.data.make_tickets import tickets  # noqa: E402

MODELS = {
    "small": {"model": "builtin:tiny-llama", "serve": {"max_model_len": 1024, "max_num_seqs": 64}},
    "big": {"model": "builtin:small-llama", "serve": {"max_model_len": 1024, "max_num_seqs": 64}},
}
PRICES = {"small": {"prompt_per_1m": 0.02, "completion_per_1m": 0.05},
          "big": {"prompt_per_1m": 0.50, "completion_per_1m": 1.50}}
LABELS = ["billing", "bug", "feature", "other"]


def external(servers: dict) -> dict:
    """The running managed servers as external endpoints, with prices."""
    return {n: {"model": s.served_name, "endpoints": [s.url], "price": PRICES[n]} for n, s in servers.items()}


@contextlib.contextmanager
def running(endpoints: str | None, work: Path):
    """The two models as external endpoints: given ones, or managed servers started here."""
    if endpoints:
        urls = dict(x.split("=", 1) for x in endpoints.split(","))
        yield {n: {"model": MODELS[n]["model"], "endpoints": [urls[n]], "price": PRICES[n]} for n in MODELS}
        return
    with C.managed_servers(MODELS, work) as servers:
        C.log("both servers up")
        yield external(servers)


def stage(how: dict) -> dict:
    return {"name": "label", "prompt": "Classify this support ticket as billing, bug, feature or other.\n\n{{ body }}",
            "choice": LABELS, "params": {"temperature": 0, "max_tokens": 8}, "output": "label", **how}


def run(work: Path, name: str, data: Path, models: dict, how: dict) -> tuple[dict, list[dict]]:
    import pyarrow.dataset as ds

    cfg = C.write_yaml(work / f"{name}.yaml", {
        "name": f"bench-cascade-{name}", "input": {"uri": str(data), "key": "ticket_id"}, "shard_rows": 100,
        "models": models, "stages": [stage(how)], "output": {"uri": str(work / f"out-{name}")},
        "cache": {"path": str(work / f"cache-{name}.sqlite")}})
    m = C.run_flow(cfg)
    return m, ds.dataset(m["output"]["uri"], format="parquet").to_table(columns=["ticket_id", "label", "_lineage"]
                                                                           ).to_pylist()


def score(name: str, m: dict, rows: list[dict], truth: dict[str, str], big: dict[str, str] | None) -> dict:
    st = m["stages"]["label"]
    lin = [r["_lineage"]["label"] for r in rows]
    escalated = sum(1 for x in lin if x.get("tier")) if st.get("strategy") == "cascade" else 0
    out = {"system": name, "rows": len(rows),
           "accuracy": round(sum(r["label"] == truth[r["ticket_id"]] for r in rows) / len(rows), 3),
           "cost": st["cost"]["total"], "escalated": f"{escalated / len(rows):.0%}" if escalated else "-",
           "threshold": "-" if st.get("strategy") != "cascade" else f"{st['thresholds'][0]:.4g}"}
    if big is not None:
        out["agree_big"] = round(sum(r["label"] == big[r["ticket_id"]] for r in rows) / len(rows), 3)
    if st.get("cost", {}).get("all_last_tier") is not None:
        out["all_big_cost"] = st["cost"]["all_last_tier"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="tickets (default 300; 40 with --quick)")
    ap.add_argument("--quick", action="store_true", help="CI smoke run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--endpoints", help="small=URL,big=URL: servers already running these models (e.g. a GPU "
                    "machine's, or a test session's) instead of starting managed ones")
    a = ap.parse_args()
    n = a.n or (40 if a.quick else 300)
    with C.workdir("modelyard-bench-cascade-", a.keep) as work:
        os.environ["PREFECT_HOME"] = str(work / "prefect")
        os.environ.pop("PREFECT_API_URL", None)
        data = work / "tickets.jsonl"
        rows = list(tickets(n, with_kind=True))
        data.write_text("".join(json.dumps(t) + "\n" for t in rows))
        truth = {t["ticket_id"]: t["kind"] for t in rows}
        with running(a.endpoints, work) as models:
            results = []
            m, big_rows = run(work, "big-only", data, models, {"model": "big"})
            big = {r["ticket_id"]: r["label"] for r in big_rows}
            results.append(score("big only", m, big_rows, truth, big))
            # threshold 0: every row stops at the small model, which also reports its confidences
            m, small_rows = run(work, "small-only", data, models, {"cascade": [{"model": "small", "min_confidence": 0},
                                                                               {"model": "big"}]})
            results.append({**score("small only", m, small_rows, truth, big), "threshold": "-", "escalated": "-"})
            confs = sorted(r["_lineage"]["label"]["confidence"] for r in small_rows
                           if r["_lineage"]["label"]["confidence"] is not None)
            quartiles = statistics.quantiles(confs, n=4) if len(confs) >= 4 else confs
            for i, th in enumerate(quartiles):
                m, out = run(work, f"cascade-{i}", data, models,
                             {"cascade": [{"model": "small", "min_confidence": round(th, 6)}, {"model": "big"}]})
                results.append(score(f"cascade q{i + 1}", m, out, truth, big))
            m, out = run(work, "cascade-auto", data, models,
                         {"cascade": [{"model": "small", "min_confidence": "auto"}, {"model": "big"}],
                          "calibrate": {"rows": min(100, n // 2), "agreement": 0.9}})
            results.append(score("cascade auto (90%)", m, out, truth, big))
    print(C.table(results, ["system", "rows", "threshold", "escalated", "accuracy", "agree_big", "cost",
                            "all_big_cost"]))
    print("accuracy against the true kind; agree_big: same label as the big model alone; cost: the manifest's "
          "(illustrative per-token prices); all_big_cost: the manifest's estimate of the cascade with every row on "
          "its last tier")
    small, big_r = results[1], results[0]
    cascades = results[2:]
    close = [r for r in cascades if r["accuracy"] >= big_r["accuracy"] - 0.01]
    best = min(close, key=lambda r: r["cost"]) if close else max(cascades, key=lambda r: r["accuracy"])
    print(f"small_acc={small['accuracy']} big_acc={big_r['accuracy']} best_cascade_acc={best['accuracy']} "
          f"best_cascade_cost_vs_big={best['cost'] / big_r['cost']:.3f} escalated={best['escalated']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
