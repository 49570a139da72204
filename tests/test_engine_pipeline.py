"""The pipeline end to end on real vLLM CPU servers and Prefect's test harness.

The two demo models are started once for the session (tests/conftest.py); the demo config run
here in-process reuses them through modelyard's server registry.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.engine

LINEAGE_ALWAYS = ("model", "model_revision", "engine_version", "prompt_sha256", "params_sha256")
LINEAGE_WHEN_RUN = ("finish_reason", "prompt_tokens", "completion_tokens", "latency_ms", "endpoint")


@pytest.fixture(scope="module")
def demo_run(servers, prefect_harness, tmp_path_factory, monkeypatch_module):
    from flows.pipeline import run_pipeline

    monkeypatch_module.chdir(ROOT)
    out = tmp_path_factory.mktemp("demo") / "out"
    t0 = time.perf_counter()
    manifest = run_pipeline(config="configs/demo.yaml", params={"date": "2026-11-27"}, output=str(out))
    return manifest, out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def input_rows() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "configs/data/tickets.jsonl").read_text().splitlines()]


def test_demo_commits_every_row_once_with_lineage(demo_run):
    manifest, out, wall = demo_run
    rows = input_rows()
    table = ds.dataset(out, format="parquet").to_table()  # pyarrow skips _manifest.json, _errors/, _lineage/
    assert table.num_rows == len(rows) == manifest["rows"] == 300
    assert sorted(table.column("_row_key").to_pylist()) == sorted(r["ticket_id"] for r in rows)
    # input columns unchanged, in input order
    assert table.column("ticket_id").to_pylist() == [r["ticket_id"] for r in rows]
    assert table.column("body").to_pylist() == [r["body"] for r in rows]
    run_id = manifest["run_id"]
    assert set(table.column("_run_id").to_pylist()) == {run_id}
    by_row = table.to_pylist()
    errors = 0
    for r in by_row:
        assert r["_source"]["uri"].endswith("configs/data/tickets.jsonl")
        for stage, rec in r["_lineage"].items():
            for f in LINEAGE_ALWAYS:
                assert rec[f], (r["_row_key"], stage, f)
            out_col = manifest["stages"][stage]["output"]
            if rec["skipped"]:
                assert r[out_col] is None and rec["attempts"] == 0
            elif rec["error"]:
                errors += 1
                assert r[out_col] is None
            else:
                for f in LINEAGE_WHEN_RUN:
                    assert rec[f] is not None, (r["_row_key"], stage, f)
                if rec["cached"]:  # the same request earlier in this run (e.g. two identical replies)
                    assert rec["attempts"] == 0 and rec["endpoint"] == "cache"
                else:
                    assert rec["attempts"] >= 1
                    # a cascade's answering tier may come from the cache (its calibration sample asked it)
                    # while an earlier tier was asked now: the endpoint is that of the answer kept
                    kept = [e for e in rec.get("tiers") or [] if e["tier"] == rec["tier"] and e["role"] != "judge"]
                    if kept and kept[-1]["cached"]:
                        assert rec["endpoint"] == "cache", (r["_row_key"], stage, rec)
                    else:
                        assert rec["endpoint"].startswith("http://127.0.0.1:"), (r["_row_key"], stage, rec)
                assert r[out_col] is not None
    assert errors == manifest["errors"]["rows"] == sum(s["errors"] for s in manifest["stages"].values())


def test_structured_outputs_are_valid_and_typed(demo_run):
    manifest, out, _ = demo_run
    table = ds.dataset(out, format="parquet").to_table()
    schema = table.schema
    assert pa.types.is_dictionary(schema.field("label").type)
    assert schema.field("details").type == pa.struct([("product", pa.string()), ("urgent", pa.bool_()),
                                                      ("severity", pa.int64())])
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)
    labels = table.column("label").to_pylist()
    assert set(labels) - {None} <= {"billing", "bug", "feature", "other"}
    assert sum(x is not None for x in labels) >= 290  # choice is constrained: failures would be server errors
    details = table.column("details").to_pylist()
    for label, d, lin in zip(labels, details, table.column("_lineage").to_pylist()):
        ran = label in ("bug", "billing")
        assert lin["extract"]["skipped"] is (not ran)  # `when` skipped exactly the other rows
        if d is not None:
            assert ran and isinstance(d["product"], str) and len(d["product"]) <= 24
            assert isinstance(d["urgent"], bool) and 1 <= d["severity"] <= 5
    assert any(d is not None for d in details)
    emb = table.column("embedding").to_pylist()
    assert all(e is not None and len(e) == 384 for e in emb)
    norms = [sum(x * x for x in e) ** 0.5 for e in emb[:5]]
    assert all(abs(n - 1.0) < 1e-3 for n in norms)  # MiniLM's embeddings are normalised


def test_other_readers_read_the_output_as_it_is(demo_run, tmp_path):
    _, out, _ = demo_run
    n, keys = duckdb.sql(f"select count(*), count(distinct _row_key) from '{out}/*.parquet'").fetchall()[0]
    assert n == keys == 300
    label_counts = duckdb.sql(f"select label, count(*) from '{out}/*.parquet' group by label").fetchall()
    assert sum(c for _, c in label_counts) == 300
    import datasets

    d = datasets.load_dataset("parquet", data_files=f"{out}/*.parquet", split="train", cache_dir=str(tmp_path))
    assert d.num_rows == 300 and "_lineage" in d.column_names


def test_manifest_and_metadata(demo_run):
    manifest, out, _ = demo_run
    on_disk = json.loads((out / "_manifest.json").read_text())
    assert on_disk["run_id"] == manifest["run_id"]
    assert on_disk["config"]["text"] == (ROOT / "configs/demo.yaml").read_text()
    assert set(on_disk["models"]) == {"tiny", "small", "embedder"}
    for m in on_disk["models"].values():
        assert m["engine_version"].startswith("0.") and m["revision"]
    assert sum(f["rows"] for f in on_disk["files"]) == 300
    import hashlib

    for f in on_disk["files"]:
        data = (out / f["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
        meta = json.loads(pq.read_schema(out / f["path"]).metadata[b"modelyard"])
        assert meta["run_id"] == manifest["run_id"] and set(meta["stages"]) == {"embed", "classify", "extract", "reply"}
    assert len(on_disk["files"]) == 1  # 300 small rows: one part, not one per shard
    stats = on_disk["stages"]["classify"]
    assert stats["ran"] == 300 and stats["completion_tokens"] > 0 and stats["latency_ms_p95"] >= stats["latency_ms_p50"]
    assert on_disk["stages"]["extract"]["skipped"] + on_disk["stages"]["extract"]["ran"] == 300
    # the job's staging folder is gone after the commit; the cache and the lineage log stay
    job_dir = out.parent / "_modelyard" / "out"
    assert [p for p in job_dir.iterdir() if p.is_dir()] == []
    assert {"cache.sqlite", "openlineage.jsonl"} <= {p.name for p in job_dir.iterdir()}


def test_the_flow_run_is_tagged_and_its_tasks_are_not(demo_run):
    """Job, stage and model tags on the flow run, for filtering in the UI; none on task runs, where
    each new set of tags makes Prefect look up tag-based concurrency limits at every task start."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter

    manifest, _, _ = demo_run
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(manifest["run_id"])
        assert {f"job:{manifest['job']}", "stage:embed", "stage:classify", "stage:extract", "stage:reply",
                "model:builtin:tiny-llama", "model:builtin:minilm"} <= set(run.tags), run.tags
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id, *(f.id for f in subflows)]}),
                                      task_run_filter=TaskRunFilter())
    shard_tasks = [t for t in tasks if "shard-" in t.name]
    assert shard_tasks and all(t.tags == [] for t in shard_tasks), [(t.name, t.tags) for t in tasks]


