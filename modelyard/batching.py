"""Embedding requests of many rows, sent as requests of many inputs (SPEC: "Embedding batches").

The row loop asks for one row's embedding as it would with ``client.post``::

    reply = await embed(client, pool, "/embeddings", {"model": served, "input": text}, batch_size=32)

and gets a ``Reply`` shaped exactly like the reply of a one-input ``/v1/embeddings`` request: its
own vector in ``data[0]``, its own ``usage``. Behind it, one ``Batcher`` per pool and batch size
gathers the inputs of many rows into requests of ``batch_size`` inputs, sent through the same
pool and ``post`` (so the bound on requests in flight, retries and replicas are those of every
request). A batch leaves when it is full, or ``linger`` seconds (default 5 ms) after its first
input came: rows that start together arrive within one turn of the event loop, and a short
linger also catches rows that finish an earlier stage a moment apart.

The batches ask for ``encoding_format: base64`` (float32, as the OpenAI API defines it) and
hand each row its vector as a ``Vector`` of those bytes (``modelyard.vectors``): the same values
as a ``float`` reply, without formatting and parsing every number as text (hundreds of
microseconds per 384-float vector), nor a Python float per value.

Per row:
- **usage**: vLLM reports one ``prompt_tokens`` for a whole request, not per input. A row alone
  in its request gets the exact count; in a batch, the total is split in proportion to the
  inputs' lengths in characters (largest remainders, so the rows add up to the total).
- **errors**: a batch the server refuses (HTTP 4xx: an input over the context, say) is split in
  halves, and those again, so that only the bad input's row gets the error (``RequestFailed``,
  as from ``post``). Transient failures are retried by ``post``; one that persists fails every
  row of its batch, without splitting (the server, not an input, is the problem).
- **attempts** and **latency** are those of the requests the row was part of (summed attempts).
- **truncate**: a row body holding ``truncate_prompt_tokens`` (a stage with ``truncate: true``)
  is batched without it; a row the server refuses alone is sent once more alone with it, and if
  that succeeds the row was cut: its reply's ``data[0]`` says ``"finish_reason": "length"``
  (``finish_reason(reply)`` reads it; rows that fit read ``stop``). So a row is marked cut
  exactly when its text did not fit, with no tokenizer on this side.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from modelyard.client import Pool, Reply, RequestFailed, post
from modelyard.vectors import Vector

DEFAULT_BATCH_SIZE = 32
# Seconds a batch that is not full waits for more rows. Measured (benchmarks/README.md): with
# the rows of one stage arriving together batches are full at once, whatever the linger; behind
# a chat stage answering 1,000-2,000 rows/s, 0-2 ms gave 12-15 inputs per request, 5 ms 18-22,
# 20 ms 31. 5 ms keeps what a shard's last batch waits negligible.
LINGER = 0.005
TRUNCATE = "truncate_prompt_tokens"


def finish_reason(reply: dict[str, Any]) -> str:
    """``length`` for a row's embedding reply whose input was cut to the model's context, else ``stop``."""
    return reply["data"][0].get("finish_reason") or "stop"


@dataclass(eq=False)
class _Row:
    text: Any
    body: dict[str, Any]  # the row's own request body (with truncate_prompt_tokens if it asked for it)
    future: asyncio.Future
    attempts: int = 0
    latency_ms: float = 0.0


@dataclass(eq=False)
class Batcher:
    """Gathers the rows of one pool (and batch size) into batched requests; see the module doc."""

    pool: Pool
    batch_size: int = DEFAULT_BATCH_SIZE
    linger: float = LINGER
    _open: dict[Any, list[_Row]] = field(default_factory=dict)
    _timers: dict[Any, asyncio.TimerHandle] = field(default_factory=dict)
    _sending: set = field(default_factory=set)

    def submit(self, client: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> asyncio.Future:
        """Queue one row's single-input request; the future resolves to its Reply (or RequestFailed)."""
        loop = asyncio.get_running_loop()
        if isinstance(body.get("input"), list):
            raise ValueError("embed() takes one input per row; send lists with client.post")
        opts = {k: v for k, v in body.items() if k not in ("input", TRUNCATE)}
        group = _group(path, opts)
        row = _Row(body["input"], body, loop.create_future())
        rows = self._open.setdefault(group, [])
        rows.append(row)
        if len(rows) >= self.batch_size:
            self._flush(client, path, opts, group)
        elif group not in self._timers:
            self._timers[group] = loop.call_later(self.linger, self._flush, client, path, opts, group)
        return row.future

    def _flush(self, client: aiohttp.ClientSession, path: str, opts: dict, group: Any) -> None:
        timer = self._timers.pop(group, None)
        if timer is not None:
            timer.cancel()
        rows = self._open.pop(group, [])
        if rows:
            task = asyncio.get_running_loop().create_task(self._send(client, path, opts, rows))
            self._sending.add(task)  # keep a reference until it is done
            task.add_done_callback(self._sending.discard)

    async def _send(self, client: aiohttp.ClientSession, path: str, opts: dict, rows: list[_Row]) -> None:
        try:
            await self._answer(client, path, opts, rows)
        except asyncio.CancelledError:
            for r in rows:
                r.future.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - whatever is left (ModelGone) goes to every row
            for r in rows:
                if not r.future.done():
                    r.future.set_exception(e)

    async def _answer(self, client: aiohttp.ClientSession, path: str, opts: dict, rows: list[_Row]) -> None:
        """Send ``rows`` as one request; on a refusal, split them (or, alone, try truncation)."""
        body = {**opts, "input": rows[0].text if len(rows) == 1 else [r.text for r in rows]}
        body.setdefault("encoding_format", "base64")
        try:
            reply = await post(client, self.pool, path, body)
        except RequestFailed as e:
            for r in rows:
                r.attempts += e.attempts
            refused = e.status is not None and 400 <= e.status < 500
            if refused and len(rows) > 1:
                half = len(rows) // 2
                await asyncio.gather(self._answer(client, path, opts, rows[:half]),
                                     self._answer(client, path, opts, rows[half:]))
                return
            if refused and TRUNCATE in rows[0].body:
                await self._truncated(client, path, opts, rows[0], e)
                return
            for r in rows:
                _fail(r, e)
            return
        for r in rows:
            r.attempts += reply.attempts
            r.latency_ms += reply.latency_ms
        try:
            vectors = _vectors(reply.body, len(rows))
        except ValueError as e:
            for r in rows:
                _fail(r, RequestFailed(f"{reply.endpoint}{path}: {e}", r.attempts, None))
            return
        tokens = _split_tokens(reply.body.get("usage") or {}, [r.text for r in rows])
        for r, body in zip(rows, _row_replies(reply.body, vectors, tokens)):
            if not r.future.done():
                r.future.set_result(Reply(body, r.latency_ms, r.attempts, reply.endpoint))

    async def _truncated(self, client: aiohttp.ClientSession, path: str, opts: dict, row: _Row,
                         refusal: RequestFailed) -> None:
        """A row refused alone, which asked for truncation: once more, cut to the model's context."""
        try:
            reply = await post(client, self.pool, path, {"encoding_format": "base64", **opts, "input": row.text,
                                                         TRUNCATE: row.body[TRUNCATE]})
        except RequestFailed as e:
            row.attempts += e.attempts
            _fail(row, RequestFailed(str(e), row.attempts, e.status))
            return
        row.attempts += reply.attempts
        row.latency_ms += reply.latency_ms
        try:
            (item,) = _vectors(reply.body, 1)
        except ValueError as e:
            _fail(row, RequestFailed(f"{reply.endpoint}{path}: {e}", row.attempts, None))
            return
        usage = reply.body.get("usage") or {}
        (body,) = _row_replies(reply.body, [{**item, "finish_reason": "length"}], [usage.get("prompt_tokens")])
        if not row.future.done():
            row.future.set_result(Reply(body, row.latency_ms, row.attempts, reply.endpoint))


