"""Which distributions a report draws for each stage, and the two passes that count them.

Per stage: its output (choice counts; JSON fields: numbers as histograms, booleans and short
string sets as counts, other strings by length, lists by length; free text and regex by length;
embeddings by norm), its latency, its confidence (cascade, vote and route stages) and its errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from modelyard.charts.scan import Counts, Errors, Hist, Source, batches, get, norms, numbers, part_schema


@dataclass
class Probe:
    stage: str
    name: str  # what the chart calls it: the output column, or column.field
    path: str  # the column's dotted path in the parts
    what: str  # counts | number | length | norm | items | string (counts, else lengths)
    counts: Counts | None = None
    hist: Hist | None = None
    # a norm's values from the first pass, per group, for the second: norms are a few bytes a row,
    # the vectors they come from a few KB, so the second pass need not read those again
    kept: dict[str, list[np.ndarray]] | None = None

    def values(self, arr: pa.Array) -> np.ndarray:
        if self.what == "norm":
            return norms(arr)
        if self.what in ("length", "string"):
            if pa.types.is_dictionary(arr.type):
                arr = arr.cast(arr.type.value_type)
            return numbers(pc.utf8_length(arr))
        if self.what == "items":
            return numbers(pc.list_value_length(arr))
        return numbers(arr)

    def first(self, group: str, arr: pa.Array) -> None:
        if self.counts is not None:
            self.counts.add(group, arr)
        if self.hist is not None and self.hist.fixed is None:
            values = self.values(arr)
            self.hist.observe(values)
            if self.kept is not None:
                self.kept.setdefault(group, []).append(values)

    @property
    def binned(self) -> bool:
        return self.hist is not None and (self.what != "string" or self.counts.overflow)

    def second(self, group: str, arr: pa.Array) -> None:
        self.hist.add(group, self.values(arr))

    def result(self, groups: list[str]) -> dict[str, Any]:
        if self.binned:
            what = "length" if self.what == "string" else self.what
            return {"stage": self.stage, "name": self.name, "what": what, **self.hist.result(groups)}
        return {"stage": self.stage, "name": self.name, "what": "counts", **self.counts.result(groups)}


def probes_for(stage: str, name: str, path: str, t: pa.DataType, kind: str) -> list[Probe]:
    if pa.types.is_struct(t):
        return [p for f in t for p in probes_for(stage, f"{name}.{f.name}", f"{path}.{f.name}", f.type, "field")]
    if pa.types.is_dictionary(t) or pa.types.is_boolean(t) or (kind == "choice" and pa.types.is_string(t)):
        return [Probe(stage, name, path, "counts", counts=Counts())]
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if kind == "field":  # a JSON string: a few values are counted, many are shown by length
            return [Probe(stage, name, path, "string", counts=Counts(), hist=Hist(integer=True))]
        return [Probe(stage, name, path, "length", hist=Hist(integer=True))]
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        if pa.types.is_floating(t.value_type) and kind in ("embed", "field"):
            return [Probe(stage, f"{name} (norm)", path, "norm", hist=Hist(), kept={})]
        return [Probe(stage, f"{name} (items)", path, "items", hist=Hist(integer=True))]
    if pa.types.is_integer(t):
        return [Probe(stage, name, path, "number", hist=Hist(integer=True))]
    if pa.types.is_floating(t):
        return [Probe(stage, name, path, "number", hist=Hist())]
    return []


def plan(manifest: dict, schema: pa.Schema) -> tuple[list[Probe], list[Probe], list[Probe]]:
    """(output probes, latency probes, confidence probes) for the stages of a manifest."""
    outputs, latency, confidence = [], [], []
    lineage = schema.field("_lineage").type if "_lineage" in schema.names else pa.struct([])
    for name, s in manifest["stages"].items():
        col = s["output"]
        if col in schema.names:
            outputs += probes_for(name, col, col, schema.field(col).type, s.get("kind", "text"))
        if lineage.get_field_index(name) < 0:
            continue
        rec = lineage.field(name).type
        if rec.get_field_index("latency_ms") >= 0:
            latency.append(Probe(name, "latency_ms", f"_lineage.{name}.latency_ms", "number", hist=Hist()))
        if rec.get_field_index("confidence") >= 0:
            confidence.append(Probe(name, "confidence", f"_lineage.{name}.confidence", "number",
                                    hist=Hist(fixed=(0.0, 1.0))))
    return outputs, latency, confidence


def scan(sources: list[Source]) -> dict[str, Any]:
    """Every distribution of the outputs in ``sources`` (one group each), in two passes over the parts."""
    groups = [s.label for s in sources]
    schema = next((sc for sc in map(part_schema, sources) if sc is not None), None)
    if schema is None:
        return {"outputs": [], "latency": {}, "confidence": {}, "errors": Errors().result(groups)}
    manifest = sources[0].manifest
    outputs, latency, confidence = plan(manifest, schema)
    probes = outputs + latency + confidence
    errors = Errors()
    stages = [n for n in manifest["stages"]  # stages with errors somewhere (a manifest says how many)
              if "_lineage" in schema.names and schema.field("_lineage").type.get_field_index(n) >= 0
              and any(s.manifest["stages"].get(n, {}).get("errors", 1) for s in sources)]
    first = sorted({p.path for p in probes} | {f"_lineage.{n}.error" for n in stages} | ({"_row_key"} if stages else set()))
    for src in sources:
        for batch in batches(src, first):
            for p in probes:
                p.first(src.label, get(batch, p.path))
            for n in stages:
                errors.add(src.label, n, get(batch, f"_lineage.{n}.error"), batch.column("_row_key"))
    binned = [p for p in probes if p.binned]
    for p in binned:
        if p.kept is not None:
            for src in sources:
                for values in p.kept.pop(src.label, []):
                    p.hist.add(src.label, values)
    read = [p for p in binned if p.kept is None]
    if read:
        for src in sources:
            for batch in batches(src, sorted({p.path for p in read})):
                for p in read:
                    p.second(src.label, get(batch, p.path))
    return {"outputs": [p.result(groups) for p in outputs],
            "latency": {p.stage: p.result(groups) for p in latency},
            "confidence": {p.stage: p.result(groups) for p in confidence},
            "errors": errors.result(groups)}