def test_inspect_shows_stats_and_one_rows_provenance(demo_run):
    manifest, out, _ = demo_run
    r = run_cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    for s in ("embed", "classify", "extract", "reply", "part-00000.parquet", manifest["run_id"]):
        assert s in r.stdout
    r = run_cli("inspect", str(out), "--row", "T00002")
    assert r.returncode == 0, r.stderr
    assert "row T00002" in r.stdout and "prompt_sha256" in r.stdout and "stage classify" in r.stdout
    assert "The reporting invoice shows the wrong amount" in r.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_gives_error_rows_not_a_hang(servers, prefect_harness, tmp_path):
    """One replica down, one up: every row is served; only-down model: error rows, clear message."""
    from flows.pipeline import run_pipeline

    tiny = servers["tiny"]
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": f"ticket {i}"}) + "\n" for i in range(40)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: unreachable
input: {{uri: "{data}", key: id}}
shard_rows: 20
models:
  up: {{model: "{tiny.served_name}", endpoints: ["{dead}", "{tiny.url}"], retries: 3}}
  down: {{model: "{tiny.served_name}", endpoints: ["{dead}"], retries: 1}}
stages:
  - {{name: a, model: up, prompt: "{{{{ text }}}}", choice: [x, y], output: a}}
  - {{name: b, model: down, prompt: "{{{{ text }}}}", params: {{max_tokens: 4}}, output: b}}
