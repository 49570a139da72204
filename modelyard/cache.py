"""A request cache shared across runs, backfills and configs: SQLite, one row per reply.

The key is what determines a model's answer: model id and revision, the endpoint path (chat,
completion, embedding), and the request body without the served name (rendered messages or
input, sampling params with the seed, structured-output constraint). Changing one stage's
prompt changes only that stage's keys, and those of later stages whose rendered inputs change.

SQLite in WAL mode with a busy timeout is safe for several writers on one machine (threads,
processes, concurrent backfill runs). What is stored is decided by ``modelyard.asking``: every
reply of a deterministic request, valid or not, and a refusal (HTTP 400).

A reply is stored as compact JSON, zlib-compressed when it is over 1 KB (small replies cost
more to compress than to store), and an embedding reply as JSON without its vectors followed by
the vectors' bytes: float32 for vectors that came as base64 (``Vector``, the bytes as they came),
float64 for float lists (exact for any JSON number); a few microseconds instead of the hundreds
that formatting and parsing 384 floats as text take. ``get`` reads all of them, and the
zlib-compressed JSON that earlier versions wrote.

Writes are buffered: ``put`` keeps the entry in memory (where ``get`` of this process finds it at
once) and hands the buffer to the cache's writer thread, which writes it in one transaction, when
it holds ``FLUSH_ROWS`` entries or its oldest is ``FLUSH_SECONDS`` old (checked at each put): one
transaction per few hundred replies instead of one per reply, and none of them in the caller's
thread (the dispatcher's event loop, which sends every row; SQLite works without the GIL, so on
the machine's other core). A buffer handed off stays readable until it is on disk. ``flush()``
hands off what is buffered and waits until everything is written (and raises what a write
raised, keeping its entries buffered); it runs when a row loop of the dispatcher returns
(``client.Dispatcher.run``), so a shard's entries are on disk before its done record, and at exit.
A process killed before a flush loses only replies that are asked again on resume.
"""

from __future__ import annotations

import array
import atexit
import hashlib
import json
import os
import queue
import sqlite3
import sys
import threading
import time
import zlib
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from modelyard import fastjson
from modelyard.vectors import Vector

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


# The key's JSON: sorted keys, compact, UTF-8 as it is. json.JSONEncoder.encode builds its C
# encoder at every call (a third of a key's cost); this one is built once and gives the same text
# (without the circular-reference check, which a request body parsed from YAML and rows never needs).
try:
    from json.encoder import c_make_encoder, encode_basestring

    _key_chunks = c_make_encoder(None, None, encode_basestring, None, ":", ",", True, False, True)

    def _KEY_JSON(obj: Any) -> str:
        return "".join(_key_chunks(obj, 0))
except ImportError:  # a Python without the C accelerator
    _KEY_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def request_key(model_id: str, revision: str, path: str, body: dict[str, Any]) -> str:
    blob = _KEY_JSON([model_id, revision, path, {k: v for k, v in body.items() if k != "model"}])
    # surrogatepass: a lone surrogate (JSON input can hold one) gets a key instead of crashing the shard
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


_MISSING = object()  # no value of a body is this object


class StageKeys:
    """``request_key`` of one stage's requests to one model, whose bodies differ only in the
    rendered prompt (``field``): the JSON and the hash of the rest are done once, and a key costs
    the JSON of the prompt and the hash of it and of a fixed tail. A body whose other values are
    not the very objects of ``template`` (another stage's, extra fields) is keyed the plain way,
    so the key is always ``request_key``'s."""

    _PROBE = "\x00modelyard-key\x00"

    def __init__(self, model_id: str, revision: str, path: str, template: dict[str, Any], field: str):
        self.model_id, self.revision, self.path, self.field = model_id, revision, path, field
        self._fixed = [(k, v) for k, v in template.items() if k not in ("model", field)]
        probe = {**{k: v for k, v in template.items() if k != "model"}, field: self._PROBE}
        parts = _KEY_JSON([model_id, revision, path, probe]).split(_KEY_JSON(self._PROBE))
        self._head = self._tail = None
        if len(parts) == 2:  # else the probe's text is in the body itself: every key the plain way
            self._head = hashlib.sha256(parts[0].encode("utf-8", "surrogatepass"))
            self._tail = parts[1].encode("utf-8", "surrogatepass")

    def __call__(self, path: str, body: dict[str, Any]) -> str:
        if self._head is None or path != self.path or not self._same_rest(body):
            return request_key(self.model_id, self.revision, path, body)
        h = self._head.copy()
        h.update(_KEY_JSON(body[self.field]).encode("utf-8", "surrogatepass"))
        h.update(self._tail)
        return h.hexdigest()

    def _same_rest(self, body: dict[str, Any]) -> bool:
        if self.field not in body or len(body) - ("model" in body) != len(self._fixed) + 1:
            return False
        return all(body.get(k, _MISSING) is v for k, v in self._fixed)


