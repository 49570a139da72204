"""Batched embeddings: rows gathered into requests of batch_size inputs, each row handed its own
one-input reply; refused batches split; truncation.

The mechanics (how many requests, usage, linger, splitting) against nginx's instant endpoint
(benchmarks/_instant.py); what vLLM does (the same vectors, a text over the context, truncation)
on the real MiniLM server (tests/conftest.py `servers`).
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import _instant  # noqa: E402

from modelyard.batching import embed, finish_reason  # noqa: E402
from modelyard.client import Endpoint, Pool, RequestFailed, post  # noqa: E402

WORDS = "the printer jams whenever I print double sided pages from the tray".split()


def texts(n: int, start: int = 0) -> list[str]:
    return [f"Ticket {i}: " + " ".join(WORDS[: 3 + i % 10]) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def instant(tmp_path_factory):
    with _instant.instant_endpoint(tmp_path_factory.mktemp("nginx"), dimensions=16) as url:
        yield url


def make_pool(url: str, limit: int = 8, retries: int = 3) -> Pool:
    return Pool("m", [Endpoint(url)], limit, None, timeout=60, retries=retries)


def run(coro):
    async def go():
        async with aiohttp.ClientSession() as client:
            return await coro(client)
    return asyncio.run(go())


def embed_all(pool: Pool, served: str, inputs: list[str], batch_size: int = 32, extra: dict | None = None) -> list:
    async def go(client):
        return await asyncio.gather(*(embed(client, pool, "/embeddings", {"model": served, "input": t, **(extra or {})},
                                            batch_size=batch_size) for t in inputs), return_exceptions=True)
    return run(go)


def one_by_one(pool: Pool, served: str, inputs: list[str], extra: dict | None = None) -> list:
    """The same rows one input per request, as the row loop sends them without batching."""
    async def go(client):
        return await asyncio.gather(*(post(client, pool, "/embeddings", {"model": served, "input": t, **(extra or {})})
                                      for t in inputs), return_exceptions=True)
    return run(go)


def test_rows_are_sent_in_batches_and_get_one_input_replies(instant):
    pool = make_pool(instant)
    rows = texts(100)
    got = embed_all(pool, _instant.EMBED, rows, batch_size=32)
    assert pool.endpoints[0].served == 4  # 32 + 32 + 32 + 4
    single = one_by_one(make_pool(instant), _instant.EMBED, rows)
    for g, s in zip(got, single):
        assert set(g.body) == set(s.body) and set(g.body["usage"]) == set(s.body["usage"])
        assert g.body["data"] == s.body["data"]  # index 0, the same vector (here decoded from base64)
        assert finish_reason(g.body) == "stop" and g.attempts == 1 and g.endpoint == instant
    # vLLM reports usage per request: each batch's total is split over its rows, exactly
    totals = [sum(max(1, -(-len(t) // 4)) for t in rows[i:i + 32]) for i in range(0, 100, 32)]
    assert [sum(g.body["usage"]["prompt_tokens"] for g in got[i:i + 32]) for i in range(0, 100, 32)] == totals
    assert all(g.body["usage"]["total_tokens"] == g.body["usage"]["prompt_tokens"] > 0 for g in got)


def test_a_row_alone_gets_the_servers_own_count(instant):
    (g,) = embed_all(make_pool(instant), _instant.EMBED, ["just this one"])
    (s,) = one_by_one(make_pool(instant), _instant.EMBED, ["just this one"])
    assert g.body["usage"] == s.body["usage"]


def test_a_batch_leaves_after_the_linger_or_when_full(instant):
    pool = make_pool(instant)

    async def go(client):
        def one(t):
            return embed(client, pool, "/embeddings", {"model": _instant.EMBED, "input": t}, batch_size=8, linger=0.02)
        first = [asyncio.ensure_future(one(t)) for t in texts(5)]  # not full: waits for the linger
        await asyncio.sleep(0.005)
        first += [asyncio.ensure_future(one(t)) for t in texts(2, 5)]  # within it: joins the same batch
        await asyncio.sleep(0.1)
        assert pool.endpoints[0].served == 1
        full = [asyncio.ensure_future(one(t)) for t in texts(8, 7)]  # full: leaves at once
        await asyncio.sleep(0.01)
        assert pool.endpoints[0].served == 2
        return await asyncio.gather(*first, *full)

    assert len(run(go)) == 15


def test_different_bodies_are_not_mixed(instant):
    pool = make_pool(instant)
    rows = texts(10)
    a = embed_all(pool, _instant.EMBED, rows, extra={"dimensions": 16})
    assert pool.endpoints[0].served == 1
    b = embed_all(pool, _instant.EMBED, rows[:5], extra={"user": "a"}) + embed_all(pool, _instant.EMBED, rows[5:])
    assert pool.endpoints[0].served == 3 and len(a) == len(b) == 10


def test_a_refused_batch_is_split_down_to_its_rows(instant):
    """A replica that refuses every request: the batch of 4 is split to halves, then to single
    rows (1 + 2 + 4 requests), and every row fails with the refusal and its 3 attempts."""
    pool = make_pool(instant.replace("/v1", "/status400/v1"))
    got = embed_all(pool, _instant.EMBED, texts(4), batch_size=4)
    assert pool.endpoints[0].served == 7
    assert all(isinstance(e, RequestFailed) and e.status == 400 and e.attempts == 3 for e in got), got
    assert all(str(e).endswith(f"answered 400: refused: {_instant.REFUSAL}") for e in got)


def test_a_transient_failure_that_persists_is_not_split(instant):
    pool = make_pool(instant.replace("/v1", "/status503/v1"), retries=1)
    got = embed_all(pool, _instant.EMBED, texts(6), batch_size=8)
    assert pool.endpoints[0].served == 2  # one batch, retried once; the server is the problem, not a row
    assert all(isinstance(e, RequestFailed) and e.status == 503 and e.attempts == 2 for e in got)


def test_more_than_one_input_per_row_is_refused(instant):
    (e,) = embed_all(make_pool(instant), _instant.EMBED, [["a", "b"]])
    assert isinstance(e, ValueError)


# -- on the real MiniLM server ---------------------------------------------------------------

LONG = "The quick brown fox jumps over the lazy dog near the quiet river bank. " * 40  # ~600 tokens > 256


@pytest.fixture(scope="module")
def minilm(servers):
    s = servers["embedder"]
    return s.url, s.served_name


@pytest.mark.engine
def test_minilm_vectors_equal_one_input_per_request(minilm):
    url, served = minilm
    rows = texts(70)
    pool = make_pool(url)
    got = embed_all(pool, served, rows, batch_size=32)
    single = one_by_one(make_pool(url), served, rows)
    assert pool.endpoints[0].served == 3
    for g, s in zip(got, single):
        assert g.body["data"][0]["embedding"] == s.body["data"][0]["embedding"]
        assert len(g.body["data"][0]["embedding"]) == 384 and g.body["data"][0]["index"] == 0
    # per row, prompt_tokens is estimated from the batch's total; the totals are exact
    for i in range(0, 70, 32):
        assert (sum(g.body["usage"]["prompt_tokens"] for g in got[i:i + 32])
                == sum(s.body["usage"]["prompt_tokens"] for s in single[i:i + 32]))


@pytest.mark.engine
def test_minilm_a_text_over_the_context_fails_only_its_row(minilm):
    url, served = minilm
    rows = texts(32)
    rows[13] = LONG
    pool = make_pool(url)
    got = embed_all(pool, served, rows, batch_size=32)
    bad = got[13]
    assert isinstance(bad, RequestFailed) and bad.status == 400 and bad.attempts == 6, bad  # 32 16 8 4 2 1
    assert "maximum context length is 256" in str(bad) or "256" in str(bad), str(bad)
    single = one_by_one(make_pool(url), served, [r for i, r in enumerate(rows) if i != 13])
    assert [g.body["data"][0]["embedding"] for i, g in enumerate(got) if i != 13] == \
        [s.body["data"][0]["embedding"] for s in single]
    assert pool.endpoints[0].served == 1 + 2 * 5  # the batch, then both halves at each of 5 levels


@pytest.mark.engine
def test_minilm_truncate_cuts_only_the_long_row_and_says_so(minilm):
    url, served = minilm
    rows = texts(20)
    rows[4] = LONG
    cut = {"truncate_prompt_tokens": -1}
    got = embed_all(make_pool(url), served, rows, batch_size=32, extra=cut)
    assert not [g for g in got if isinstance(g, Exception)], got
    assert [finish_reason(g.body) for g in got] == ["length" if i == 4 else "stop" for i in range(20)]
    assert got[4].body["usage"]["prompt_tokens"] == 256  # cut to max_model_len: exact, it was sent alone
    (direct,) = one_by_one(make_pool(url), served, [LONG], extra=cut)
    assert got[4].body["data"][0]["embedding"] == direct.body["data"][0]["embedding"]
    (short,) = one_by_one(make_pool(url), served, [rows[0]])
    assert got[0].body["data"][0]["embedding"] == short.body["data"][0]["embedding"]


# -- the stage keys ----------------------------------------------------------------------------

CONFIG = """
name: t
input: {uri: in.jsonl, key: id}
models:
  m: {model: some/model, endpoints: ["http://127.0.0.1:9/v1"]}
  e: {model: builtin:minilm, task: embed}
