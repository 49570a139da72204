"""Bad input through the real console script: one clear message naming the problem, exit 2,
no traceback, and nothing written to the output."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli

CONFIG = """
name: bad
input: {{uri: "{uri}"{extra}}}
models:
  m: {{model: x, endpoints: ["http://127.0.0.1:9/v1"]}}
stages:
  - name: s
    model: m
    prompt: "{prompt}"
    output: y
output: {{uri: "{out}"}}
"""


def config(tmp_path: Path, uri: Path | str, prompt: str = "{{ text }}", extra: str = "") -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(CONFIG.format(uri=uri, prompt=prompt, out=tmp_path / "out", extra=extra))
    return p


def expect_user_error(tmp_path: Path, cfg: Path, *needles: str) -> None:
    r = run_cli("run", str(cfg), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert not (tmp_path / "out").exists()


def test_unknown_key(tmp_path):
    cfg = config(tmp_path, tmp_path / "x.jsonl", extra=", formt: csv")
    expect_user_error(tmp_path, cfg, "input.formt: unknown key", str(cfg))


def test_template_naming_a_missing_column(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"text": "a"}) + "\n")
    expect_user_error(tmp_path, config(tmp_path, data, prompt="{{ txet }}"), "no column 'txet'", "stages[0] (s).prompt")


def test_missing_input_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    expect_user_error(tmp_path, config(tmp_path, missing), str(missing), "no such file")


def test_corrupt_parquet(tmp_path):
    bad = tmp_path / "in.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    expect_user_error(tmp_path, config(tmp_path, bad), str(bad), "not a readable Parquet file")


def test_csv_with_a_malformed_line(tmp_path):
    bad = tmp_path / "in.csv"
    bad.write_text("text,n\nhello,1\nworld,2,extra\n")
    expect_user_error(tmp_path, config(tmp_path, bad), str(bad), "Expected 2 columns, got 3")


def test_bad_param(tmp_path):
    cfg = config(tmp_path, tmp_path / "x.jsonl")
    r = run_cli("run", str(cfg), "--param", "oops")
    assert r.returncode == 2 and "--param 'oops'" in r.stderr


@pytest.mark.parametrize("args", [["inspect", "/nonexistent/out"], ["inspect", "/nonexistent/out", "--row", "k"]])
def test_inspect_of_something_that_is_not_an_output(args):
    r = run_cli(*args)
    assert r.returncode == 2 and "no _manifest.json" in r.stderr


def test_corrupt_parquet_in_a_folder_is_named(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), folder / "a.parquet")
    (folder / "b.parquet").write_bytes(b"garbage")
    expect_user_error(tmp_path, config(tmp_path, folder), str(folder / "b.parquet"))
