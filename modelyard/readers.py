"""Input: find the files behind a URI and stream them as Arrow record batches.

Every reader yields batches of at most ``BATCH`` rows, so the orchestrator never holds the whole
dataset. Problems name the file (and line, where there is one) and raise ``InputError``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from modelyard.errors import InputError

BATCH = 8192
EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".json": "jsonl", ".csv": "csv"}
RESERVED = ("_row_key", "_source", "_run_id", "_lineage")


@dataclass(frozen=True)
class SourceFile:
    path: str  # path inside the filesystem
    uri: str  # what lineage records
    name: str  # relative to the input root: used to derive row keys
    format: str
    stamp: str  # size and modification time or ETag: the input fingerprint


def _format_of(path: str) -> str | None:
    return EXTENSIONS.get(posixpath.splitext(path)[1].lower())


def _protocol_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if proto in ("file", "local") else f"{proto}://{path}"


def _stamp(info: dict) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("md5") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{tag}"


def resolve(uri: str, fmt: str = "auto", storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[SourceFile]]:
    """The input files behind a file, folder, glob or fsspec URI, in a stable order."""
    try:
        fs, root = url_to_fs(uri, **(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise InputError(f"input.uri {uri!r}: {e}") from None
    if any(c in root for c in "*?["):
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
        parts = root.split("/")
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        base = "/".join(parts[:fixed]) or "/"  # the folder above the first wildcard: keys are relative to it
    elif fs.isdir(root):
        if fmt == "hf" or (fmt == "auto" and fs.exists(posixpath.join(root, "state.json"))):
            return fs, _hf_files(fs, root)
        paths = sorted(p for p in fs.find(root) if not any(
            part.startswith(("_", ".")) for part in posixpath.relpath(p, root).split("/")))
        if fmt == "auto":
            paths = [p for p in paths if _format_of(p)]
        base = root
    elif fs.isfile(root):
        paths, base = [root], posixpath.dirname(root)
    else:
        raise InputError(f"input.uri {uri!r}: no such file or folder")
    if not paths:
        raise InputError(f"input.uri {uri!r}: no input files found")
    files = []
    for p in paths:
        f = fmt if fmt != "auto" else _format_of(p)
        if f is None:
            raise InputError(f"{p}: cannot tell the format from the name; set input.format")
        files.append(SourceFile(p, _protocol_uri(fs, p), posixpath.relpath(p, base), f, _stamp(fs.info(p))))
    formats = {f.format for f in files}
    if len(formats) > 1:
        raise InputError(f"input.uri {uri!r}: files of several formats ({', '.join(sorted(formats))}); set input.format")
    return fs, files


def _hf_files(fs: fsspec.AbstractFileSystem, root: str) -> list[SourceFile]:
    """A `datasets.save_to_disk` folder: Arrow IPC streams listed in state.json."""
    try:
        state = json.loads(fs.cat_file(posixpath.join(root, "state.json")))
        names = [d["filename"] for d in state["_data_files"]]
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        raise InputError(f"{root}: not a datasets.save_to_disk folder (state.json: {e})") from None
    out = []
    for n in names:
        p = posixpath.join(root, n)
        out.append(SourceFile(p, _protocol_uri(fs, p), n, "hf", _stamp(fs.info(p))))
    return out


def fingerprint(files: list[SourceFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.uri}\0{f.stamp}\n".encode())
    return h.hexdigest()


def read_schema(fs: fsspec.AbstractFileSystem, f: SourceFile) -> pa.Schema:
    """The columns of a file, reading as little as its format allows."""
    if f.format == "parquet":
        try:
            with fs.open(f.path, "rb") as fh:
                return pq.ParquetFile(fh).schema_arrow
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{f.uri}: not a readable Parquet file: {e}") from None
    for batch in iter_batches(fs, f):
        return batch.schema
    raise InputError(f"{f.uri}: the file has no rows")


def iter_batches(fs: fsspec.AbstractFileSystem, f: SourceFile) -> Iterator[pa.RecordBatch]:
    reader = {"parquet": _parquet, "jsonl": _jsonl, "csv": _csv, "hf": _hf}[f.format]
    try:
        yield from reader(fs, f)
    except InputError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise InputError(f"{f.uri}: cannot read as {f.format}: {e}") from None


def _parquet(fs, f: SourceFile) -> Iterator[pa.RecordBatch]:
    with fs.open(f.path, "rb") as fh:
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{f.uri}: not a readable Parquet file: {e}") from None
        yield from pf.iter_batches(batch_size=BATCH)


def _csv(fs, f: SourceFile) -> Iterator[pa.RecordBatch]:
    invalid: list = []

    def on_invalid(row) -> str:  # keep the malformed row so the error can name its line
        invalid.append(row)
        return "error"

    with fs.open(f.path, "rb") as fh:
        try:
            reader = pacsv.open_csv(fh, read_options=pacsv.ReadOptions(block_size=1 << 22),
                                    parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid))
            yield from reader
        except pa.ArrowInvalid as e:
            if not invalid:
                raise
            row = invalid[0]
            line = row.number or _line_of(fs, f, row.text)
            where = f" line {line}" if line else ""
            raise InputError(f"{f.uri}{where}: {e}") from None


def _line_of(fs, f: SourceFile, text: str) -> int | None:
    """The number of the first line reading ``text`` (the streaming CSV reader does not count lines)."""
    want = text.encode("utf-8", "surrogateescape").rstrip(b"\r\n")
    with fs.open(f.path, "rb") as fh:
        for lineno, line in enumerate(io.BufferedReader(fh), start=1):
            if line.rstrip(b"\r\n") == want:
                return lineno
    return None


def _hf(fs, f: SourceFile) -> Iterator[pa.RecordBatch]:
    with fs.open(f.path, "rb") as fh:
        yield from ipc.open_stream(fh)


def _jsonl(fs, f: SourceFile) -> Iterator[pa.RecordBatch]:
    """JSON Lines, parsed line by line so that an error names its line.

    The first batch fixes the columns and types; a later line with another column, or a value of
    another type, is an error naming the line.
    """
    schema: pa.Schema | None = None
    rows: list[dict] = []
    first_line = 1
    with fs.open(f.path, "rb") as raw:
        for lineno, line in enumerate(io.BufferedReader(raw), start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{f.uri} line {lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{f.uri} line {lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{f.uri} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            if schema is not None:
                extra = obj.keys() - set(schema.names)
                if extra:
                    raise InputError(f"{f.uri} line {lineno}: column(s) {', '.join(sorted(extra))} not in the earlier lines")
            rows.append(obj)
            if len(rows) >= BATCH:
                batch, schema = _to_batch(rows, schema, f, first_line)
                yield batch
                rows, first_line = [], lineno + 1
    if rows:
        yield _to_batch(rows, schema, f, first_line)[0]


def _to_batch(rows: list[dict], schema: pa.Schema | None, f: SourceFile, first_line: int):
    try:
        if schema is None:
            names: dict[str, None] = {}
            for r in rows:
                names.update(dict.fromkeys(r))
            table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])
            # a column that is null in every row of the first batch becomes a string column
            schema = pa.schema([pa.field(fl.name, pa.string()) if pa.types.is_null(fl.type) else fl for fl in table.schema])
            table = table.cast(schema)
        else:
            table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(
            f"{f.uri} lines {first_line}-{first_line + len(rows) - 1}: values do not fit the columns "
            f"of the first lines: {e}") from None
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([]), schema
