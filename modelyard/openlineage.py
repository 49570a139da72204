"""OpenLineage run events (START, COMPLETE, FAIL) of a modelyard run, and the transports that send them.

Built from the manifest (``pipeline.lineage_summary``) with the openlineage-python client's classes and
its ``Serde`` (spec 2-0-2): input and output datasets named after their URIs, column lineage from each
stage output back to the input columns its templates read, and a custom ``modelyard_stages`` run facet.
Lineage never fails a run: a transport that cannot deliver only logs a warning.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import uuid
from typing import Any
from urllib.parse import urlparse

import attr
import fsspec
import pyarrow as pa
import yaml
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (RunFacet, column_lineage_dataset, error_message_run, job_type_job,
                                         nominal_time_run, output_statistics_output_dataset,
                                         processing_engine_run, schema_dataset)
from openlineage.client.serde import Serde

from modelyard import __version__, sync_http
from modelyard.config import OpenLineageConfig
from modelyard.staging import Staging, write_bytes_atomic
from modelyard.templates import variables_of

log = logging.getLogger("modelyard")

PRODUCER = "https://github.com/modelyard/modelyard/tree/{version}"
STAGES_FACET_SCHEMA = "https://github.com/modelyard/modelyard/blob/main/docs/openlineage/ModelyardStagesRunFacet.json"
HTTP_ENDPOINT = "api/v1/lineage"  # appended to a url without a path, as the OpenLineage client does
ADDED_COLUMNS = ("_row_key", "_source")  # added to the input by the planner: not the user's columns
STAT_KEYS = ("rows", "ran", "skipped", "errors", "prompt_tokens", "completion_tokens")


@attr.define
class ModelyardStagesRunFacet(RunFacet):
    """``modelyard_stages``: per stage its model, revision, engine and hashes (and counts when done)."""

    stages: dict[str, dict[str, Any]] = attr.field(factory=dict)
    config_sha256: str | None = attr.field(default=None)
    job_key: str | None = attr.field(default=None)

    @staticmethod
    def _get_schema() -> str:
        return STAGES_FACET_SCHEMA


# --- events -----------------------------------------------------------------------------------

def start_event(manifest_head: dict, input_schema: pa.Schema, output_uri: str, producer_version: str,
                nominal_time: str | None = None) -> dict:
    p = PRODUCER.format(version=producer_version)
    facets: dict[str, RunFacet] = {}
    if nominal_time:
        facets["nominalTime"] = nominal_time_run.NominalTimeRunFacet(_iso_time(nominal_time), producer=p)
    return _event(RunState.START, manifest_head, producer_version, facets,
                  [_input(manifest_head, input_schema, p)], [OutputDataset(*dataset_name(output_uri))])


def complete_event(manifest: dict, input_schema: pa.Schema, output_schema: pa.Schema) -> dict:
    version = manifest.get("modelyard_version") or __version__
    p = PRODUCER.format(version=version)
    inp = _input(manifest, input_schema, p)
    files = manifest.get("files") or []
    stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
        rowCount=manifest.get("rows"), size=sum(int(f.get("bytes") or 0) for f in files), fileCount=len(files),
        producer=p)
    facets = {"schema": _schema_facet(output_schema, p),
              "columnLineage": column_lineage(manifest, inp.namespace, inp.name, input_schema, output_schema, p)}
    out = OutputDataset(*dataset_name(manifest["output"]["uri"]), facets=facets,
                        outputFacets={"outputStatistics": stats})
    return _event(RunState.COMPLETE, manifest, version, {}, [inp], [out])


def fail_event(manifest_head: dict, input_schema: pa.Schema | None, error: str) -> dict:
    version = manifest_head.get("modelyard_version") or __version__
    p = PRODUCER.format(version=version)
    facets = {"errorMessage": error_message_run.ErrorMessageRunFacet(str(error), "python", producer=p)}
    inputs = [_input(manifest_head, input_schema, p)] if (manifest_head.get("input") or {}).get("uri") else []
    out = (manifest_head.get("output") or {}).get("uri")
    outputs = [OutputDataset(*dataset_name(out))] if out else []
    return _event(RunState.FAIL, manifest_head, version, facets, inputs, outputs)


def _event(state: RunState, head: dict, version: str, run_facets: dict, inputs: list, outputs: list) -> dict:
    p = PRODUCER.format(version=version)
    facets = {"processing_engine": processing_engine_run.ProcessingEngineRunFacet(version, "modelyard", producer=p),
              "modelyard_stages": _stages_facet(head, p), **run_facets}
    job_facets = {"jobType": job_type_job.JobTypeJobFacet("BATCH", "MODELYARD", "PIPELINE", producer=p)}
    run = Run(run_id(head["run_id"]), facets)
    job = Job(job_namespace(head), head["job"], job_facets)
    return Serde.to_dict(RunEvent(eventType=state, eventTime=_now(), producer=p, run=run, job=job,
                                  inputs=inputs, outputs=outputs))


def job_namespace(head: dict) -> str:
    """lineage.openlineage.namespace of the run's config (its text is in the manifest), else "modelyard"."""
    if head.get("namespace"):
        return str(head["namespace"])
    try:
        raw = yaml.safe_load((head.get("config") or {}).get("text") or "") or {}
        return str(raw["lineage"]["openlineage"]["namespace"])
    except (yaml.YAMLError, KeyError, TypeError):
        return OpenLineageConfig().namespace


