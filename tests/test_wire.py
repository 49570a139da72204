"""The wire (modelyard.wire): HTTP/1.1 keep-alive POSTs parsed by httptools.

Against Debian's nginx (benchmarks/_instant.py) for what a real server does: replies with a
Content-Length, keep-alive, a server that closes after each reply. The cases nginx cannot be
made to produce (a server that closes a kept-alive connection as the next request arrives, one
that breaks off mid-reply, never answers, answers chunked or until its close) come from a few
lines of asyncio server below, speaking real HTTP/1.1 over a real socket.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import _instant  # noqa: E402

from modelyard import fastjson  # noqa: E402
from modelyard.client import Endpoint, Pool, RequestFailed, http_client, post  # noqa: E402
from modelyard.errors import EngineError  # noqa: E402
from modelyard.wire import ConnectFailed, Wire, WireError, header_block  # noqa: E402

BODY = fastjson.dumps({"model": _instant.CHAT, "messages": [{"role": "user", "content": "Classify: a bug"}]})
HEADERS = header_block({"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def instant(tmp_path_factory):
    with _instant.instant_endpoint(tmp_path_factory.mktemp("nginx"), dimensions=8) as url:
        yield url


def counting(wire: Wire) -> list:
    """Count the connections ``wire`` opens."""
    made, connect = [], wire._connect

    async def counted(loop, timeout):
        conn = await connect(loop, timeout)
        made.append(conn)
        return conn
    wire._connect = counted
    return made


def test_replies_come_over_few_kept_alive_connections(instant):
    wire = Wire(instant)
    made = counting(wire)

    async def go():
        sem = asyncio.Semaphore(4)

        async def one():
            async with sem:
                return await wire.post("/chat/completions", BODY, HEADERS, 10)
        return await asyncio.gather(*(one() for _ in range(200)))

    replies = asyncio.run(go())
    assert {status for status, _ in replies} == {200}
    assert all(fastjson.loads(raw) == _instant.CHAT_REPLY for _, raw in replies)
    assert len(made) == 4 and len(wire._idle) == 4  # 200 requests, 4 at a time, on 4 connections


def test_a_server_that_closes_after_each_reply(instant):
    wire = Wire(instant.replace("/v1", "/close/v1"))
    made = counting(wire)

    async def go():
        return [await wire.post("/chat/completions", BODY, HEADERS, 10) for _ in range(5)]

    replies = asyncio.run(go())
    assert [s for s, _ in replies] == [200] * 5 and fastjson.loads(replies[0][1]) == _instant.CHAT_REPLY
    assert len(made) == 5 and not wire._idle  # "Connection: close": never reused


def test_a_connection_idle_too_long_is_not_reused(instant, monkeypatch):
    import modelyard.wire as W

    monkeypatch.setattr(W, "IDLE_S", 0.05)
    wire = Wire(instant)
    made = counting(wire)

    async def go():
        await wire.post("/chat/completions", BODY, HEADERS, 10)
        await wire.post("/chat/completions", BODY, HEADERS, 10)  # at once: the same connection
        await asyncio.sleep(0.1)
        await wire.post("/chat/completions", BODY, HEADERS, 10)  # after IDLE_S: a new one

    asyncio.run(go())
    assert len(made) == 2


def test_the_headers_and_the_path_are_sent(instant):
    wire = Wire(instant.replace("/v1", "/headers/v1"))
    status, raw = asyncio.run(wire.post("/chat/completions", BODY,
                                        header_block({"Content-Type": "application/json",
                                                      "Authorization": "Bearer k"}), 10))
    assert status == 200 and fastjson.loads(raw) == {"authorization": "Bearer k", "content_type": "application/json"}


def test_a_closed_port_says_it_cannot_connect():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectFailed, match=f"cannot connect to 127.0.0.1:{port}"):
        asyncio.run(Wire(f"http://127.0.0.1:{port}/v1").post("/chat/completions", BODY, HEADERS, 5))


# -- a server for the cases nginx does not produce ---------------------------------------------

REPLY = b'{"ok":true}'


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


def odd_server(behaviour: str):
    """An HTTP/1.1 server on loopback that answers as ``behaviour`` says; yields its base URL."""
    seen = {"connections": 0, "requests": 0}

    async def handle(reader, writer):
        seen["connections"] += 1
        n = 0
        try:
            while True:
                await _read_request(reader)
                n += 1
                seen["requests"] += 1
                if behaviour == "close-second" and n == 2:  # as a server closing an idle connection would
                    break
                if behaviour == "break":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"ok\"")
                    await writer.drain()
                    break
                if behaviour == "silent":
                    await asyncio.sleep(30)
                if behaviour == "chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"4\r\n{\"ok\r\n7\r\n\":true}\r\n0\r\n\r\n")
                elif behaviour == "until-close":
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + REPLY)
                    await writer.drain()
                    break
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(REPLY), REPLY))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()

    return handle, seen


def run_against(behaviour: str, calls, timeout: float = 5.0):
    """Start the odd server, run ``calls(wire)`` (a coroutine function), return its result and the counts."""
    handle, seen = odd_server(behaviour)

    async def go():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await calls(Wire(f"http://127.0.0.1:{port}/v1"), timeout)
        finally:
            server.close()

    return asyncio.run(go()), seen


async def twice(wire, timeout):
    return [await wire.post("/chat/completions", BODY, HEADERS, timeout) for _ in range(2)]


def test_a_kept_alive_connection_the_server_closed_is_retried_on_a_new_one():
    replies, seen = run_against("close-second", twice)
    assert replies == [(200, REPLY)] * 2
    assert seen == {"connections": 2, "requests": 3}  # the second request once more, on a new connection


def test_a_reply_broken_off_midway_fails():
    async def once(wire, timeout):
        return await wire.post("/chat/completions", BODY, HEADERS, timeout)

    with pytest.raises(WireError, match="closed the connection"):
        run_against("break", once)


def test_a_server_that_never_answers_times_out():
    async def once(wire, timeout):
        return await wire.post("/chat/completions", BODY, HEADERS, timeout)

    with pytest.raises(TimeoutError, match="no whole reply within 0.3 s"):
        run_against("silent", once, timeout=0.3)


def test_chunked_replies_and_replies_ended_by_the_close():
    replies, seen = run_against("chunked", twice)
    assert replies == [(200, REPLY)] * 2 and seen["connections"] == 1
    replies, seen = run_against("until-close", twice)
    assert replies == [(200, REPLY)] * 2 and seen["connections"] == 2


def test_post_retries_a_broken_reply_and_says_what_broke():
    """Through the client: a reply broken off is a transient failure, retried, then reported."""
    async def via_post(wire, timeout):
        pool = Pool("m", [Endpoint(wire.url)], 2, None, timeout=timeout, retries=1)
        return await post(None, pool, "/chat/completions", {"model": "m"})

    with pytest.raises(RequestFailed, match=r"connection to http://127.0.0.1:\d+/v1 broke: .*\(after 2 attempts\)"):
        run_against("break", via_post)


def test_the_client_is_chosen_by_modelyard_http(monkeypatch):
    assert Endpoint("http://127.0.0.1:1/v1").wire is not None
    assert Endpoint("https://example.org/v1").wire is None  # TLS goes through aiohttp
    monkeypatch.setenv("MODELYARD_HTTP", "aiohttp")
    assert http_client() == "aiohttp" and Endpoint("http://127.0.0.1:1/v1").wire is None
    monkeypatch.setenv("MODELYARD_HTTP", "curl")
    with pytest.raises(EngineError, match="MODELYARD_HTTP='curl': expected wire or aiohttp"):
        Endpoint("http://127.0.0.1:1/v1")
