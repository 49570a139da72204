"""HTTP/1.1 POSTs to an engine endpoint: keep-alive connections on the event loop, replies parsed by httptools.

The request path of a run is one JSON POST after another to a few ``http://`` endpoints on a
loopback or a local network, and against an endpoint that answers at once aiohttp's client cost
about 66 us of CPU per request here, of which parsing the reply is a small part: the rest is its
general machinery (a request and a response object, a connector, tracing hooks, a timer, a
payload writer). A connection that writes one prebuilt head with the body and hands the reply
to httptools (the compiled llhttp parser uvicorn uses) costs about 10 us for the same request
(``benchmarks/README.md``). That is what a GPU needs from the orchestrator: fewer CPU seconds
per row.

What this does: ``POST`` of a body already encoded; replies with ``Content-Length``, chunked, or
ended by the server's close; keep-alive, a connection reused while it was idle under ``IDLE_S``
(below uvicorn's 5 s, vLLM's default keep-alive); a reused connection that closes before any
byte of its reply is retried at once on a new one (the server closed it as the request went
out); a total timeout per request; a cancelled request closes its connection. What it does not
do: TLS, proxies, redirects, compression (no ``Accept-Encoding`` is sent, so none comes back).
``modelyard.client`` sends through aiohttp where this does not apply (``https://``), or when
``MODELYARD_HTTP=aiohttp``.

Failures raise ``WireError`` (``ConnectFailed`` when no connection could be made) or
``TimeoutError``; ``modelyard.client`` retries them like aiohttp's.
"""

from __future__ import annotations

import asyncio
from collections import deque

import httptools
import yarl

IDLE_S = 2.0  # a connection idle longer than this is closed rather than reused
USER_AGENT = b"modelyard"


class WireError(ConnectionError):
    """The connection failed before a whole reply came (reset, closed, a reply that is not HTTP)."""


class ConnectFailed(WireError):
    """No connection could be made; ``os_error`` says why."""

    def __init__(self, message: str, os_error: OSError):
        super().__init__(message)
        self.os_error = os_error


class _Closed(WireError):
    def __init__(self, message: str, got_bytes: bool):
        super().__init__(message)
        self.got_bytes = got_bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its reply parsed as the bytes come."""

    def __init__(self, wire: Wire):
        self.wire = wire
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.reply: asyncio.Future | None = None
        self.chunks: list[bytes] = []
        self.got_bytes = False  # of the current reply
        self.framed = False  # the reply says its length (Content-Length or chunked)
        self.headed = False  # the reply's headers are complete
        self.keep = True
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(WireError(f"the reply is not HTTP/1.1: {e}"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles the reply

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.wire._forget(self)
        fut, self.reply = self.reply, None
        if fut is None or fut.done():
            return
        if self.headed and not self.framed:  # a reply whose end is the close
            fut.set_result((self.parser.get_status_code(), b"".join(self.chunks)))
            return
        why = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection"
        fut.set_exception(_Closed(why, self.got_bytes))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headed = True
        self.keep = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        fut, self.reply = self.reply, None
        body, self.chunks = b"".join(self.chunks), []
        if fut is None or fut.done():  # a reply nobody asked for: this connection is not to be trusted
            self.close()
            return
        fut.set_result((self.parser.get_status_code(), body))
        if not self.keep:
            self.close()

    # -- used by Wire
    def send(self, request: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        self.reply = fut = loop.create_future()
        self.chunks, self.got_bytes, self.framed, self.headed, self.keep = [], False, False, False, True
        self.transport.write(request)
        return fut

    def _fail(self, e: Exception) -> None:
        fut, self.reply = self.reply, None
        if fut is not None and not fut.done():
            fut.set_exception(e)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.wire._forget(self)
            if self.transport is not None:
                self.transport.abort()


def _expire(fut: asyncio.Future, conn: _Connection, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(f"no whole reply within {timeout:g} s"))
    conn.close()


class Wire:
    """The connections of one endpoint (``http://host:port/...``), used from one event loop at a time."""

    def __init__(self, base_url: str):
        u = yarl.URL(base_url)
        if u.scheme != "http" or not u.host:
            raise ValueError(f"{base_url}: the wire speaks plain http:// only")
        self.url = base_url
        self.host, self.port = u.host, u.port or 80
        self.prefix = u.raw_path.rstrip("/")
        self._host_header = f"{u.host}:{self.port}" if ":" not in u.host else f"[{u.host}]:{self.port}"
        self._idle: deque[_Connection] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heads: dict[tuple[str, bytes], bytes] = {}

    def head(self, path: str, headers: bytes) -> bytes:
        """The request's bytes up to its Content-Length value, built once per path and headers."""
        key = (path, headers)
        h = self._heads.get(key)
        if h is None:
            h = self._heads[key] = (f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n".encode()
                                    + b"User-Agent: " + USER_AGENT + b"\r\n" + headers + b"Content-Length: ")
        return h

    async def post(self, path: str, data: bytes, headers: bytes, timeout: float) -> tuple[int, bytes]:
        """POST ``data`` to ``path`` (after the base URL's path): the reply's status and body.
        ``headers``: header lines, each ending in CRLF (``header_block``)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that made them
            for c in list(self._idle):
                c.close()
            self._idle.clear()
            self._loop = loop
        request = b"%s%d\r\n\r\n%s" % (self.head(path, headers), len(data), data)
        deadline = loop.time() + timeout
        conn = self._reuse(loop)
        if conn is not None:
            try:
                return await self._exchange(conn, request, loop, timeout, timeout)
            except _Closed as e:
                if e.got_bytes:
                    raise WireError(str(e)) from None
                # closed by the server as the request went out (idle): once more on a new connection
        conn = await self._connect(loop, max(0.001, deadline - loop.time()))
        try:
            return await self._exchange(conn, request, loop, max(0.001, deadline - loop.time()), timeout)
        except _Closed as e:
            raise WireError(str(e)) from None

    async def _exchange(self, conn: _Connection, request: bytes, loop, left: float, timeout: float) -> tuple[int, bytes]:
        fut = conn.send(request, loop)
        timer = loop.call_later(left, _expire, fut, conn, timeout)
        try:
            reply = await fut
        except BaseException:
            conn.close()  # cancelled or failed mid-reply: the connection's state is unknown
            raise
        finally:
            timer.cancel()
        if not conn.closed:
            conn.idle_since = loop.time()
            self._idle.append(conn)
        return reply

    def _reuse(self, loop) -> _Connection | None:
        idle, now = self._idle, loop.time()
        while idle:
            c = idle.pop()  # the most recently used: the fewest connections stay warm
            if not c.closed and now - c.idle_since < IDLE_S:
                return c
            c.close()
        return None

    async def _connect(self, loop, timeout: float) -> _Connection:
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: _Connection(self), self.host, self.port),
                                             timeout)
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {e}", e) from None
        return conn

    def _forget(self, conn: _Connection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass


def header_block(headers: dict[str, str]) -> bytes:
    """Header lines for ``Wire.post``: ``Name: value\\r\\n`` each."""
    return b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