def deterministic(path: str, body: dict[str, Any]) -> bool:
    """Whether the same request gives the same answer: greedy, or seeded sampling, or an embedding."""
    if path == "/embeddings":
        return True
    if body.get("seed") is not None:
        return True
    t = body.get("temperature")
    return t is not None and float(t) == 0.0


FLUSH_ROWS = 512
FLUSH_SECONDS = 1.0
COMPRESS_OVER = 1024  # bytes of JSON
VECTORS = b"\x00V1"  # blob tag of an embedding reply with float64 vectors (starts neither JSON nor zlib)
VECTORS32 = b"\x00V2"  # ... with float32 vectors (replies that came as base64)


def encode_reply(reply: dict[str, Any]) -> bytes:
    """The stored form of a reply (see the module doc)."""
    packed = _pack_vectors(reply)
    if packed is not None:
        return packed
    data = fastjson.dumps(reply)
    return data if len(data) <= COMPRESS_OVER else zlib.compress(data, 1)


def decode_reply(blob: bytes) -> dict[str, Any]:
    if blob[:1] == b"{":
        return fastjson.loads(blob)
    if blob[:3] in (VECTORS, VECTORS32):
        return _unpack_vectors(blob)
    return fastjson.loads(zlib.decompress(blob))


def _pack_vectors(reply: dict[str, Any]) -> bytes | None:
    """An embedding reply (``data`` items with float-list or ``Vector`` ``embedding``) as its JSON
    head followed by the vectors' bytes: float32 when every vector is a ``Vector`` (base64 on the
    wire: the values as they came), else float64 (exact for any JSON number)."""
    data = reply.get("data")
    if not isinstance(data, list) or not data:
        return None
    vecs = [d.get("embedding") if isinstance(d, dict) else None for d in data]
    if all(type(v) is Vector for v in vecs):
        tag, blobs = VECTORS32, [v.le_bytes() for v in vecs]
    else:
        blobs = []
        for v in vecs:
            if not isinstance(v, list):
                return None
            try:
                a = array.array("d", v)  # numbers (an integer comes back as the equal float)
            except TypeError:
                return None
            if sys.byteorder == "big":
                a.byteswap()
            blobs.append(a.tobytes())
        tag = VECTORS
    head = fastjson.dumps({**reply, "data": [{**d, "embedding": len(v)} for d, v in zip(data, vecs)]})
    return b"".join([tag, len(head).to_bytes(4, "little"), head, *blobs])


