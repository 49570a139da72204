"""The numbers behind a report's charts against the manifests and the parts (read with DuckDB)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from modelyard.charts.data import rates
from modelyard.charts.scan import reason


def _sql(folder: Path, query: str) -> list[tuple]:
    return duckdb.sql(query.replace("PARTS", f"read_parquet('{folder}/part-*.parquet')")).fetchall()


def check_report(data: dict, outputs: dict[str, Path]) -> set[str]:
    """Every chart's numbers against ``outputs`` (label -> committed folder); returns the chart ids checked."""
    import json

    manifests = {k: json.loads((f / "_manifest.json").read_text()) for k, f in outputs.items()}
    labels = [r["label"] for r in data["runs"]]
    assert sorted(labels) == sorted(outputs)
    checked = set()
    for c in data["charts"]:
        cid = c["id"]
        if cid.startswith("throughput"):
            for panel in c["panels"]:
                for line in panel["lines"]:
                    if len(labels) == 1:
                        label, stage, metric = labels[0], line["label"], "tokens" if "tokens" in panel["title"] else "rows"
                    else:
                        label, stage = line["label"], panel["title"].split(":")[0]
                        metric = "tokens" if cid.endswith("tokens") else "rows"
                    tel = manifests[label]["telemetry"]
                    cum = tel["stages"][stage][metric]
                    assert (line["x"], line["y"]) == rates(tel["t"], cum)
                    if metric == "rows":  # the sampler's last count is what the stage finished
                        assert cum[-1] == manifests[label]["stages"][stage]["rows"]
        elif cid == "in-flight":
            tel = manifests[labels[0]]["telemetry"]
            assert {x["label"] for x in c["panels"][0]["lines"]} == set(tel["in_flight"])
        elif cid == "shares":
            for panel in c["panels"]:
                m = manifests[panel["title"] if len(labels) > 1 else labels[0]]
                series = {s["label"]: s["values"] for s in panel["series"]}
                for i, stage in enumerate(panel["categories"]):
                    s = m["stages"][stage]
                    assert series["cached"][i] == s["cached"] and series["skipped"][i] == s["skipped"]
                    assert series["errors"][i] == s["errors"]
                    assert sum(v[i] for v in series.values()) == s["rows"]
        elif cid == "latency":
            for panel in c["panels"]:
                stage = panel["title"]
                for label, folder in outputs.items():
                    (n,), = _sql(folder, f"select count(_lineage.{stage}.latency_ms) from PARTS")
                    assert panel["total"][label] == sum(panel["counts"][label]) == n
                if len(labels) == 1:
                    s = manifests[labels[0]]["stages"][stage]
                    assert {m["label"]: m["x"] for m in panel["marks"]} == {
                        "p50": s["latency_ms_p50"], "p95": s["latency_ms_p95"]}
        elif cid.startswith("output-"):
            for panel in c["panels"]:
                col = panel["name"]
                for label, folder in outputs.items():
                    if panel["type"] == "counts":
                        rows = _sql(folder, f"select cast({col} as varchar), count(*) from PARTS "
                                            f"where {col} is not null group by 1")
                        want = {str(k).lower() if k in ("true", "false") else str(k): v for k, v in rows}
                        assert panel["values"][label] == want, (col, label)
                        (nulls,), = _sql(folder, f"select count(*) - count({col}) from PARTS")
                        assert panel["nulls"][label] == nulls
                    elif col != "confidence":
                        base = col.split(" ")[0]
                        (n,), = _sql(folder, f"select count({base}) from PARTS")
                        assert panel["total"][label] == sum(panel["counts"][label]) == n, (col, label)
        elif cid.startswith("together-"):
            stage = cid.removeprefix("together-")
            s = manifests[labels[0]]["stages"][stage]
            p = c["panels"][0]
            if len(labels) == 1 and s["strategy"] == "cascade":
                got = {x["label"]: x["values"] for x in p["series"]}
                for k in ("asked", "answered", "escalated"):
                    assert got[k] == [t[k] for t in s["tiers"]]
            elif len(labels) == 1 and s["strategy"] == "vote":
                assert dict(zip(p["categories"], p["series"][0]["values"])) == s["agreement"]
            elif len(labels) == 1:
                assert p["series"][0]["values"] == [r["rows"] for r in s["routes"]]
        elif cid == "cost":
            for series in c["panels"][0]["series"]:
                m = manifests[series["label"] if len(labels) > 1 else labels[0]]
                assert series["values"] == [m["cost"]["by_stage"][x] for x in c["panels"][0]["categories"]]
        elif cid == "errors":
            assert c["total"] == sum(s["errors"] for m in manifests.values() for s in m["stages"].values())
            for e in c["table"]:
                rows = [r for folder in outputs.values()
                        for r in _sql(folder, f"select _row_key, _lineage.{e['stage']}.error from PARTS "
                                              f"where _lineage.{e['stage']}.error is not null")]
                matching = [k for k, msg in rows if reason(msg) == e["reason"]]
                assert len(matching) == e["count"] and e["example"] in matching
        else:
            continue
        checked.add(cid)
    return checked