output: {{uri: "{tmp_path / 'out'}"}}
""")
    t0 = time.perf_counter()
    manifest = run_pipeline(config=str(cfg))
    assert time.perf_counter() - t0 < 120
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.num_rows == 40
    assert set(table.column("a").to_pylist()) <= {"x", "y"} and None not in table.column("a").to_pylist()
    assert table.column("b").to_pylist() == [None] * 40
    errs = pq.read_table(tmp_path / "out" / "_errors" / "errors.parquet").to_pylist()
    assert len(errs) == 40 and {e["stage"] for e in errs} == {"b"}
    assert all(f"cannot connect to {dead}" in e["error"] and e["attempts"] == 2 for e in errs)
    assert manifest["stages"]["b"]["errors"] == 40 and manifest["stages"]["a"]["errors"] == 0


def test_demo_report_opens_offline_with_every_chart_drawn(demo_run, tmp_path):
    """_report.html of the demo: every chart drawn in headless Chromium, its numbers those of the
    manifest and the parts; the time series sampled during the run agree with the manifest."""
    from tests.browser import rendered, screenshot
    from tests.report_checks import check_report

    manifest, out, _ = demo_run
    page = out / "_report.html"
    assert page.stat().st_size < 2_000_000
    _, data = rendered(page)
    ids = {c["id"] for c in data["charts"]}
    assert {"throughput", "in-flight", "latency", "output-classify", "output-extract", "output-embed", "shares"} <= ids
    assert check_report(data, {"demo-tickets": out}) == ids
    tel = manifest["telemetry"]
    assert len(tel["t"]) > 3 and max(v or 0 for s in tel["in_flight"].values() for v in s["values"]) > 0
    assert {s["model"] for s in tel["in_flight"].values()} == {"tiny", "small", "embedder"}
    screenshot(page.resolve().as_uri(), tmp_path / "demo-report.png")


def test_the_demo_cascade_is_calibrated_and_costed(demo_run):
    """The demo's `classify` cascade: thresholds fitted on 50 sampled rows, every row's path in its
    lineage, and the GPU-hour prices split across the rows by tokens."""
    manifest, out, _ = demo_run
    st = manifest["stages"]["classify"]
    cal = st["calibration"]
    assert st["strategy"] == "cascade" and cal["rows"] == 50 and cal["agreement"] >= 0.5
    assert st["thresholds"][0] == cal["thresholds"][0]
    rows = ds.dataset(out, format="parquet").to_table(columns=["_lineage"]).to_pylist()
    th = st["thresholds"][0]
    for r in rows:
        lin = r["_lineage"]["classify"]
        first = lin["tiers"][0]
        kept = first["reason"] == "accepted"
        assert kept == (first["confidence"] is not None and first["confidence"] >= th)
        assert lin["tier"] == (0 if kept else 1) and len(lin["tiers"]) == (1 if kept else 2)
    events = [json.loads(x) for x in (out / "_lineage" / "openlineage.jsonl").read_text().splitlines()]
    facet = events[-1]["run"]["facets"]["modelyard_stages"]["stages"]["classify"]
    assert facet["strategy"] == "cascade" and [m["name"] for m in facet["models"]] == ["tiny", "small"]
    assert [m["model"] for m in facet["models"]] == ["builtin:tiny-llama", "builtin:small-llama"]
    cost = manifest["cost"]
    assert set(cost["gpu_seconds"]) == {"tiny", "small", "embedder"} and all(v > 0 for v in cost["gpu_seconds"].values())
    assert cost["total"] == pytest.approx(sum(cost["by_stage"].values()))
    assert cost["by_model"]["tiny"] == pytest.approx(cost["gpu_seconds"]["tiny"] / 3600 * 0.50)
    assert cost["by_model"]["small"] == pytest.approx(cost["gpu_seconds"]["small"] / 3600 * 1.20)


def test_the_votes_and_route_config_runs_as_shown(servers, prefect_harness, tmp_path, monkeypatch):
    """configs/together.yaml, as the README shows it, on the session's servers (same options)."""
    from flows.pipeline import run_pipeline

    monkeypatch.chdir(ROOT)
    manifest = run_pipeline(config="configs/together.yaml", output=str(tmp_path / "out"))
    table = ds.dataset(tmp_path / "out", format="parquet").to_table()
    assert table.num_rows == 300
    st = manifest["stages"]
    assert st["topic"]["strategy"] == "vote" and sum(st["topic"]["agreement"].values()) == 300 - st["topic"]["errors"]
    assert [t["asked"] for t in st["urgency"]["tiers"]] == [300, 300, 300]
    long = sum(len(b) > 60 for b in table.column("body").to_pylist())
    assert [r["rows"] for r in st["reply"]["routes"]] == [long, 300 - long]


