"""The engine client: OpenAI-compatible HTTP to vLLM, bounded, spread over replicas, retried.

One ``Dispatcher`` per process runs an asyncio loop in a background thread. Shard tasks (threads
of Prefect's task runner) hand it coroutines, so the bound on requests in flight per endpoint
holds across all shards of the process: the engine's batch stays full, never overfull.

Requests to ``http://`` endpoints go over ``modelyard.wire`` (keep-alive connections, replies
parsed by httptools: about a sixth of aiohttp's CPU per request), the others (``https://``, or
all with ``MODELYARD_HTTP=aiohttp``) through aiohttp, not httpx: with 64 requests in flight
against one vLLM server, httpx's AsyncClient held finished requests back for seconds at a time
(the engine sat idle with 64 requests outstanding, 17-23 req/s), where aiohttp kept the batch
full (32.6 req/s), as in encode/httpx#3215. ``benchmarks/throughput.py --clients`` measures both.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import gc
import json
import os
import threading
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from modelyard import fastjson
from modelyard.errors import EngineError
from modelyard.server import STOPPING
from modelyard.wire import ConnectFailed, Wire, WireError, header_block

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class RequestFailed(Exception):
    """A request that failed for good (after retries); ``attempts`` says how many were made."""

    def __init__(self, message: str, attempts: int = 1, status: int | None = None):
        super().__init__(message)
        self.attempts, self.status = attempts, status


class ModelGone(Exception):
    """Every endpoint of a model is gone for good: the run cannot finish and must fail."""


# Endpoint states set by the server watchdog of this process: "restarting" or "gone: <why>".
ENDPOINT_STATE: dict[str, str] = {}


class _Transient(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# How requests go out: "wire" (modelyard.wire, for http:// endpoints; https:// ones use aiohttp)
# or "aiohttp" for every endpoint. Read when an endpoint is made.
HTTP_ENV = "MODELYARD_HTTP"


def http_client() -> str:
    """``wire`` or ``aiohttp``, as ``MODELYARD_HTTP`` says (default ``wire``)."""
    choice = os.environ.get(HTTP_ENV, "wire").strip().lower()
    if choice not in ("wire", "aiohttp"):
        raise EngineError(f"{HTTP_ENV}={choice!r}: expected wire or aiohttp")
    return choice


@dataclass(eq=False)
class Endpoint:
    url: str  # base URL ending in /v1
    in_flight: int = 0
    served: int = 0
    down_until: float = 0.0
    failures: int = 0
    _targets: dict = field(default_factory=dict, repr=False)
    wire: Wire | None = field(default=None, repr=False)  # None: requests go through aiohttp

    def __post_init__(self) -> None:
        if self.url.startswith("http://") and http_client() == "wire":
            self.wire = Wire(self.url)

    def target(self, path: str) -> yarl.URL:
        """The request URL of ``path``, parsed once (aiohttp would parse a string per request)."""
        u = self._targets.get(path)
        if u is None:
            u = self._targets[path] = yarl.URL(self.url + path)
        return u


@dataclass(eq=False)
class Pool:
    """The replicas of one model; requests go to the one with the fewest in flight.

    Requests beyond ``limit`` per endpoint wait in one FIFO queue and are handed a slot as one
    frees, so waiting costs nothing per waiter however many rows a shard holds (no polling by
    each waiter), and requests leave in the order they arrived. Used from the dispatcher's loop.
    Its request headers (API key read from ``api_key_env`` once) and timeout are built once.
    """

    name: str
    endpoints: list[Endpoint]
    limit: int  # per endpoint
    api_key_env: str | None = None
    timeout: float = 300.0
    retries: int = 3
    _waiters: deque = field(default_factory=deque, repr=False)
    _poller: asyncio.Task | None = field(default=None, repr=False)
    _headers: dict | None = field(default=None, repr=False)
    _header_block: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.client_timeout = aiohttp.ClientTimeout(total=self.timeout)

    def _pick(self) -> Endpoint | None:
        if not ENDPOINT_STATE and len(self.endpoints) == 1:  # the common case, without the lists below
            e = self.endpoints[0]
            return e if e.in_flight < self.limit else None
        if not self.endpoints:  # a model known from the request cache only: nothing to send to
            raise ModelGone(f"model {self.name!r} has no endpoint in this pass")
        now = time.monotonic()
        usable = [e for e in self.endpoints if e.url not in ENDPOINT_STATE]
        if not usable:
            gone = [ENDPOINT_STATE[e.url] for e in self.endpoints if ENDPOINT_STATE[e.url].startswith("gone")]
            if len(gone) == len(self.endpoints):
                raise ModelGone(f"model {self.name!r}: every endpoint is gone; {gone[0][len('gone: '):]}")
            return None  # restarting: wait for it rather than spend retries
        free = [e for e in usable if e.in_flight < self.limit]
        if not free:
            return None
        up = [e for e in free if e.down_until <= now]
        if not up and any(e.down_until <= now for e in usable):
            return None  # a healthy replica is busy: wait for it rather than hit a dead one
        return min(up or free, key=lambda e: (e.in_flight, e.served))

    async def acquire(self) -> Endpoint:
        """A slot on the least busy usable endpoint; waits (FIFO) while there is none."""
        if not self._waiters:
            ep = self._pick()
            if ep is not None:
                ep.in_flight += 1
                return ep
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake()
        if not fut.done():
            self._ensure_poller()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result(), served=False)  # handed a slot just as it was cancelled
            raise

    def release(self, ep: Endpoint, served: bool = True) -> None:
        ep.in_flight -= 1
        if served:
            ep.served += 1
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Hand free slots to the waiters at the head of the queue."""
        waiters = self._waiters
        while waiters:
            if waiters[0].done():  # cancelled while waiting
                waiters.popleft()
                continue
            try:
                ep = self._pick()
            except ModelGone as e:
                while waiters:
                    f = waiters.popleft()
                    if not f.done():
                        f.set_exception(ModelGone(str(e)))
                return
            if ep is None:
                return
            ep.in_flight += 1
            waiters.popleft().set_result(ep)

    def _ensure_poller(self) -> None:
        """Endpoint states change outside the loop (watchdog, back-off expiry): look again now and then."""
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while self._waiters:
            await asyncio.sleep(0.25)
            self._wake()

    def headers(self) -> dict[str, str]:
        """The headers of every request of this pool: JSON, and the API key if one is set."""
        if self._headers is None:
            key = os.environ.get(self.api_key_env) if self.api_key_env else None
            self._headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        return self._headers

    def header_block(self) -> bytes:
        """``headers()`` as the wire sends them, encoded once."""
        if self._header_block is None:
            self._header_block = header_block(self.headers())
        return self._header_block


