"""Distributions of a committed output, read from its parts in bounded memory.

The parts are read batch by batch, only the columns a chart needs (nested lineage fields
included). Categorical values are counted (bounded: past ``MAX_VALUES`` distinct values a field
is shown by its lengths instead); numbers go into fixed bins whose range a first pass finds, so
the counts are exact and memory does not grow with rows. Several outputs (the partitions of a
backfill) can be scanned together: each is a group, and they share bins.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MAX_VALUES = 30  # distinct values counted per categorical field
MAX_REASONS = 1000  # distinct error reasons counted; the rest is "(other reasons)"
BINS = 25  # odd: one value sits in the middle of a bin
BATCH = 16384


def get(batch: pa.RecordBatch, path: str) -> pa.Array:
    """A (nested) column of a batch by dotted path; null where a parent is null."""
    head, *rest = path.split(".")
    arr = batch.column(head)
    for name in rest:
        arr = pc.struct_field(arr, name)
    return arr


@dataclass
class Hist:
    """Counts in fixed bins over the range seen in the first pass; one bin per integer when few."""

    integer: bool = False
    lo: float = np.inf
    hi: float = -np.inf
    fixed: tuple[float, float] | None = None  # a known range (confidence: 0..1): no first pass
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    _edges: np.ndarray | None = None

    def observe(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if values.size:
            self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))

    def edges(self) -> np.ndarray:
        if self._edges is None:
            lo, hi = self.fixed or (self.lo, self.hi)
            if not np.isfinite(lo):
                lo, hi = 0.0, 1.0
            if self.integer and hi - lo <= 40:
                lo, hi = np.floor(lo), np.floor(hi)
                mid = (lo + hi) // 2  # a few values: at least 5 bins, the values in the middle
                self._edges = np.arange(min(lo, mid - 2) - 0.5, max(hi, mid + 2) + 1.5, 1.0)
            else:
                if hi - lo <= 1e-4 * max(abs(lo), abs(hi)) or hi == lo:  # (nearly) one value: e.g.
                    mid = (lo + hi) / 2  # normalised embeddings, all rows cached (0 ms)
                    half = 0.05 * abs(mid) if mid else 0.5
                    lo, hi = mid - half, mid + half
                self._edges = np.linspace(lo, hi, BINS + 1)
        return self._edges

    def add(self, group: str, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        c, _ = np.histogram(values, bins=self.edges())
        self.counts[group] = self.counts.get(group, 0) + c
        self.total[group] = self.total.get(group, 0) + int(values.size)

    def result(self, groups: list[str]) -> dict[str, Any]:
        e = self.edges()
        return {"type": "hist", "integer": bool(self.integer and len(e) <= 42), "edges": [round(float(x), 6) for x in e],
                "counts": {g: [int(x) for x in self.counts.get(g, np.zeros(len(e) - 1, int))] for g in groups},
                "total": {g: self.total.get(g, 0) for g in groups}}


@dataclass
class Counts:
    """Value counts of a categorical column, per group, up to ``MAX_VALUES`` distinct values."""

    values: dict[str, dict[str, int]] = field(default_factory=dict)
    nulls: dict[str, int] = field(default_factory=dict)
    overflow: bool = False

    def add(self, group: str, arr: pa.Array) -> None:
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(arr.type.value_type)
        self.nulls[group] = self.nulls.get(group, 0) + arr.null_count
        mine = self.values.setdefault(group, {})
        for item in pc.value_counts(arr.drop_null()).to_pylist():
            key = str(item["values"]).lower() if isinstance(item["values"], bool) else str(item["values"])
            mine[key] = mine.get(key, 0) + item["counts"]
        if len(set().union(*self.values.values())) > MAX_VALUES:
            self.overflow = True

    def result(self, groups: list[str]) -> dict[str, Any]:
        order = sorted(set().union(*self.values.values()) if self.values else set(),
                       key=lambda v: (-sum(self.values.get(g, {}).get(v, 0) for g in groups), v))
        return {"type": "counts", "order": order, "values": {g: self.values.get(g, {}) for g in groups},
                "nulls": {g: self.nulls.get(g, 0) for g in groups}}


@dataclass
class Errors:
    """Error messages by stage and reason (numbers blanked), each with its first row key."""

    reasons: dict[tuple[str, str], list] = field(default_factory=dict)  # -> [count, example key, group]
    by_group: dict[str, int] = field(default_factory=dict)

    def add(self, group: str, stage: str, errors: pa.Array, keys: pa.Array) -> None:
        mask = pc.is_valid(errors)
        n = pc.sum(mask).as_py() or 0
        if not n:
            return
        self.by_group[group] = self.by_group.get(group, 0) + n
        for msg, key in zip(errors.filter(mask).to_pylist(), keys.filter(mask).to_pylist()):
            r = (stage, reason(msg))
            if r not in self.reasons and len(self.reasons) >= MAX_REASONS:
                r = (stage, "(other reasons)")
            hit = self.reasons.setdefault(r, [0, key, group])
            hit[0] += 1

    def result(self, groups: list[str], top: int = 10) -> dict[str, Any]:
        ranked = sorted(self.reasons.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return {"type": "errors", "total": sum(self.by_group.values()),
                "by_group": {g: self.by_group.get(g, 0) for g in groups}, "reasons": len(ranked),
                "top": [{"stage": s, "reason": r, "count": c, "example": k, "group": g}
                        for (s, r), (c, k, g) in ranked[:top]]}


def reason(message: str) -> str:
    """An error message with its numbers blanked, first line, 160 characters at most."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else "(empty message)"
    return re.sub(r"\d+(\.\d+)?", "N", first)[:160]


@dataclass
class Source:
    """One committed output to read: a label (the group), its manifest, its filesystem and folder."""

    label: str
    manifest: dict
    fs: Any
    folder: str

    def parts(self) -> list[str]:
        return [posixpath.join(self.folder, f["path"]) for f in self.manifest["files"]]


def batches(src: Source, columns: list[str]):
    for path in src.parts():
        with src.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = set(pf.schema_arrow.names)
            cols = [c for c in columns if c.split(".")[0] in names]
            yield from pf.iter_batches(batch_size=BATCH, columns=cols)


def part_schema(src: Source) -> pa.Schema | None:
    for path in src.parts()[:1]:
        with src.fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).schema_arrow
    return None


def numbers(arr: pa.Array) -> np.ndarray:
    return arr.drop_null().cast(pa.float64()).to_numpy(zero_copy_only=False)


def norms(arr: pa.Array) -> np.ndarray:
    """L2 norms of the non-null vectors of a (fixed-size) list column."""
    arr = arr.drop_null()
    if not len(arr):
        return np.zeros(0)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False)  # float32 stays float32: no copy
    sizes = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if sizes.size and (sizes == sizes[0]).all() and sizes[0]:
        # the sums of squares in float64, as a float64 copy would give them, without making the copy
        x = flat.reshape(len(sizes), int(sizes[0]))
        return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    flat = flat.astype(np.float64)
    return np.sqrt(np.add.reduceat(flat * flat, np.r_[0, np.cumsum(sizes)[:-1]])) if flat.size else np.zeros(len(sizes))