def test_embedding_refusals_are_remembered_and_truncate_cuts_instead(servers, prefect_harness, tmp_path, caplog):
    """Texts over MiniLM's 256 tokens: error rows, remembered, so an unchanged re-run is answered by
    the cache alone (no request, no server); `truncate: true` embeds them cut, and says so."""
    import logging

    from flows.pipeline import run_pipeline
    from tests.conftest import requests_served

    minilm = servers["embedder"]
    rows = [{"id": i, "text": ("word " * (400 if i % 10 == 3 else 5)) + str(i)} for i in range(40)]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(truncate: bool) -> Path:
        p = tmp_path / f"c-{truncate}.yaml"
        p.write_text(f"""
name: refusals
input: {{uri: "{data}", key: id}}
shard_rows: 20
models:
  embedder: {{model: builtin:minilm, task: embed, serve: {{max_model_len: 256}}}}
stages:
  - {{name: embed, model: embedder, input: "{{{{ text }}}}", output: vec{", truncate: true" if truncate else ""}}}
output: {{uri: "{tmp_path / ('out-cut' if truncate else 'out')}"}}
""")
        return p

    long = [r["id"] for r in rows if r["id"] % 10 == 3]
    m0 = requests_served(minilm)
    first = run_pipeline(config=str(cfg(False)))
    sent = requests_served(minilm) - m0
    assert first["stages"]["embed"]["errors"] == len(long)
    errs = pq.read_table(tmp_path / "out" / "_errors" / "errors.parquet").to_pylist()
    assert sorted(int(e["_row_key"]) for e in errs) == long and all("too long" in e["error"] for e in errs)
    assert sent < len(rows)  # batched: fewer requests than rows, the refused ones split out
    caplog.set_level(logging.INFO)
    again = run_pipeline(config=str(cfg(False)))
    assert requests_served(minilm) - m0 == sent  # nothing asked again, the refusals included
    assert again["stages"]["embed"]["cached"] == len(rows) and again["stages"]["embed"]["errors"] == len(long)
    assert "2 of 2 shards answered by the request cache" in caplog.text  # so no server was started
    cut = run_pipeline(config=str(cfg(True)))
    assert cut["stages"]["embed"]["errors"] == 0
    table = pq.read_table(tmp_path / "out-cut" / "part-00000.parquet").to_pylist()
    for r in table:
        lin = r["_lineage"]["embed"]
        assert len(r["vec"]) == 384 and lin["finish_reason"] == ("length" if r["id"] in long else "stop")
