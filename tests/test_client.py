"""The engine client against a real HTTP server: Debian's nginx with fixed OpenAI-shaped replies
(benchmarks/_instant.py), including replicas that always answer 503, 400 or a body that is not
JSON, and a closed port. No vLLM needed: these are the client's own cases.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import aiohttp
import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import _instant  # noqa: E402

from modelyard.client import Endpoint, Pool, RequestFailed, post  # noqa: E402

CHAT_BODY = {"model": _instant.CHAT, "temperature": 0, "messages": [{"role": "user", "content": "Classify: a bug"}],
             "structured_outputs": {"choice": _instant.CHOICES}}


@pytest.fixture(autouse=True, params=["wire", "aiohttp"])
def transport(request, monkeypatch):
    """Every case on both ways out (MODELYARD_HTTP): the wire, the default for http://, and aiohttp."""
    monkeypatch.setenv("MODELYARD_HTTP", request.param)
    return request.param


@pytest.fixture(scope="module")
def instant(tmp_path_factory):
    with _instant.instant_endpoint(tmp_path_factory.mktemp("nginx"), dimensions=8) as url:
        yield url


def replica(url: str, name: str) -> str:
    """The base URL of one of the instant endpoint's misbehaving replicas."""
    return url.replace("/v1", f"/{name}/v1")


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def send(pool: Pool, bodies: list[dict], path: str = "/chat/completions") -> list:
    """Every body through ``post`` at once on one session; replies or the exceptions raised."""
    async def go():
        async with aiohttp.ClientSession() as client:
            return await asyncio.gather(*(post(client, pool, path, b) for b in bodies), return_exceptions=True)
    return asyncio.run(go())


def make_pool(*urls: str, limit: int = 8, retries: int = 3, api_key_env: str | None = None) -> Pool:
    return Pool("m", [Endpoint(u) for u in urls], limit, api_key_env, timeout=10, retries=retries)


def test_post_returns_the_reply_with_its_lineage_facts(instant, transport):
    pool = make_pool(instant, limit=4)
    assert (pool.endpoints[0].wire is not None) == (transport == "wire")
    replies = send(pool, [CHAT_BODY] * 40)
    assert all(r.body == _instant.CHAT_REPLY for r in replies), replies[0]
    assert {r.attempts for r in replies} == {1}
    assert {r.endpoint for r in replies} == {instant}
    assert all(r.latency_ms > 0 for r in replies)
    ep = pool.endpoints[0]
    assert ep.in_flight == 0 and ep.served == 40 and not pool._waiters


def test_headers_are_json_and_the_api_key(instant, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sekret")
    (r,) = send(make_pool(replica(instant, "headers"), api_key_env="TEST_KEY"), [CHAT_BODY])
    assert r.body == {"authorization": "Bearer sekret", "content_type": "application/json"}
    (r,) = send(make_pool(replica(instant, "headers")), [CHAT_BODY])
    assert r.body == {"authorization": "", "content_type": "application/json"}


def test_a_transient_status_is_retried_on_another_replica(instant):
    pool = make_pool(replica(instant, "status503"), instant, limit=1)
    (r,) = send(pool, [CHAT_BODY])  # the first pick is the first replica (ties go to it); it answers 503
    assert r.body == _instant.CHAT_REPLY and r.attempts == 2 and r.endpoint == instant


def test_a_transient_status_that_persists_fails_after_the_retries(instant):
    t0 = time.monotonic()
    (e,) = send(make_pool(replica(instant, "status503"), retries=2), [CHAT_BODY])
    assert isinstance(e, RequestFailed) and e.attempts == 3 and e.status == 503
    assert "answered 503" in str(e) and str(e).endswith("(after 3 attempts)")
    assert time.monotonic() - t0 >= 0.5 + 1.0  # backed off before attempts 2 and 3 (0.5 s, 1 s, plus jitter)


def test_no_retries_means_one_attempt(instant):
    (e,) = send(make_pool(replica(instant, "status503"), retries=0), [CHAT_BODY])
    assert isinstance(e, RequestFailed) and e.attempts == 1 and str(e).endswith("(after 1 attempts)")


def test_a_refusal_is_not_retried_and_says_why(instant):
    (e,) = send(make_pool(replica(instant, "status400")), [CHAT_BODY])
    assert isinstance(e, RequestFailed) and e.attempts == 1 and e.status == 400
    assert str(e).endswith(f"answered 400: refused: {_instant.REFUSAL}")


def test_a_body_that_is_not_json_fails_the_request(instant):
    (e,) = send(make_pool(replica(instant, "notjson")), [CHAT_BODY])
    assert isinstance(e, RequestFailed) and e.attempts == 1 and "not JSON" in str(e) and "this is not JSON" in str(e)


def test_a_dead_replica_is_retried_then_reported(instant):
    dead = closed_port()
    (e,) = send(make_pool(dead, retries=1), [CHAT_BODY])
    assert isinstance(e, RequestFailed) and e.attempts == 2 and e.status is None
    assert str(e).startswith(f"cannot connect to {dead}") and str(e).endswith("(after 2 attempts)")
    pool = make_pool(dead, instant, limit=1)
    (r,) = send(pool, [CHAT_BODY])  # the dead one first, then the live one
    assert r.endpoint == instant and r.attempts == 2
    assert pool.endpoints[0].failures == 1 and pool.endpoints[0].down_until > 0  # taken out of rotation for 1 s


def test_the_pool_bounds_requests_in_flight(instant):
    pool = make_pool(instant, limit=3)
    seen = []
    acquire = pool.acquire

    async def watched():
        ep = await acquire()
        seen.append(ep.in_flight)
        return ep

    pool.acquire = watched
    replies = send(pool, [CHAT_BODY] * 60)
    assert len(replies) == 60 and all(r.attempts == 1 for r in replies)
    assert max(seen) == 3 and pool.endpoints[0].in_flight == 0


def test_the_dispatcher_runs_uvloop_unless_told_asyncio(instant, monkeypatch):
    """Every request of a run goes through the dispatcher's loop: uvloop by default (its compiled
    loop costs less per request), asyncio's own with MODELYARD_EVENT_LOOP=asyncio, and a value
    that is neither is an error naming the variable."""
    import uvloop

    from modelyard.client import Dispatcher, new_event_loop
    from modelyard.errors import EngineError

    async def ask():
        reply = await post(Dispatcher.get().client, Dispatcher.get().pool("m", [instant], 4, None, 10, 1),
                           "/chat/completions", CHAT_BODY)
        return type(asyncio.get_running_loop()), reply.body["choices"][0]["message"]["content"]

    loop_type, answer = Dispatcher.get().run(ask())
    assert loop_type is uvloop.Loop and answer in _instant.CHOICES
    for env, want in (("uvloop", uvloop.Loop), ("asyncio", asyncio.SelectorEventLoop)):
        monkeypatch.setenv("MODELYARD_EVENT_LOOP", env)
        loop = new_event_loop()
        try:
            assert type(loop) is want
        finally:
            loop.close()
    monkeypatch.setenv("MODELYARD_EVENT_LOOP", "trio")
    with pytest.raises(EngineError, match="MODELYARD_EVENT_LOOP='trio': expected uvloop or asyncio"):
        new_event_loop()