def _group(path: str, opts: dict[str, Any]) -> Any:
    """Rows whose requests differ only in their input share batches: the key of the rest."""
    try:
        key = (path, *sorted(opts.items()))
        hash(key)
        return key
    except TypeError:  # a value that is a list or a mapping
        return json.dumps([path, opts], sort_keys=True)


def _fail(row: _Row, e: RequestFailed) -> None:
    if not row.future.done():
        row.future.set_exception(RequestFailed(str(e), row.attempts, e.status))


def _vectors(body: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The reply's ``data`` items in input order; ValueError unless there is one per input."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != n:
        got = len(data) if isinstance(data, list) else "no"
        raise ValueError(f"answered {got} embeddings for {n} inputs")
    if n > 1 and any(d.get("index") != i for i, d in enumerate(data)):
        data = sorted(data, key=lambda d: d.get("index", 0))
        if [d.get("index") for d in data] != list(range(n)):
            raise ValueError(f"embedding indices {[d.get('index') for d in data][:8]}... are not 0..{n - 1}")
    return [{**d, "index": 0, "embedding": _floats(d.get("embedding"))} for d in data]


def _floats(vec: Any) -> list[float] | Vector:
    """A vector as the reply holds it: a float list as it is, base64 (little-endian float32) as a
    ``Vector`` of those bytes, without making a Python float of every value."""
    if isinstance(vec, list):
        return vec
    if not isinstance(vec, str):
        raise ValueError(f"an embedding is {type(vec).__name__}, not a list or base64")
    return Vector.from_base64(vec)


def _split_tokens(usage: dict[str, Any], texts: list[Any]) -> list[int | None]:
    """The request's prompt tokens per input: exact for one input, else in proportion to length."""
    total = usage.get("prompt_tokens")
    if total is None or len(texts) == 1:
        return [total] * len(texts)
    sizes = [max(1, len(str(t))) for t in texts]
    whole = sum(sizes)
    shares = [total * s / whole for s in sizes]
    out = [int(x) for x in shares]
    for i in sorted(range(len(texts)), key=lambda i: out[i] - shares[i])[: total - sum(out)]:
        out[i] += 1
    return out


def _row_replies(body: dict[str, Any], items: list[dict[str, Any]], tokens: list[int | None]) -> list[dict]:
    """One-input replies: the request's fields, one data item each (index 0), each row's usage."""
    head = {k: v for k, v in body.items() if k not in ("data", "usage")}
    usage = body.get("usage") or {}
    extra = usage.get("completion_tokens") or 0
    out = []
    for item, n in zip(items, tokens):
        u = dict(usage)
        if n is not None:
            u["prompt_tokens"], u["total_tokens"] = n, n + extra
        out.append({**head, "data": [item], "usage": u})
    return out


_batchers: weakref.WeakKeyDictionary[Pool, dict[tuple, Batcher]] = weakref.WeakKeyDictionary()


def batcher(pool: Pool, batch_size: int = DEFAULT_BATCH_SIZE, linger: float = LINGER) -> Batcher:
    """The batcher of a pool for a batch size (one per pair, made on first use)."""
    per_pool = _batchers.setdefault(pool, {})
    b = per_pool.get((batch_size, linger))
    if b is None:
        b = per_pool[(batch_size, linger)] = Batcher(pool, batch_size, linger)
    return b


async def embed(client: aiohttp.ClientSession, pool: Pool, path: str, body: dict[str, Any], *,
                batch_size: int = DEFAULT_BATCH_SIZE, linger: float = LINGER) -> Reply:
    """One row's embedding, batched with other rows' (see the module doc); awaited like ``post``."""
    return await batcher(pool, batch_size, linger).submit(client, path, body)
