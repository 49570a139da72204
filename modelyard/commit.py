"""Merge finished shards into well-sized parts and commit the output atomically.

The commit is assembled in the job's staging folder: parts (whole shards, in input order, rolled
over at ``output.target_file_mb``), ``_errors.parquet``, ``_lineage/`` and ``_manifest.json``
last. Then the folder is renamed into place (the previous version moved aside first), so a reader
sees the old output or the new one, never a part of one.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from modelyard.failpoints import failpoint
from modelyard.lineage import ERRORS_SCHEMA
from modelyard.parquet import writer_options
from modelyard.staging import Staging, write_bytes_atomic

MANIFEST = "_manifest.json"
# In a folder of its own: a `*.parquet` glob over the output (DuckDB, datasets) must match parts only.
ERRORS = "_errors/errors.parquet"
LINEAGE = "_lineage/openlineage.jsonl"
REPORT = "_report.html"  # drawn into the output just after its commit (modelyard.charts.write_report)


def target_uri(output_uri: str, partition: str | None) -> str:
    base = output_uri.rstrip("/")
    return f"{base}/{partition.strip('/')}" if partition else base


class _Parts:
    """Writes tables into part-NNNNN.parquet files of about ``target_bytes`` each."""

    def __init__(self, staging: Staging, folder: str, schema: pa.Schema, target_bytes: float, compression: str,
                 prefix: str = "part"):
        self.staging, self.folder, self.schema, self.prefix = staging, folder, schema, prefix
        self.target, self.compression = target_bytes, compression
        self.files: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.fh = None
        self.rows = 0
        self.bytes_in = 0

    def add(self, table: pa.Table, approx_bytes: int) -> None:
        if self.writer is None:
            name = f"{self.prefix}-{len(self.files):05d}.parquet"
            self.fh = _Hashed(self.staging.fs.open(posixpath.join(self.folder, name), "wb"))
            self.writer = pq.ParquetWriter(self.fh, self.schema, **writer_options(self.schema, self.compression))
            self.files.append({"path": name, "rows": 0})
        self.writer.write_table(table.cast(self.schema) if table.schema != self.schema else table)
        self.files[-1]["rows"] += table.num_rows
        self.bytes_in += approx_bytes
        if self.bytes_in >= self.target:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.fh.close()
            self.files[-1]["sha256"], self.files[-1]["bytes"] = self.fh.sha256.hexdigest(), self.fh.size
            self.writer = self.fh = None
            self.bytes_in = 0


class _Hashed:
    """A file being written, hashed as its bytes go by: a part's sha256 and size without reading
    the part back (its whole size again, after the merge, for every commit)."""

    def __init__(self, fh):
        self.fh, self.sha256, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        return self.fh.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()

    @property
    def closed(self) -> bool:
        return self.fh.closed


def _read_ahead(reader: ThreadPoolExecutor, staging: Staging, shard_ids: list[int]):
    """Each shard's result table, its file's size and its errors table, in order; the next shard
    is read (by ``reader``) while the caller writes this one, so decoding one shard and encoding
    the other overlap. At most two shards are in memory."""
    fs = staging.fs

    def read(i: int) -> tuple[pa.Table, int, pa.Table]:
        path = staging.result_shard(i)
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
        with fs.open(staging.errors_shard(i), "rb") as fh:
            errs = pq.read_table(fh)
        return table, fs.size(path), errs

    ahead = reader.submit(read, shard_ids[0]) if shard_ids else None
    for k in range(len(shard_ids)):
        got = ahead.result()
        ahead = reader.submit(read, shard_ids[k + 1]) if k + 1 < len(shard_ids) else None
        yield got


def merge(staging: Staging, shard_ids: list[int], schema: pa.Schema, stage_names: list[str], *,
          target_file_mb: float, compression: str, lineage_meta: dict) -> dict[str, Any]:
    """Build the commit folder from the shard results; returns files, error count and stage stats."""
    fs = staging.fs
    folder = staging.path("commit")
    if fs.exists(folder):
        fs.rm(folder, recursive=True)
    fs.makedirs(folder, exist_ok=True)
    schema = schema.with_metadata({"modelyard": json.dumps(lineage_meta, sort_keys=True)})
    # On an object store the parts are copied beside the previous version before the manifest
    # switches to them, so their names must be new: part-<run>-NNNNN.parquet.
    prefix = "part" if renames_atomically(fs) else f"part-{lineage_meta['run_id'][:8]}"
    parts = _Parts(staging, folder, schema, target_file_mb * 1e6, compression, prefix)
    latencies: dict[str, list[pa.Array]] = {s: [] for s in stage_names}
    err_writer = None
    err_rows = 0
    fs.makedirs(posixpath.join(folder, posixpath.dirname(ERRORS)), exist_ok=True)
    with fs.open(posixpath.join(folder, ERRORS), "wb") as efh, \
            ThreadPoolExecutor(1, thread_name_prefix="modelyard-merge-read") as reader:
        err_writer = pq.ParquetWriter(efh, ERRORS_SCHEMA, compression=compression)
        for table, size, errs in _read_ahead(reader, staging, shard_ids):
            lin = table.column("_lineage")
            for s in stage_names:
                col = pc.struct_field(lin, [s, "latency_ms"])
                latencies[s].append(col.drop_null() if hasattr(col, "drop_null") else pc.drop_null(col))
            parts.add(table, size)
            failpoint("merge")
            if errs.num_rows:
                err_writer.write_table(errs)
                err_rows += errs.num_rows
        err_writer.close()
    parts.close()
    lat = {}
    for s, chunks in latencies.items():
        arr = pa.chunked_array(chunks, pa.float64()) if chunks else pa.chunked_array([], pa.float64())
        if len(arr):
            q = pc.quantile(arr, q=[0.5, 0.95]).to_pylist()
            lat[s] = {"latency_ms_p50": round(q[0], 3), "latency_ms_p95": round(q[1], 3)}
        else:
            lat[s] = {"latency_ms_p50": None, "latency_ms_p95": None}
    return {"folder": folder, "files": parts.files, "errors": {"path": ERRORS, "rows": err_rows}, "latency": lat}


def write_manifest(staging: Staging, manifest: dict[str, Any]) -> None:
    write_bytes_atomic(staging.fs, posixpath.join(staging.path("commit"), MANIFEST),
                       json.dumps(manifest, indent=2, default=str).encode())


def renames_atomically(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


def swap_in(staging: Staging, target: str) -> None:
    """Put the commit folder in place of ``target``.

    A local filesystem renames the folder (the previous version moved aside first). An object
    store has no rename: the new files are copied beside the old ones, then the manifest, the
    commit point, is replaced in one write, then the files it no longer lists are deleted.
    Readers that trust the manifest (``inspect`` among them) never see a mix.
    """
    fs = staging.fs
    _, tpath = _split(target)
    if not renames_atomically(fs):
        _publish_by_manifest(staging, tpath.rstrip("/"))
        return
    new = staging.path("commit")
    old = staging.path(f"previous-{int(time.time() * 1000)}")
    fs.makedirs(posixpath.dirname(tpath.rstrip("/")), exist_ok=True)
    if fs.exists(tpath):
        fs.mv(tpath, old, recursive=True)
    fs.mv(new, tpath, recursive=True)
    if fs.exists(old):
        fs.rm(old, recursive=True)


def _publish_by_manifest(staging: Staging, tpath: str) -> None:
    fs = staging.fs
    new = staging.path("commit")
    manifest = json.loads(fs.cat_file(posixpath.join(new, MANIFEST)))
    keep = {f["path"] for f in manifest["files"]} | {ERRORS, LINEAGE, MANIFEST}
    for rel in sorted(keep - {MANIFEST}):
        src = posixpath.join(new, rel)
        if fs.exists(src):
            fs.copy(src, posixpath.join(tpath, rel))
    failpoint("publish-before-manifest")
    fs.copy(posixpath.join(new, MANIFEST), posixpath.join(tpath, MANIFEST))
    for f in fs.find(tpath):
        rel = posixpath.relpath(f, tpath)
        if rel not in keep:
            fs.rm(f)
    fs.rm(new, recursive=True)


def _split(uri: str):
    from fsspec.core import url_to_fs

    return url_to_fs(uri)


def read_manifest(output: str) -> dict[str, Any] | None:
    fs, path = _split(output)
    p = posixpath.join(path.rstrip("/"), MANIFEST)
    if not fs.exists(p):
        return None
    return json.loads(fs.cat_file(p))