stages:
  - {name: vec, model: e, input: "{{ text }}", output: vec, STAGE_KEYS}
  - {name: label, model: m, prompt: "{{ text }}", output: label, LABEL_KEYS}
output: {uri: out}
"""


def test_batch_size_and_truncate_belong_to_embedding_stages():
    from modelyard.config import parse_config
    from modelyard.errors import ConfigError

    cfg = parse_config(CONFIG.replace("STAGE_KEYS", "batch_size: 8, truncate: true").replace(", LABEL_KEYS", ""), "t.yaml")
    assert (cfg.stages[0].batch_size, cfg.stages[0].truncate) == (8, True)
    assert (cfg.stages[1].batch_size, cfg.stages[1].truncate) == (32, False)  # the defaults
    for keys, bad in (("truncate: true", "stages[1].truncate"), ("batch_size: 4", "stages[1].batch_size")):
        with pytest.raises(ConfigError) as e:
            parse_config(CONFIG.replace(", STAGE_KEYS", "").replace("LABEL_KEYS", keys), "t.yaml")
        assert any(bad in p and "only an embedding stage" in p for p in e.value.problems), e.value.problems
    with pytest.raises(ConfigError) as e:
        parse_config(CONFIG.replace("STAGE_KEYS", "batch_size: 0").replace(", LABEL_KEYS", ""), "t.yaml")
    assert any("batch_size" in p for p in e.value.problems)
