"""The lineage columns every output row carries, and the explicit Arrow schema of the output."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from modelyard.plan import SOURCE_TYPE

STAGE_LINEAGE = pa.struct([
    ("model", pa.string()),
    ("model_revision", pa.string()),
    ("engine_version", pa.string()),
    ("prompt_sha256", pa.string()),
    ("params_sha256", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("latency_ms", pa.float64()),
    ("attempts", pa.int32()),
    ("cached", pa.bool_()),
    ("skipped", pa.bool_()),
    ("error", pa.string()),
    ("endpoint", pa.string()),
])
LINEAGE_FIELDS = [f.name for f in STAGE_LINEAGE]

ERRORS_SCHEMA = pa.schema([
    ("_row_key", pa.string()),
    ("stage", pa.string()),
    ("error", pa.string()),
    ("raw", pa.string()),
    ("finish_reason", pa.string()),
    ("attempts", pa.int32()),
    ("_source", SOURCE_TYPE),
    ("_run_id", pa.string()),
])


def lineage_type(stage_names: list[str]) -> pa.StructType:
    return pa.struct([(n, STAGE_LINEAGE) for n in stage_names])


def output_schema(input_schema: pa.Schema, stages: list[tuple[str, pa.DataType]], stage_names: list[str]) -> pa.Schema:
    """Input columns, then one column per stage output, then the lineage columns."""
    fields = [f for f in input_schema if f.name not in ("_row_key", "_source")]
    fields += [pa.field(name, typ) for name, typ in stages]
    fields += [
        pa.field("_row_key", pa.string(), nullable=False),
        pa.field("_source", SOURCE_TYPE),
        pa.field("_run_id", pa.string()),
        pa.field("_lineage", lineage_type(stage_names)),
    ]
    return pa.schema(fields)


def new_record(stage: Any, model: Any) -> dict[str, Any]:
    """The lineage of one stage on one row before its request is made."""
    return {
        "model": model.model_id,
        "model_revision": model.revision,
        "engine_version": model.engine_version,
        "prompt_sha256": stage.prompt_sha256,
        "params_sha256": stage.params_sha256,
        "finish_reason": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "latency_ms": None,
        "attempts": 0,
        "cached": False,
        "skipped": False,
        "error": None,
        "endpoint": None,
    }