def run_id(value: str) -> str:
    """OpenLineage wants a UUID: the Prefect flow-run id is one; anything else maps to a stable UUID5."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"modelyard:run:{value}"))


def dataset_name(uri: str) -> tuple[str, str]:
    """(namespace, name) per OpenLineage naming: local path -> ("file", absolute path),
    s3://bucket/key -> ("s3://bucket", "key")."""
    u = urlparse(uri)
    if u.scheme in ("", "file", "local") or len(u.scheme) == 1:  # a one-letter scheme is a Windows drive
        path = u.path if u.scheme in ("file", "local") else uri
        return "file", os.path.abspath(os.path.expanduser(path))
    return f"{u.scheme}://{u.netloc}", u.path.strip("/") or "/"


def _input(head: dict, schema: pa.Schema | None, p: str) -> InputDataset:
    facets = {"schema": _schema_facet(schema, p, skip=ADDED_COLUMNS)} if schema is not None else {}
    return InputDataset(*dataset_name(head["input"]["uri"]), facets=facets)


def _schema_facet(schema: pa.Schema, p: str, skip: tuple[str, ...] = ()) -> schema_dataset.SchemaDatasetFacet:
    return schema_dataset.SchemaDatasetFacet(fields=_fields([f for f in schema if f.name not in skip]), producer=p)


def _fields(fields: list[pa.Field]) -> list[schema_dataset.SchemaDatasetFacetFields]:
    """Name and Arrow type of each column; a struct is typed "struct" and lists its fields."""
    return [schema_dataset.SchemaDatasetFacetFields(
        name=f.name, type="struct" if pa.types.is_struct(f.type) else str(f.type), ordinal_position=i,
        fields=_fields(list(f.type)) if pa.types.is_struct(f.type) else None)
        for i, f in enumerate(fields, 1)]


def _stages_facet(head: dict, p: str) -> ModelyardStagesRunFacet:
    stages = {}
    for name, st in (head.get("stages") or {}).items():
        m = (head.get("models") or {}).get(st["model"], {})
        stages[name] = {"model": m.get("model", st["model"]), "model_revision": m.get("revision"),
                        "engine_version": m.get("engine_version"), "prompt_sha256": st.get("prompt_sha256"),
                        "params_sha256": st.get("params_sha256"), "output": st.get("output"),
                        "kind": st.get("kind"), **{k: st[k] for k in STAT_KEYS if k in st}}
        if st.get("strategy", "single") != "single":  # a cascade, vote or route names every model it may ask
            known = head.get("models") or {}
            stages[name]["strategy"] = st["strategy"]
            stages[name]["models"] = [{"name": n, "model": known.get(n, {}).get("model", n),
                                       "model_revision": known.get(n, {}).get("revision")} for n in st.get("models", [])]
            if st["strategy"] == "cascade":
                stages[name]["thresholds"] = st.get("thresholds")
    return ModelyardStagesRunFacet(stages, (head.get("config") or {}).get("sha256"), head.get("job_key"), producer=p)


# --- column lineage ---------------------------------------------------------------------------

