"""Input reading and sharding: every format, stable shards, row keys, lineage of the source, and
bad input refused with a message naming the file (and line, row or key). No model needed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from modelyard.config import InputConfig
from modelyard.errors import InputError
from modelyard.plan import SOURCE_TYPE, build_plan, input_columns
from modelyard.readers import resolve
from modelyard.staging import Staging


def staging(tmp_path: Path, job: str = "job1") -> Staging:
    return Staging.for_job(str(tmp_path / "out"), job)


def plan(tmp_path: Path, uri, shard_rows: int = 4, job: str = "job1", limit: int | None = None, **kw):
    st = staging(tmp_path, job)
    p = build_plan(InputConfig(uri=str(uri), **kw), shard_rows, st, limit)
    return p, st


def shards(st: Staging, p) -> list[pa.Table]:
    out = []
    for i in range(len(p.shards)):
        with st.fs.open(st.input_shard(i), "rb") as fh:
            out.append(pq.read_table(fh))
    return out


def rows_of(st: Staging, p) -> list[dict]:
    return [r for t in shards(st, p) for r in t.to_pylist()]


def table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": [f"k{i}" for i in range(start, start + n)], "n": list(range(start, start + n)),
                     "text": [f"row {i}" for i in range(start, start + n)]})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- formats ---------------------------------------------------------------------------------


def test_parquet_shards_keys_and_source(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(table(10), src)
    p, st = plan(tmp_path, src, shard_rows=4, key="id")
    assert p.shards == [4, 4, 2] and p.rows == 10
    ts = shards(st, p)
    assert [t.num_rows for t in ts] == [4, 4, 2]
    assert ts[0].schema.names == ["id", "n", "text", "_row_key", "_source"]
    assert ts[0].schema.field("_source").type == SOURCE_TYPE
    assert ts[0].schema.field("_row_key").type == pa.string()
    rows = rows_of(st, p)
    assert [r["_row_key"] for r in rows] == [f"k{i}" for i in range(10)]
    assert [r["n"] for r in rows] == list(range(10))
    assert [r["_source"] for r in rows] == [{"uri": str(src), "shard": i // 4, "row": i} for i in range(10)]
    # the staging sits beside the output, never inside it
    assert st.root == str(tmp_path / "_modelyard" / "out" / "job1")
    assert st.fs.exists(st.path("plan.json"))
    assert Path(st.input_shard(2)).name == "shard-00002.parquet"


def test_jsonl_without_key_derives_it_from_the_file_and_row(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"t{i}", "x": i} for i in range(5)])
    p, st = plan(tmp_path, src, shard_rows=2)
    rows = rows_of(st, p)
    assert p.shards == [2, 2, 1]
    assert [r["_row_key"] for r in rows] == [f"in.jsonl#{i}" for i in range(5)]
    assert [r["text"] for r in rows] == [f"t{i}" for i in range(5)]
    assert [(r["_source"]["shard"], r["_source"]["row"]) for r in rows] == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4)]


def test_jsonl_blank_lines_and_column_types(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "f": 1.5, "b": true, "s": null}\n\n{"id": 2, "f": 2.5, "b": false, "s": "x"}\n')
    p, st = plan(tmp_path, src, key="id")
    t = shards(st, p)[0]
    assert t.schema.field("id").type == pa.int64()
    assert t.schema.field("f").type == pa.float64()
    assert t.schema.field("b").type == pa.bool_()
    assert t.schema.field("s").type == pa.string()
    assert t.column("_row_key").to_pylist() == ["1", "2"]
    assert t.column("s").to_pylist() == [None, "x"]


def test_csv(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,text,score\na,hello,1\nb,\"with, comma\",2\nc,bye,3\n")
    p, st = plan(tmp_path, src, shard_rows=2, key="id")
    rows = rows_of(st, p)
    assert p.shards == [2, 1]
    assert [r["text"] for r in rows] == ["hello", "with, comma", "bye"]
    assert [r["score"] for r in rows] == [1, 2, 3]
    assert [r["_row_key"] for r in rows] == ["a", "b", "c"]


def test_datasets_save_to_disk_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"id": [f"h{i}" for i in range(7)], "text": [f"x{i}" for i in range(7)]})
    ds.save_to_disk(str(tmp_path / "ds"))
    for fmt in ("auto", "hf"):
        p, st = plan(tmp_path, tmp_path / "ds", shard_rows=3, job=f"j-{fmt}", format=fmt)
        rows = rows_of(st, p)
        assert p.shards == [3, 3, 1]
        assert [r["id"] for r in rows] == [f"h{i}" for i in range(7)]
        assert rows[0].keys() == {"id", "text", "_row_key", "_source"}
        arrow = sorted(x.name for x in (tmp_path / "ds").glob("*.arrow"))
        assert [r["_row_key"] for r in rows] == [f"{arrow[0]}#{i}" for i in range(7)]
        assert rows[6]["_source"]["uri"] == str(tmp_path / "ds" / arrow[0])
    assert input_columns(InputConfig(uri=str(tmp_path / "ds"))).names == ["id", "text"]


def test_folder_of_files_in_name_order_skipping_hidden_and_underscore(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    pq.write_table(table(3, 0), d / "b.parquet")
    pq.write_table(table(2, 3), d / "a.parquet")
    pq.write_table(table(2, 5), d / "sub" / "c.parquet")
    pq.write_table(table(9, 100), d / "_SUCCESS.parquet")
    pq.write_table(table(9, 200), d / ".hidden.parquet")
    (d / "README.txt").write_text("not data")
    p, st = plan(tmp_path, d, shard_rows=3)
    rows = rows_of(st, p)
    assert p.rows == 7 and p.shards == [3, 3, 1]
    assert [r["n"] for r in rows] == [3, 4, 0, 1, 2, 5, 6]
    assert [r["_row_key"] for r in rows] == ["a.parquet#0", "a.parquet#1", "b.parquet#0", "b.parquet#1",
                                             "b.parquet#2", "sub/c.parquet#0", "sub/c.parquet#1"]
    # the row is the row inside its own file; the shard is where it landed
    assert [(r["_source"]["uri"], r["_source"]["shard"], r["_source"]["row"]) for r in rows] == [
        (str(d / "a.parquet"), 0, 0), (str(d / "a.parquet"), 0, 1), (str(d / "b.parquet"), 0, 0),
        (str(d / "b.parquet"), 1, 1), (str(d / "b.parquet"), 1, 2), (str(d / "sub" / "c.parquet"), 1, 0),
        (str(d / "sub" / "c.parquet"), 2, 1)]
    assert [f["uri"] for f in p.files] == [str(d / "a.parquet"), str(d / "b.parquet"), str(d / "sub" / "c.parquet")]


def test_glob(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        write_jsonl(d / f"part-{i}.jsonl", [{"v": i * 10 + j} for j in range(2)])
    write_jsonl(d / "other.jsonl", [{"v": -1}])
    p, st = plan(tmp_path, f"{d}/part-*.jsonl", shard_rows=4)
    rows = rows_of(st, p)
    assert [r["v"] for r in rows] == [0, 1, 10, 11, 20, 21]
    assert [r["_row_key"] for r in rows][:3] == ["part-0.jsonl#0", "part-0.jsonl#1", "part-1.jsonl#0"]
    assert p.shards == [4, 2]


def test_glob_with_wildcard_in_a_folder_name_keys_relative_to_the_fixed_part(tmp_path):
    for day in ("d1", "d2"):
        (tmp_path / "in" / day).mkdir(parents=True)
        write_jsonl(tmp_path / "in" / day / "x.jsonl", [{"v": day}])
    p, st = plan(tmp_path, f"{tmp_path}/in/d?/x.jsonl")
    assert [r["_row_key"] for r in rows_of(st, p)] == ["d1/x.jsonl#0", "d2/x.jsonl#0"]


def test_shards_are_stable_across_two_plannings(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        pq.write_table(table(25, i * 25), d / f"p{i}.parquet")
    p1, st1 = plan(tmp_path, d, shard_rows=10, job="first")
    p2, st2 = plan(tmp_path, d, shard_rows=10, job="second")
    assert p1.shards == p2.shards == [10] * 7 + [5]
    assert p1.fingerprint == p2.fingerprint
    for a, b in zip(shards(st1, p1), shards(st2, p2), strict=True):
        assert a.equals(b)
    # planning again into the same staging rewrites the same files with the same rows
    before = shards(st1, p1)
    p3, st3 = plan(tmp_path, d, shard_rows=10, job="first")
    assert all(a.equals(b) for a, b in zip(before, shards(st3, p3), strict=True))
    # a changed input changes the fingerprint
    pq.write_table(table(26, 0), d / "p0.parquet")
    p4, _ = plan(tmp_path, d, shard_rows=10, job="third")
    assert p4.fingerprint != p1.fingerprint and p4.rows == 76


def test_large_jsonl_crosses_reader_batches(tmp_path):
    n = 20_000  # more than one reader batch of 8192 rows
    src = write_jsonl(tmp_path / "big.jsonl", [{"i": i} for i in range(n)])
    p, st = plan(tmp_path, src, shard_rows=3000)
    assert p.shards == [3000] * 6 + [2000]
    t = pa.concat_tables(shards(st, p))
    assert t.column("i").to_pylist() == list(range(n))
    assert t.column("_source").combine_chunks().field("row").to_pylist() == list(range(n))


def test_limit(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(table(5, 0), d / "a.parquet")
    pq.write_table(table(5, 5), d / "b.parquet")
    p, st = plan(tmp_path, d, shard_rows=4, limit=7)
    assert p.rows == 7 and p.shards == [4, 3]
    assert [r["n"] for r in rows_of(st, p)] == list(range(7))
    p, st = plan(tmp_path, d, shard_rows=4, limit=3, job="j2")
    assert p.rows == 3 and p.shards == [3]
    p, st = plan(tmp_path, d, shard_rows=4, limit=100, job="j3")
    assert p.rows == 10


def test_fifty_thousand_rows_make_fifty_shards(tmp_path):
    src = tmp_path / "big.parquet"
    n = 50_000
    pq.write_table(pa.table({"i": pa.array(range(n), pa.int64())}), src, row_group_size=7000)
    p, st = plan(tmp_path, src, shard_rows=1000)
    assert p.rows == n and p.shards == [1000] * 50
    files = sorted(st.fs.ls(st.path("input")))
    assert len(files) == 50 and files[-1].endswith("shard-00049.parquet")
    last = shards(st, p)[-1]
    assert last.column("i").to_pylist() == list(range(49_000, 50_000))
    assert last.column("_source").combine_chunks().field("shard").unique().to_pylist() == [49]


# --- bad input -------------------------------------------------------------------------------


def bad(tmp_path: Path, uri, **kw) -> str:
    with pytest.raises(InputError) as e:
        plan(tmp_path, uri, **kw)
    return str(e.value)


def test_duplicate_keys_are_named(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"id": "x"}, {"id": "y"}, {"id": "z"}])
    write_jsonl(d / "b.jsonl", [{"id": "w"}, {"id": "y"}, {"id": "x"}])
    msg = bad(tmp_path, d, key="id", shard_rows=2)
    assert "2 duplicate key(s)" in msg and "'x'" in msg and "'y'" in msg
    assert "'z'" not in msg and "'w'" not in msg
    assert "input.key 'id'" in msg


def test_null_key_names_file_and_row(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a"}, {"id": "b"}, {"id": None}])
    msg = bad(tmp_path, src, key="id")
    assert str(src) in msg and "row 2" in msg and "'id'" in msg


def test_missing_key_column(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(table(3), src)
    msg = bad(tmp_path, src, key="ticket_id")
    assert "'ticket_id'" in msg and str(src) in msg and "id, n, text" in msg


def test_corrupt_parquet(tmp_path):
    src = tmp_path / "x.parquet"
    src.write_bytes(b"this is not parquet at all" * 10)
    msg = bad(tmp_path, src)
    assert str(src) in msg and "Parquet" in msg
    with pytest.raises(InputError, match="x.parquet"):
        input_columns(InputConfig(uri=str(src)))


def test_csv_with_a_malformed_line(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("a,b\n1,2\n3,4\n5,6,7\n8,9\n")
    msg = bad(tmp_path, src)
    assert str(src) in msg
    assert "line 4: CSV parse error: Expected 2 columns, got 3: 5,6,7" in msg


def test_jsonl_invalid_json_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"a": 1}\n{"a": 2}\n\n{"a": 3,,}\n{"a": 4}\n')
    msg = bad(tmp_path, src)
    assert str(src) in msg and "line 4" in msg and "not valid JSON" in msg


def test_jsonl_non_object_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"a": 1}\n[1, 2]\n')
    msg = bad(tmp_path, src)
    assert "line 2" in msg and "expected a JSON object" in msg


def test_jsonl_columns_are_the_union_of_the_first_batch_and_fixed_after_it(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"a": 1}, {"a": 2, "b": "x"}])
    p, st = plan(tmp_path, src)
    assert [(r["a"], r["b"]) for r in rows_of(st, p)] == [(1, None), (2, "x")]
    rows = [{"a": i} for i in range(8192)] + [{"a": 1}, {"a": 2, "c": 3}]
    src = write_jsonl(tmp_path / "late.jsonl", rows)
    msg = bad(tmp_path, src, job="late", shard_rows=10_000)
    assert str(src) in msg and "line 8194" in msg and "c" in msg
    rows = [{"a": i} for i in range(8192)] + [{"a": "text"}]
    src = write_jsonl(tmp_path / "retyped.jsonl", rows)
    msg = bad(tmp_path, src, job="retyped", shard_rows=10_000)
    assert str(src) in msg and "lines 8193-8193" in msg


def test_jsonl_invalid_utf8_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"a": "ok"}\n{"a": "ok"}\n{"a": "bad \xff\xfe"}\n')
    msg = bad(tmp_path, src)
    assert str(src) in msg and "line 3" in msg and "UTF-8" in msg


def test_parquet_files_with_different_column_types(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.int64())}), d / "a.parquet")
    pq.write_table(pa.table({"x": pa.array(["one", "two"])}), d / "b.parquet")
    msg = bad(tmp_path, d)
    assert str(d / "b.parquet") in msg and "int64" in msg and "string" in msg


def test_parquet_files_with_different_column_types_even_when_a_cast_would_work(tmp_path):
    # int64 -> string always "works" in Arrow; silently turning numbers into text is still wrong
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"x": pa.array(["one", "two"])}), d / "a.parquet")
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.int64())}), d / "b.parquet")
    msg = bad(tmp_path, d)
    assert str(d / "b.parquet") in msg and "int64" in msg and "string" in msg


def test_text_formats_may_infer_numbers_in_one_file_and_text_in_another(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.csv").write_text("zip,city\n02134A,Boston\n")
    (d / "b.csv").write_text("zip,city\n10001,New York\n")
    p, st = plan(tmp_path, d)
    assert [r["zip"] for r in rows_of(st, p)] == ["02134A", "10001"]
    # but text cannot become a number
    (d / "a.csv").write_text("zip,city\n10001,New York\n")
    (d / "b.csv").write_text("zip,city\n02134A,Boston\n")
    msg = bad(tmp_path, d, job="j2")
    assert str(d / "b.csv") in msg and "zip: string vs int64" in msg


def test_parquet_files_with_widening_types_are_read(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.int64()), "s": pa.array(["a", "b"])}), d / "a.parquet")
    pq.write_table(pa.table({"x": pa.array([3], pa.int32()), "s": pa.array(["c"], pa.large_string())}),
                   d / "b.parquet")
    pq.write_table(pa.table({"s": pa.array(["d"]), "x": pa.nulls(1, pa.null())}), d / "c.parquet")
    p, st = plan(tmp_path, d)
    t = shards(st, p)[0]
    assert t.schema.field("x").type == pa.int64()
    assert t.column("x").to_pylist() == [1, 2, 3, None]
    assert t.column("s").to_pylist() == ["a", "b", "c", "d"]


def test_files_with_different_columns(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"x": 1, "y": 2}])
    write_jsonl(d / "b.jsonl", [{"x": 1, "z": 2}])
    msg = bad(tmp_path, d)
    assert str(d / "b.jsonl") in msg and "missing: y" in msg and "extra: z" in msg


@pytest.mark.parametrize("name", ["_row_key", "_source", "_lineage", "_run_id"])
def test_reserved_column_names(tmp_path, name):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a", name: "x"}])
    msg = bad(tmp_path, src)
    assert name in msg and "reserved" in msg and str(src) in msg


def test_missing_input_path(tmp_path):
    msg = bad(tmp_path, tmp_path / "nope" / "in.parquet")
    assert str(tmp_path / "nope" / "in.parquet") in msg and "no such file" in msg


def test_glob_matching_nothing_and_empty_input(tmp_path):
    assert "no input files" in bad(tmp_path, f"{tmp_path}/*.parquet")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "no rows" in bad(tmp_path, tmp_path / "empty.jsonl")


def test_mixed_formats_in_a_folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"x": 1}])
    pacsv.write_csv(pa.table({"x": [1]}), d / "b.csv")
    msg = bad(tmp_path, d)
    assert "csv" in msg and "jsonl" in msg and "input.format" in msg


def test_resolve_fingerprint_changes_with_content(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"x": 1}])
    _, files = resolve(str(src))
    src.write_text('{"x": 1}\n{"x": 2}\n')
    _, files2 = resolve(str(src))
    assert files[0].stamp != files2[0].stamp


def test_key_column_of_numbers_and_of_an_unusable_type(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"k": pa.array([7, 8], pa.int64())}), src)
    p, st = plan(tmp_path, src, key="k")
    assert [r["_row_key"] for r in rows_of(st, p)] == ["7", "8"]
    pq.write_table(pa.table({"k": pa.array([{"a": 1}, {"a": 2}])}), src)
    msg = bad(tmp_path, src, key="k", job="j2")
    assert str(src) in msg and "'k'" in msg and "struct" in msg


def test_datasets_folder_with_several_arrow_files(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"v": list(range(6))}).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    p, st = plan(tmp_path, tmp_path / "ds", shard_rows=4)
    rows = rows_of(st, p)
    assert [r["v"] for r in rows] == list(range(6))
    assert [r["_row_key"] for r in rows] == [f"data-00000-of-00002.arrow#{i}" for i in range(3)] + [
        f"data-00001-of-00002.arrow#{i}" for i in range(3)]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.arrow").write_bytes(b"")
    msg = bad(tmp_path, tmp_path / "plain", format="hf", job="j2")
    assert "not a datasets.save_to_disk folder" in msg and str(tmp_path / "plain") in msg
