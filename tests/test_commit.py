"""The commit's merge of shard results into parts (``modelyard.commit.merge``), read back with pyarrow."""

import hashlib
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from modelyard.commit import merge
from modelyard.lineage import ERRORS_SCHEMA, lineage_type
from modelyard.plan import SOURCE_TYPE
from modelyard.staging import Staging

STAGE = "label"


def _schema() -> pa.Schema:
    return pa.schema([("text", pa.string()), ("vec", pa.list_(pa.float32(), 64)), ("_row_key", pa.string()),
                      ("_source", SOURCE_TYPE), ("_run_id", pa.string()), ("_lineage", lineage_type([STAGE]))])


def _shard(staging: Staging, schema: pa.Schema, i: int, rows: int) -> None:
    import numpy as np

    rng = np.random.default_rng(i)
    keys = [f"s{i}-r{j}" for j in range(rows)]
    lineage = [{STAGE: {"model": "m", "latency_ms": float(j), "attempts": 1, "cached": False, "skipped": False}}
               for j in range(rows)]
    vec = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(rows * 64, dtype=np.float32)), 64)
    table = pa.table({"text": [f"text {k}" for k in keys], "vec": vec, "_row_key": keys,
                      "_source": pa.array([None] * rows, SOURCE_TYPE), "_run_id": ["run"] * rows,
                      "_lineage": pa.array(lineage, schema.field("_lineage").type)}, schema=schema)
    staging.fs.makedirs(staging.path("results"), exist_ok=True)
    pq.write_table(table, staging.result_shard(i))
    errs = [{"_row_key": keys[0], "stage": STAGE, "error": f"shard {i} row 0", "raw": None, "finish_reason": None,
             "attempts": 1, "_source": None, "_run_id": "run"}] if i % 2 else []
    pq.write_table(pa.Table.from_pylist(errs, schema=ERRORS_SCHEMA), staging.errors_shard(i))


def test_shards_merge_into_parts_in_order_with_the_hash_and_size_of_each_file(tmp_path):
    staging = Staging(LocalFileSystem(), str(tmp_path / "job"))
    schema = _schema()
    sizes = [300, 50, 700, 1, 400, 250]
    for i, n in enumerate(sizes):
        _shard(staging, schema, i, n)
    merged = merge(staging, list(range(len(sizes))), schema, [STAGE], target_file_mb=0.15, compression="zstd",
                   lineage_meta={"run_id": "0123456789"})
    files = merged["files"]
    assert len(files) > 1  # rolled over at target_file_mb
    keys = []
    for f in files:
        path = posixpath.join(merged["folder"], f["path"])
        data = open(path, "rb").read()
        assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
        table = pq.read_table(path)
        assert table.num_rows == f["rows"]
        keys += table.column("_row_key").to_pylist()
    assert keys == [f"s{i}-r{j}" for i, n in enumerate(sizes) for j in range(n)]
    errors = pq.read_table(posixpath.join(merged["folder"], merged["errors"]["path"]))
    assert errors.column("error").to_pylist() == ["shard 1 row 0", "shard 3 row 0", "shard 5 row 0"]
    assert merged["errors"]["rows"] == 3
    assert merged["latency"][STAGE]["latency_ms_p50"] is not None


def test_a_job_without_shards_merges_into_nothing(tmp_path):
    staging = Staging(LocalFileSystem(), str(tmp_path / "job"))
    merged = merge(staging, [], _schema(), [STAGE], target_file_mb=1, compression="zstd", lineage_meta={"run_id": "r"})
    assert merged["files"] == [] and merged["errors"]["rows"] == 0
