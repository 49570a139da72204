"""A request cache shared across runs, backfills and configs: SQLite, one row per reply.

The key is what determines a model's answer: model id and revision, the endpoint path (chat,
completion, embedding), and the request body without the served name (rendered messages or
input, sampling params with the seed, structured-output constraint). Changing one stage's
prompt changes only that stage's keys, and those of later stages whose rendered inputs change.

SQLite in WAL mode with a busy timeout is safe for several writers on one machine (threads,
processes, concurrent backfill runs). Only valid replies are stored: an error or an invalid
output is asked again next time.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Any

SCHEMA = """
create table if not exists replies (
  key text primary key,
  model text not null,
  revision text not null,
  path text not null,
  finish_reason text,
  reply blob not null,
  created real not null,
  used real not null
);
create index if not exists replies_used on replies(used);
create table if not exists runtimes (
  key text primary key,
  runtime text not null,
  created real not null
);
"""


def runtime_key(model_id: str, revision: str, engine: str) -> str:
    """What a managed model told about itself depends on the model, its revision and the engine."""
    return json.dumps([model_id, revision, engine])


def request_key(model_id: str, revision: str, path: str, body: dict[str, Any]) -> str:
    blob = json.dumps([model_id, revision, path, {k: v for k, v in body.items() if k != "model"}],
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def deterministic(path: str, body: dict[str, Any]) -> bool:
    """Whether the same request gives the same answer: greedy, or seeded sampling, or an embedding."""
    if path == "/embeddings":
        return True
    if body.get("seed") is not None:
        return True
    t = body.get("temperature")
    return t is not None and float(t) == 0.0


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            c.execute("pragma journal_mode=wal")
            c.execute("pragma synchronous=normal")
            self._local.conn = c
        return c

    def get(self, key: str, *, accept_truncated: bool = True) -> dict[str, Any] | None:
        row = self._conn().execute("select reply, finish_reason from replies where key = ?", (key,)).fetchone()
        if row is None or (not accept_truncated and row[1] == "length"):
            return None
        return json.loads(zlib.decompress(row[0]))

    def put(self, key: str, model: str, revision: str, path: str, reply: dict[str, Any], finish_reason: str | None) -> None:
        now = time.time()
        data = zlib.compress(json.dumps(reply, separators=(",", ":")).encode(), 3)
        self._conn().execute(
            "insert or replace into replies values (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, model, revision, path, finish_reason, data, now, now))

    def put_runtime(self, key: str, runtime: dict[str, Any]) -> None:
        """Remember what a managed model's server said (served name, engine version, dimension), so
        that a run the cache answers entirely need not start the server to learn it again."""
        self._conn().execute("insert or replace into runtimes values (?, ?, ?)", (key, json.dumps(runtime), time.time()))

    def get_runtime(self, key: str) -> dict[str, Any] | None:
        row = self._conn().execute("select runtime from runtimes where key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def touch(self, keys: list[str]) -> None:
        """Mark entries as used now (prune keeps recently used ones)."""
        if keys:
            now = time.time()
            self._conn().executemany("update replies set used = ? where key = ?", [(now, k) for k in keys])

    def report(self) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "select model, revision, count(*), sum(length(reply)), min(created), max(used) from replies "
            "group by model, revision order by model").fetchall()
        return [{"model": m, "revision": r, "entries": n, "bytes": b or 0, "oldest": o, "last_used": u}
                for m, r, n, b, o, u in rows]

    def prune(self, *, older_than_s: float | None = None, model: str | None = None, max_bytes: int | None = None) -> int:
        """Delete entries unused for ``older_than_s``, of ``model``, or the least recently used
        beyond ``max_bytes``; returns how many were deleted."""
        c = self._conn()
        before = c.execute("select count(*) from replies").fetchone()[0]
        if older_than_s is not None:
            c.execute("delete from replies where used < ?", (time.time() - older_than_s,))
        if model is not None:
            c.execute("delete from replies where model = ?", (model,))
        if max_bytes is not None:
            total = 0
            doomed = []
            for key, size in c.execute("select key, length(reply) from replies order by used desc"):
                total += size
                if total > max_bytes:
                    doomed.append((key,))
            c.executemany("delete from replies where key = ?", doomed)
        after = c.execute("select count(*) from replies").fetchone()[0]
        c.execute("vacuum")
        return before - after


_caches: dict[str, RequestCache] = {}
_lock = threading.Lock()


def open_cache(path: str) -> RequestCache:
    """One cache object per file per process."""
    with _lock:
        if path not in _caches:
            _caches[path] = RequestCache(path)
        return _caches[path]
