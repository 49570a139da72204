"""Split the input into shards of ``shard_rows`` rows, streamed, with stable ids.

The input is read once, in file order, and written as small Parquet files
``_staging/<job>/input/shard-NNNNN.parquet`` carrying the input columns plus ``_row_key`` and
``_source``. Shard tasks then read only their own file, wherever they run. ``plan.json`` is
written last: a re-run of the same job finds it and skips planning.
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from modelyard import parquet
from modelyard.config import InputConfig
from modelyard.errors import InputError
from modelyard.readers import RESERVED, SourceFile, fingerprint, iter_batches, read_schema, resolve
from modelyard.staging import Staging, tmp_name

SOURCE_TYPE = pa.struct([("uri", pa.string()), ("shard", pa.int32()), ("row", pa.int64())])


@dataclass
class Plan:
    shards: list[int]  # rows per shard, by shard id
    rows: int
    fingerprint: str
    files: list[dict]

    @classmethod
    def load(cls, staging: Staging) -> Plan | None:
        p = staging.path("plan.json")
        return cls(**staging.read_json(p)) if staging.fs.exists(p) else None


def input_files(cfg: InputConfig) -> tuple[fsspec.AbstractFileSystem, list[SourceFile], str]:
    fs, files = resolve(cfg.uri, cfg.format)
    return fs, files, fingerprint(files)


def input_columns(cfg: InputConfig) -> pa.Schema:
    """The input's columns, from its first file (validate uses this)."""
    fs, files = resolve(cfg.uri, cfg.format)
    return read_schema(fs, files[0])