@dataclass
class Reply:
    body: dict[str, Any]
    latency_ms: float
    attempts: int
    endpoint: str


# What can go wrong on the wire: worth another attempt, on this replica or another.
TransportError = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, WireError)
# Back-off before attempt n+1: 0.5 * 2**(n-1) s plus up to 1 s of jitter, at most 8 s.
WAIT = wait_exponential_jitter(multiplier=0.5, max=8.0)


def _describe(exc: BaseException, url: str) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {url}: {exc.os_error or 'connection refused'}"
    if isinstance(exc, ConnectFailed):
        return f"cannot connect to {url}: {exc.os_error}"
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer from {url} in time ({type(exc).__name__})"
    if isinstance(exc, TransportError):
        return f"connection to {url} broke: {type(exc).__name__}: {exc}"
    return str(exc)


async def post(client: aiohttp.ClientSession, pool: Pool, path: str, body: dict[str, Any]) -> Reply:
    """POST to the least busy replica; retry transient failures with backoff.

    The body is encoded once for every attempt. A request answered at once costs one attempt and
    nothing else: tenacity's retry loop is built only after a first transient failure."""
    data = fastjson.dumps(body)
    try:
        return await _attempt(client, pool, path, data, 1)
    except _Transient as first:
        if pool.retries <= 0:
            raise RequestFailed(f"{first} (after 1 attempts)", 1, first.status) from None
        return await _retry(client, pool, path, data, first)


async def _retry(client: aiohttp.ClientSession, pool: Pool, path: str, data: bytes, first: _Transient) -> Reply:
    """Attempts 2.. after a transient failure of the first; tenacity waits between them."""
    attempts = 1
    pending: _Transient | None = first
    retrying = AsyncRetrying(stop=stop_after_attempt(pool.retries + 1), wait=WAIT,
                             retry=retry_if_exception_type(_Transient), reraise=True)
    try:
        async for attempt in retrying:
            with attempt:
                if pending is not None:  # tenacity's attempt 1 is the one already made: it waits after it
                    e, pending = pending, None
                    raise e
                attempts += 1
                return await _attempt(client, pool, path, data, attempts)
    except _Transient as e:
        raise RequestFailed(f"{e} (after {attempts} attempts)", attempts, e.status) from None
    raise AssertionError("unreachable")


async def _attempt(client: aiohttp.ClientSession, pool: Pool, path: str, data: bytes, attempts: int) -> Reply:
    """One attempt on the least busy replica: a Reply, or _Transient (retry), or RequestFailed."""
    ep = await pool.acquire()
    try:
        t0 = time.perf_counter()
        try:
            if ep.wire is not None:
                status, raw = await ep.wire.post(path, data, pool.header_block(), pool.timeout)
            else:
                async with client.post(ep.target(path), data=data, headers=pool.headers(),
                                       timeout=pool.client_timeout) as r:
                    status, raw = r.status, await r.read()
        except TransportError as e:
            ep.failures += 1
            ep.down_until = time.monotonic() + min(30.0, 0.5 * 2 ** ep.failures)
            raise _Transient(_describe(e, ep.url)) from None
        ep.failures = 0
        latency = (time.perf_counter() - t0) * 1000
    finally:
        pool.release(ep)
    if status in TRANSIENT_STATUS:
        raise _Transient(f"{ep.url}{path} answered {status}: {_text(raw)[:300]}", status)
    if status >= 400:
        raise RequestFailed(f"{ep.url}{path} answered {status}: {_error_text(raw)}", attempts, status)
    try:
        reply = fastjson.loads(raw)
    except ValueError:
        raise RequestFailed(f"{ep.url}{path} answered {status} with a body that is not JSON: "
                            f"{_text(raw)[:300]!r}", attempts, status) from None
    return Reply(reply, latency, attempts, ep.url)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _error_text(raw: bytes) -> str:
    try:
        err = json.loads(raw)
        if isinstance(err, dict):
            e = err.get("error", err)
            return str(e.get("message", e) if isinstance(e, dict) else e)[:500]
    except ValueError:
        pass
    return _text(raw)[:500]


