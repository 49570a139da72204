"""Parquet as modelyard writes it: dictionaries on the columns whose values repeat, not on floats."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from modelyard.parquet import dictionary_columns, write_table


def test_floats_get_no_dictionary_and_the_rest_do(tmp_path):
    n = 50
    table = pa.table({
        "text": [f"t{i % 3}" for i in range(n)],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array([float(i) for i in range(n * 4)], pa.float32()), 4),
        "vec": pa.array([[0.5, 0.25]] * n, pa.list_(pa.float64())),
        "tags": pa.array([["a", "b"]] * n, pa.list_(pa.string())),
        "_lineage": pa.array([{"s": {"model": "m", "latency_ms": 1.5, "attempts": 1}}] * n),
    })
    assert dictionary_columns(table.schema) == ["text", "tags.list.element", "_lineage.s.model", "_lineage.s.attempts"]
    write_table(table, tmp_path / "t.parquet")
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    enc = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert set(enc) == {"text", "embedding.list.element", "vec.list.element", "tags.list.element",
                        "_lineage.s.model", "_lineage.s.latency_ms", "_lineage.s.attempts"}
    for path, encodings in enc.items():
        assert ("RLE_DICTIONARY" in encodings) == (path in dictionary_columns(table.schema)), (path, encodings)
    assert pq.read_table(tmp_path / "t.parquet").equals(table)  # the same values back
