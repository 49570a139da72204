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

# One model asked on a row by a cascade, vote or route stage.
TIER_ENTRY = pa.struct([
    ("model", pa.string()),  # the config's name of the model
    ("role", pa.string()),  # answer (a cascade tier or a route), judge, voter
    ("tier", pa.int32()),  # the cascade tier, vote position or route rule it belongs to
    ("answer", pa.string()),  # its answer as text (JSON for structured values), or its raw text if invalid
    ("confidence", pa.float64()),
    ("reason", pa.string()),  # accepted, low_confidence, invalid, failed, truncated, escalate_when, judge, ...
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("latency_ms", pa.float64()),
    ("cached", pa.bool_()),
])
# Stages that ask several models add how sure the kept answer is, which tier or rule gave it, and
# every model's attempt.
MULTI_LINEAGE = pa.struct([*STAGE_LINEAGE, ("confidence", pa.float64()), ("tier", pa.int32()),
                           ("tiers", pa.list_(TIER_ENTRY))])

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


def lineage_type(stages: dict[str, pa.StructType] | list[str]) -> pa.StructType:
    """The `_lineage` column: one struct per stage (STAGE_LINEAGE, or MULTI_LINEAGE for stages
    that ask several models); a list of names: stages of one model each."""
    items = stages.items() if isinstance(stages, dict) else ((n, STAGE_LINEAGE) for n in stages)
    return pa.struct(list(items))


def output_schema(input_schema: pa.Schema, stages: list[tuple[str, pa.DataType]],
                  stage_lineage: dict[str, pa.StructType] | list[str]) -> pa.Schema:
    """Input columns, then one column per stage output, then the lineage columns."""
    fields = [f for f in input_schema if f.name not in ("_row_key", "_source")]
    fields += [pa.field(name, typ) for name, typ in stages]
    fields += [
        pa.field("_row_key", pa.string(), nullable=False),
        pa.field("_source", SOURCE_TYPE),
        pa.field("_run_id", pa.string()),
        pa.field("_lineage", lineage_type(stage_lineage)),
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