class _ShardWriter:
    """Accumulates batches and writes one Parquet file per full shard."""

    def __init__(self, staging: Staging, shard_rows: int):
        self.staging, self.shard_rows = staging, shard_rows
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.sizes: list[int] = []

    def add(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            take = min(batch.num_rows, self.shard_rows - self.pending_rows)
            self.pending.append(batch.slice(0, take))
            self.pending_rows += take
            batch = batch.slice(take)
            if self.pending_rows == self.shard_rows:
                self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        i = len(self.sizes)
        table = pa.Table.from_batches(self.pending)
        shard = pa.array([i] * table.num_rows, pa.int32())
        src = table.column("_source").combine_chunks()
        src = pa.StructArray.from_arrays([src.field("uri"), shard, src.field("row")], fields=list(SOURCE_TYPE))
        table = table.set_column(table.schema.get_field_index("_source"), "_source", src)
        path = self.staging.input_shard(i)
        fs = self.staging.fs
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = tmp_name(path)
        with fs.open(tmp, "wb") as fh:
            parquet.write_table(table, fh, parquet.STAGING_COMPRESSION)
        fs.mv(tmp, path)
        self.sizes.append(table.num_rows)
        self.pending, self.pending_rows = [], 0


def build_plan(cfg: InputConfig, shard_rows: int, staging: Staging, limit: int | None = None,
               files: tuple[fsspec.AbstractFileSystem, list[SourceFile], str] | None = None) -> Plan:
    """Stream the input into shard files; check keys; write plan.json last."""
    fs, srcs, fp = files or input_files(cfg)
    schema: pa.Schema | None = None
    writer = _ShardWriter(staging, shard_rows)
    seen: set[int] = set()
    suspects: set[str] = set()
    total = 0
    for f in srcs:
        row = 0
        for batch in iter_batches(fs, f):
            if limit is not None and total + batch.num_rows > limit:
                batch = batch.slice(0, limit - total)
            if schema is None:
                schema = _check_columns(batch.schema, cfg, f)
            elif batch.schema != schema:
                batch = _conform(batch, schema, f)
            keys = _keys(batch, cfg, f, row)
            for k in keys.to_pylist():
                h = hash(k)
                if h in seen:
                    suspects.add(k)
                seen.add(h)
            n = batch.num_rows
            src = pa.StructArray.from_arrays(
                [pa.array([f.uri] * n, pa.string()), pa.nulls(n, pa.int32()), pa.array(range(row, row + n), pa.int64())],
                fields=list(SOURCE_TYPE))
            batch = pa.RecordBatch.from_arrays([*batch.columns, keys, src], schema=schema.append(
                pa.field("_row_key", pa.string(), nullable=False)).append(pa.field("_source", SOURCE_TYPE)))
            writer.add(batch)
            row += n
            total += n
            if limit is not None and total >= limit:
                break
        if limit is not None and total >= limit:
            break
    writer.flush()
    if total == 0:
        raise InputError(f"input.uri {cfg.uri!r}: the input has no rows")
    if suspects:
        _report_duplicates(staging, len(writer.sizes), suspects, cfg)
    plan = Plan(shards=writer.sizes, rows=total, fingerprint=fp,
                files=[{"uri": f.uri, "format": f.format, "stamp": f.stamp} for f in srcs])
    staging.write_json(staging.path("plan.json"), asdict(plan))
    return plan


def _check_columns(schema: pa.Schema, cfg: InputConfig, f: SourceFile) -> pa.Schema:
    clash = [n for n in schema.names if n in RESERVED]
    if clash:
        raise InputError(f"{f.uri}: column(s) {', '.join(clash)} are reserved for modelyard's lineage; rename them")
    if cfg.key is not None and cfg.key not in schema.names:
        raise InputError(f"input.key: column {cfg.key!r} is not in {f.uri} (columns: {', '.join(schema.names)})")
    return schema


def _conform(batch: pa.RecordBatch, schema: pa.Schema, f: SourceFile) -> pa.RecordBatch:
    """Cast a later file's batch to the first file's columns, or say what differs."""
    if set(batch.schema.names) != set(schema.names):
        missing = [n for n in schema.names if n not in batch.schema.names]
        extra = [n for n in batch.schema.names if n not in schema.names]
        raise InputError(
            f"{f.uri}: columns differ from the first input file"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; extra: {', '.join(extra)}" if extra else ""))
    batch = batch.select(schema.names)
    # text formats infer types per file: any value may become text there, as it was text to begin with
    inferred = f.format in ("csv", "jsonl")
    diff = [f"{n}: {batch.schema.field(n).type} vs {schema.field(n).type}" for n in schema.names
            if not _widens(batch.schema.field(n).type, schema.field(n).type, inferred)]
    if not diff:
        try:
            return batch.cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            diff = [str(e)]  # e.g. an integer too large for the first file's type
    raise InputError(f"{f.uri}: column types differ from the first input file ({'; '.join(diff)})")


def _widens(src: pa.DataType, dst: pa.DataType, to_text: bool) -> bool:
    """Whether a later file's column type may be cast to the first file's without changing its meaning
    (a wider integer or float, another string or binary layout, a column of nulls ...)."""
    t = pa.types
    if src == dst or t.is_null(src):
        return True
    if t.is_dictionary(src) or t.is_dictionary(dst):
        return _widens(src.value_type if t.is_dictionary(src) else src,
                       dst.value_type if t.is_dictionary(dst) else dst, to_text)
    if (t.is_string(dst) or t.is_large_string(dst)) and (to_text or t.is_string(src) or t.is_large_string(src)):
        return not t.is_nested(src)
    if t.is_integer(src):
        return t.is_integer(dst) or t.is_floating(dst)  # the cast itself refuses values that do not fit
    if t.is_floating(src):
        return t.is_floating(dst) and src.bit_width <= dst.bit_width
    binary = lambda x: t.is_binary(x) or t.is_large_binary(x)  # noqa: E731
    if any(kind(src) and kind(dst) for kind in (binary, t.is_timestamp, t.is_date, t.is_decimal)):
        return True  # the cast refuses what would lose precision
    if (t.is_list(src) or t.is_large_list(src)) and (t.is_list(dst) or t.is_large_list(dst)):
        return _widens(src.value_type, dst.value_type, to_text)
    if t.is_struct(src) and t.is_struct(dst):
        names = {src.field(i).name: src.field(i).type for i in range(src.num_fields)}
        return set(names) == {dst.field(i).name for i in range(dst.num_fields)} and all(
            _widens(names[dst.field(i).name], dst.field(i).type, to_text) for i in range(dst.num_fields))
    return False


def _keys(batch: pa.RecordBatch, cfg: InputConfig, f: SourceFile, row0: int) -> pa.Array:
    if cfg.key is None:
        return pa.array([f"{f.name}#{r}" for r in range(row0, row0 + batch.num_rows)], pa.string())
    col = batch.column(cfg.key)
    if col.null_count:
        i = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
        raise InputError(f"{f.uri} row {row0 + i}: key column {cfg.key!r} is empty")
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise InputError(f"{f.uri}: key column {cfg.key!r} of type {col.type} cannot be a text key: {e}") from None


def _report_duplicates(staging: Staging, nshards: int, suspects: set[str], cfg: InputConfig) -> None:
    counts: dict[str, int] = {}
    for i in range(nshards):
        with staging.fs.open(staging.input_shard(i), "rb") as fh:
            for k in pq.read_table(fh, columns=["_row_key"]).column(0).to_pylist():
                if k in suspects:
                    counts[k] = counts.get(k, 0) + 1
    dups = sorted(k for k, c in counts.items() if c > 1)
    if dups:
        shown = ", ".join(repr(k) for k in dups[:10]) + (f" and {len(dups) - 10} more" if len(dups) > 10 else "")
        raise InputError(f"input.key {cfg.key!r}: {len(dups)} duplicate key(s): {shown}")