def _unpack_vectors(blob: bytes) -> dict[str, Any]:
    n = int.from_bytes(blob[3:7], "little")
    reply = fastjson.loads(blob[7:7 + n])
    pos = 7 + n
    if blob[:3] == VECTORS32:
        for d in reply["data"]:
            end = pos + 4 * d["embedding"]
            d["embedding"] = Vector(blob[pos:end])
            pos = end
        return reply
    for d in reply["data"]:
        a = array.array("d")
        a.frombytes(blob[pos:pos + 8 * d["embedding"]])
        if sys.byteorder == "big":
            a.byteswap()
        pos += 8 * d["embedding"]
        d["embedding"] = a.tolist()
    return reply


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._pending: dict[str, tuple] = {}  # key -> the row to insert, in put order
        self._oldest = 0.0  # when the oldest pending entry was put
        self._writing: tuple[dict[str, tuple], ...] = ()  # buffers handed to the writer, oldest first
        self._written: list[Future] = []  # their writes, until flush() has seen them end
        self._queue: queue.SimpleQueue | None = None  # the writer thread's work (made at the first hand-off)
        self._writer_pid = 0
        self._lock = threading.Lock()
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

    def _buffered(self, key: str) -> tuple | None:
        """The entry of ``key`` not yet on disk for sure: buffered, or handed to the writer (newest first)."""
        row = self._pending.get(key)
        if row is None:
            for buf in reversed(self._writing):  # a snapshot: a buffer leaves it only once written
                row = buf.get(key)
                if row is not None:
                    break
        return row

    def get(self, key: str, *, accept_truncated: bool = True) -> dict[str, Any] | None:
        row = self._buffered(key)
        if row is not None:
            blob, finish_reason = row[5], row[4]
        else:
            found = self._conn().execute("select reply, finish_reason from replies where key = ?", (key,)).fetchone()
            if found is None:
                return None
            blob, finish_reason = found
        if not accept_truncated and finish_reason == "length":
            return None
        return decode_reply(blob)

    def get_many(self, keys: list[str], *, accept_truncated: bool = True) -> dict[str, dict[str, Any]]:
        """The cached replies of ``keys`` (those found), one query per 500 keys."""
        found: dict[str, tuple] = {}
        todo = []
        for k in dict.fromkeys(keys):
            row = self._buffered(k)
            if row is not None:
                found[k] = (row[5], row[4])
            else:
                todo.append(k)
        c = self._conn()
        for i in range(0, len(todo), 500):
            part = todo[i:i + 500]
            q = f"select key, reply, finish_reason from replies where key in ({','.join('?' * len(part))})"
            for k, blob, fr in c.execute(q, part):
                found[k] = (blob, fr)
        return {k: decode_reply(blob) for k, (blob, fr) in found.items()
                if accept_truncated or fr != "length"}

    def put(self, key: str, model: str, revision: str, path: str, reply: dict[str, Any], finish_reason: str | None) -> None:
        """Remember a reply: at once for ``get`` in this process, on disk at the next flush."""
        now = time.time()
        data = encode_reply(reply)
        with self._lock:
            if not self._pending:
                self._oldest = now
            self._pending[key] = (key, model, revision, path, finish_reason, data, now, now)
            if len(self._pending) >= FLUSH_ROWS or now - self._oldest >= FLUSH_SECONDS:
                self._hand_off()

    def _hand_off(self) -> None:
        """Give the buffer to the writer thread (under ``self._lock``)."""
        if not self._pending:
            return
        buf = self._pending
        self._writing = (*self._writing, buf)  # first: a get in another thread finds it in one or the other
        self._pending = {}
        if self._queue is None or self._writer_pid != os.getpid():  # none yet, or a forked child's
            self._queue, self._writer_pid = queue.SimpleQueue(), os.getpid()
            threading.Thread(target=self._drain, args=(self._queue,), name="modelyard-cache-writer",
                             daemon=True).start()
        fut: Future = Future()
        self._written.append(fut)
        self._queue.put((buf, fut))

    def _drain(self, work: queue.SimpleQueue) -> None:
        while True:
            buf, fut = work.get()
            try:
                self._write(buf)
            except BaseException as e:  # noqa: BLE001 - flush() raises it in the caller's thread
                with self._lock:  # nothing lost: the entries are buffered again (newer ones win)
                    self._pending = {**buf, **self._pending}
                    self._writing = tuple(b for b in self._writing if b is not buf)
                fut.set_exception(e)
            else:
                with self._lock:
                    self._writing = tuple(b for b in self._writing if b is not buf)
                fut.set_result(None)

    def _write(self, buf: dict[str, tuple]) -> None:
        c = self._conn()
        c.execute("begin immediate")
        try:
            c.executemany("insert or replace into replies values (?, ?, ?, ?, ?, ?, ?, ?)", list(buf.values()))
        except BaseException:
            c.execute("rollback")
            raise
        c.execute("commit")

    def flush(self) -> None:
        """Write the buffered entries and wait until every entry put so far is on disk."""
        with self._lock:
            self._hand_off()
            waiting, self._written = self._written, []
        failed = None
        for fut in waiting:
            e = fut.exception()
            failed = failed or e
        if failed is not None:
            raise failed

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
        self.flush()
        rows = self._conn().execute(
            "select model, revision, count(*), sum(length(reply)), min(created), max(used) from replies "
            "group by model, revision order by model").fetchall()
        return [{"model": m, "revision": r, "entries": n, "bytes": b or 0, "oldest": o, "last_used": u}
                for m, r, n, b, o, u in rows]

    def prune(self, *, older_than_s: float | None = None, model: str | None = None, max_bytes: int | None = None) -> int:
        """Delete entries unused for ``older_than_s``, of ``model``, or the least recently used
        beyond ``max_bytes``; returns how many were deleted."""
        self.flush()
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


def flush_all() -> None:
    """Write the buffered entries of every cache this process opened."""
    with _lock:
        caches = list(_caches.values())
    for c in caches:
        c.flush()


atexit.register(flush_all)