def column_lineage(manifest: dict, namespace: str, name: str, input_schema: pa.Schema, output_schema: pa.Schema,
                   p: str) -> column_lineage_dataset.ColumnLineageDatasetFacet:
    """Input columns copied as they are (IDENTITY); each stage output <- the input columns its prompt
    reads (DIRECT) or its `when` reads (INDIRECT, CONDITIONAL), inheriting those of earlier outputs."""
    inputs = [f.name for f in input_schema if f.name not in ADDED_COLUMNS]
    out_cols = set(output_schema.names)
    # output column -> input column -> {(type, subtype): description}
    lineage: dict[str, dict[str, dict[tuple[str, str], str]]] = {
        c: {c: {("DIRECT", "IDENTITY"): "copied from the input"}} for c in inputs}
    made_by: dict[str, str] = {}
    for stage, st in (manifest.get("stages") or {}).items():
        model = (manifest.get("models") or {}).get(st["model"], {}).get("model", st["model"])
        in_prompt = set().union(*(variables_of(st[k]) for k in ("prompt", "system") if st.get(k)))
        in_when = variables_of(st["when"], expression=True) if st.get("when") else set()
        src: dict[str, dict[tuple[str, str], str]] = {}
        for col in st.get("reads") or []:
            how = []  # (type, subtype, description) of this read
            if col in in_prompt or col not in in_when:
                how.append(("DIRECT", "TRANSFORMATION", f"stage {stage}: {model} reads {col} in its prompt"))
            if col in in_when:
                how.append(("INDIRECT", "CONDITIONAL", f"stage {stage} runs only when {st['when']}"))
            for t, sub, desc in how:
                if col in made_by:  # an earlier output: inherit its input columns; a DIRECT read keeps their kind
                    for field, kinds in lineage[col].items():
                        for kind in kinds:
                            src.setdefault(field, {}).setdefault(
                                (t, sub) if t == "INDIRECT" else kind, f"{desc} (the output of stage {made_by[col]})")
                elif col in inputs:
                    src.setdefault(col, {}).setdefault((t, sub), desc)
        lineage[st["output"]] = src
        made_by[st["output"]] = stage
    CL = column_lineage_dataset
    fields = {
        col: CL.Fields(inputFields=[
            CL.InputField(namespace, name, field, [CL.Transformation(t, sub, d) for (t, sub), d in kinds.items()])
            for field, kinds in src.items()])
        for col, src in lineage.items() if col in out_cols and src}
    return CL.ColumnLineageDatasetFacet(fields=fields, producer=p)


# --- transports -------------------------------------------------------------------------------

def emit(events: list[dict], cfg: OpenLineageConfig,
         file_path_fs_and_path: tuple[fsspec.AbstractFileSystem, str] | None = None) -> None:
    """Send events by the configured transport; file: append JSON lines to the path given."""
    if not events or cfg.transport == "none":
        return
    if cfg.transport == "file":
        if file_path_fs_and_path is None:
            return  # a committed run carries its events in _lineage/ (write_events)
        try:
            append_lines(*file_path_fs_and_path, events)
        except Exception as e:  # lineage must not fail a run
            log.warning("lineage: could not write OpenLineage events to %s: %s", file_path_fs_and_path[1], e)
    else:
        post(events, str(cfg.url))


def post(events: list[dict], url: str) -> None:
    """POST each event; a url without a path gets /api/v1/lineage. Logs, never raises."""
    u = urlparse(url)
    target = f"{url.rstrip('/')}/{HTTP_ENDPOINT}" if u.path in ("", "/") else url
    key = os.environ.get("OPENLINEAGE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with sync_http.client(timeout=10, headers=headers) as client:
            for ev in events:
                r = client.post(target, json=ev)
                if r.status_code >= 400:
                    log.warning("lineage: %s answered %s to a %s event: %s", target, r.status_code,
                                ev.get("eventType"), r.text[:200])
    except Exception as e:  # lineage must not fail a run
        log.warning("lineage: could not send %d OpenLineage event(s) to %s: %s", len(events), target, e)


def write_events(staging: Staging, events: list[dict]) -> None:
    """Events into the commit being assembled: they land in the output's _lineage/openlineage.jsonl."""
    append_lines(staging.fs, staging.path("commit", "_lineage", "openlineage.jsonl"), events)


def append_lines(fs: fsspec.AbstractFileSystem, path: str, events: list[dict]) -> None:
    data = "".join(json.dumps(e, default=str) + "\n" for e in events).encode()
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    try:
        with fs.open(path, "ab") as fh:
            fh.write(data)
    except (NotImplementedError, ValueError):  # stores that cannot append: rewrite the object
        old = fs.cat_file(path) if fs.exists(path) else b""
        write_bytes_atomic(fs, path, old + data)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _iso_time(value: str) -> str:
    """A scheduled time as ISO date-time; a bare date (a backfill partition) means its midnight UTC."""
    t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).isoformat().replace("+00:00", "Z")
