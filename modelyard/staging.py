"""Where a job keeps its work before the commit.

``<output's parent>/_modelyard/<output name>/<job key>/`` holds the input split into shards, one
result file per finished shard, and the commit being assembled. It sits beside the output, on
the same filesystem, so the commit is a rename; readers skip it (pyarrow, DuckDB and `datasets`
ignore names starting with ``_``). The job key is derived from the config, its parameters and
the input fingerprint, so a re-run of the same job finds the shards already done.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import array
import uuid
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs


def job_key(config_sha256: str, params: dict[str, str], input_fingerprint: str, limit: int | None) -> str:
    blob = json.dumps([config_sha256, sorted(params.items()), input_fingerprint, limit])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class Staging:
    fs: fsspec.AbstractFileSystem
    root: str  # path of _staging/<job> inside fs

    @classmethod
    def for_job(cls, output_root: str, key: str) -> Staging:
        fs, root = url_to_fs(output_root)
        root = root.rstrip("/")
        return cls(fs, posixpath.join(posixpath.dirname(root), "_modelyard", posixpath.basename(root), key))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def input_shard(self, i: int) -> str:
        return self.path("input", f"shard-{i:05d}.parquet")

    def result_shard(self, i: int) -> str:
        return self.path("results", f"shard-{i:05d}.parquet")

    def errors_shard(self, i: int) -> str:
        return self.path("results", f"shard-{i:05d}.errors.parquet")

    def stats_shard(self, i: int) -> str:
        """Written last for a shard: its presence says the shard's files are complete."""
        return self.path("results", f"shard-{i:05d}.done.json")

    def wave_shard(self, i: int, wave: int) -> str:
        """A shard's rows after the stages of GPU wave ``wave`` (not the last): outputs, lineage, errors."""
        return self.path("waves", str(wave), f"shard-{i:05d}.json")

    def wave_models(self, wave: int) -> str:
        """What the models of wave ``wave`` told about themselves, for the lineage of later waves."""
        return self.path("waves", str(wave), "models.json")

    def write_json(self, path: str, obj: object, indent: int | None = 1) -> None:
        write_bytes_atomic(self.fs, path, json.dumps(obj, indent=indent, default=_jsonable).encode())

    def read_json(self, path: str) -> object:
        return json.loads(self.fs.cat_file(path))


def tmp_name(path: str) -> str:
    d, b = posixpath.split(path)
    return posixpath.join(d, f".tmp-{uuid.uuid4().hex[:8]}-{b}")


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = tmp_name(path)
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
        _fsync(fh)
    fs.mv(tmp, path)


def _fsync(fh) -> None:
    """Make a local file durable before it is renamed into place (no-op on object stores)."""
    inner = getattr(fh, "f", fh)
    try:
        inner.flush()
        os.fsync(inner.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass


def _jsonable(value: object) -> object:
    """What JSON cannot hold as it is: an embedding ``Vector`` (a GPU wave's rows carry them to the
    next wave) as its float list; anything else as its text."""
    if isinstance(value, array.array):
        return value.tolist()
    return str(value)