# The row loop allocates a few containers per row and keeps every row of its shards alive while
# they run; with CPython's default thresholds (700, 10, 10) the cyclic collector took 13-30 % of
# the orchestrator's CPU per row (benchmarks/README.md). Raised once per process (never lowered),
# and what is alive when the dispatcher starts (Prefect, pydantic, the imports) is frozen out of
# the collections: it is never garbage, and walking it again at every full collection costs.
GC_THRESHOLD = (100_000, 50, 100)


def _tune_gc() -> None:
    gc.freeze()
    if gc.get_threshold()[0] < GC_THRESHOLD[0]:
        gc.set_threshold(*GC_THRESHOLD)


STOP_POLL_S = 0.2
# The dispatcher's event loop: uvloop (libuv, compiled) where it is installed, else asyncio's own.
# Every request and every row passes through this one loop; against an endpoint that answers at
# once, asyncio's pure-Python loop machinery was about a fifth of the orchestrator's CPU per row
# (benchmarks/README.md). MODELYARD_EVENT_LOOP=asyncio chooses asyncio's loop.
EVENT_LOOP_ENV = "MODELYARD_EVENT_LOOP"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop a dispatcher runs: uvloop unless ``MODELYARD_EVENT_LOOP=asyncio`` or it is missing."""
    choice = os.environ.get(EVENT_LOOP_ENV, "uvloop").strip().lower()
    if choice not in ("uvloop", "asyncio"):
        raise EngineError(f"{EVENT_LOOP_ENV}={choice!r}: expected uvloop or asyncio")
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:  # not on this platform (Windows): asyncio's loop does the same, slower
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class Dispatcher:
    """An event loop in a daemon thread shared by every shard of this process."""

    _lock = threading.Lock()
    _instance: Dispatcher | None = None

    def __init__(self) -> None:
        _tune_gc()
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="modelyard-dispatcher", daemon=True)
        self.thread.start()
        self.pools: dict[tuple, Pool] = {}
        self._client: aiohttp.ClientSession | None = None

    @classmethod
    def get(cls) -> Dispatcher:
        with cls._lock:
            if cls._instance is None:
                cls._instance = Dispatcher()
            return cls._instance

    @property
    def client(self) -> aiohttp.ClientSession:
        """The session every request of this process shares; the pools, not the connector, bound
        what is in flight. Used (and created on first use) from the dispatcher loop's coroutines."""
        if self._client is None:
            assert threading.current_thread() is self.thread, "Dispatcher.client is for the dispatcher loop"
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=300.0, sock_connect=10.0),
                cookie_jar=aiohttp.DummyCookieJar(),  # vLLM sets no cookies: skip the jar's work per request
            )
            atexit.register(self.close)
        return self._client

    def close(self) -> None:
        """Close the shared session (at exit), so that no connection is left for the GC to warn about."""
        session, self._client = self._client, None
        if session is not None and not session.closed and self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(session.close(), self.loop).result(timeout=5)

    def pool(self, name: str, urls: list[str], limit: int, api_key_env: str | None, timeout: float, retries: int) -> Pool:
        key = (name, tuple(urls), limit, api_key_env, timeout, retries)
        with self._lock:
            if key not in self.pools:
                self.pools[key] = Pool(name, [Endpoint(u.rstrip("/")) for u in urls], limit, api_key_env, timeout, retries)
            return self.pools[key]

    def run(self, coro: Coroutine) -> Any:
        """Run a coroutine on the dispatcher loop and wait for its result.

        Once the run is stopping (``STOPPING``: a signal, a cancel) the coroutine is cancelled within
        ``STOP_POLL_S`` and this raises: a shard in flight ends without its done record, also on a
        server the run did not start (whose requests the stop does not fail).

        When it returns (or raises), every reply the coroutine put in a request cache of this
        process is written (``RequestCache.flush``): a shard's row loop run here has its cache
        entries on disk before the shard writes its done record, and a stopped shard's answers so
        far are kept for its re-run."""
        from modelyard.cache import flush_all

        unwound = threading.Event()

        async def guarded():
            try:
                return await coro
            finally:
                unwound.set()

        fut = asyncio.run_coroutine_threadsafe(guarded(), self.loop)
        try:
            while True:
                try:
                    return fut.result(timeout=STOP_POLL_S)
                except concurrent.futures.TimeoutError:
                    if STOPPING.is_set():
                        fut.cancel()
                        unwound.wait(5)  # its requests in flight closed, its cache entries put
                        raise EngineError(f"shard stopped: {STOPPING.reason}") from None
        finally:
            flush_all()
