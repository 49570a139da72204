"""The request cache: buffered writes, what another process sees and when, stored forms."""

from __future__ import annotations

import array
import asyncio
import json
import sqlite3
import time
import zlib

import pytest

from modelyard import cache as cache_mod
from modelyard.cache import RequestCache, decode_reply, encode_reply, open_cache, request_key
from modelyard.client import Dispatcher
from modelyard.vectors import Vector

CHAT = {"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
        "content": "bug"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}


def embedding_reply(values: list[float]) -> dict:
    return {"id": "e1", "object": "list", "created": 1, "model": "m",
            "data": [{"index": 0, "object": "embedding", "embedding": values}],
            "usage": {"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": 0}}


def on_disk(path) -> dict[str, tuple]:
    """What another process reads from the file now."""
    with sqlite3.connect(path) as c:
        return {k: (fr, blob) for k, fr, blob in c.execute("select key, finish_reason, reply from replies")}


def key(i: int) -> str:
    return request_key("m", "r", "/chat/completions", {"model": "x", "messages": [{"role": "user", "content": str(i)}]})


def test_put_is_seen_at_once_here_and_on_disk_after_a_flush(tmp_path):
    c = RequestCache(tmp_path / "c.sqlite")
    c.put(key(1), "m", "r", "/chat/completions", CHAT, "stop")
    assert c.get(key(1)) == CHAT
    assert on_disk(tmp_path / "c.sqlite") == {}
    c.flush()
    assert list(on_disk(tmp_path / "c.sqlite")) == [key(1)]
    assert RequestCache(tmp_path / "c.sqlite").get(key(1)) == CHAT  # a fresh object reads the file


def written(path, n: int, timeout: float = 20.0) -> bool:
    """Whether the file holds ``n`` entries within ``timeout`` (the writer thread's, with no flush)."""
    deadline = time.monotonic() + timeout
    while len(on_disk(path)) != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_buffer_is_written_when_full_or_old_by_the_writer_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "FLUSH_ROWS", 10)
    c = RequestCache(tmp_path / "c.sqlite")
    for i in range(9):
        c.put(key(i), "m", "r", "/chat/completions", CHAT, "stop")
    time.sleep(0.2)
    assert len(on_disk(tmp_path / "c.sqlite")) == 0
    c.put(key(9), "m", "r", "/chat/completions", CHAT, "stop")
    assert written(tmp_path / "c.sqlite", 10)
    monkeypatch.setattr(cache_mod, "FLUSH_SECONDS", 0.0)
    c.put(key(10), "m", "r", "/chat/completions", CHAT, "stop")
    assert written(tmp_path / "c.sqlite", 11)
    assert all(c.get(key(i)) == CHAT for i in range(11))


def test_entries_handed_to_the_writer_are_read_until_written_and_a_failed_write_keeps_them(tmp_path, monkeypatch):
    """While the writer holds a buffer, get and get_many still find its entries; a write that fails
    raises at flush() in the caller's thread, keeps the entries buffered, and the next flush writes them."""
    import threading

    monkeypatch.setattr(cache_mod, "FLUSH_ROWS", 5)
    c = RequestCache(tmp_path / "c.sqlite")
    gate, entered = threading.Event(), threading.Event()
    real = RequestCache._write
    fail = [True]

    def slow_write(self, buf):
        entered.set()
        gate.wait(10)
        if fail[0]:
            fail[0] = False
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, buf)

    monkeypatch.setattr(RequestCache, "_write", slow_write)
    for i in range(5):
        c.put(key(i), "m", "r", "/chat/completions", {**CHAT, "id": str(i)}, "stop")
    assert entered.wait(10) and not c._pending  # handed off, the writer busy with it
    assert c.get(key(3))["id"] == "3" and sorted(v["id"] for v in c.get_many([key(i) for i in range(5)]).values()) == list("01234")
    gate.set()
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        c.flush()
    assert on_disk(tmp_path / "c.sqlite") == {} and c.get(key(4))["id"] == "4"  # kept, buffered again
    c.flush()
    assert len(on_disk(tmp_path / "c.sqlite")) == 5


def test_truncated_entries_are_refused_when_asked_buffered_or_not(tmp_path):
    c = RequestCache(tmp_path / "c.sqlite")
    cut = {**CHAT, "choices": [{**CHAT["choices"][0], "finish_reason": "length"}]}
    c.put(key(1), "m", "r", "/chat/completions", cut, "length")
    assert c.get(key(1), accept_truncated=False) is None and c.get(key(1)) == cut
    c.flush()
    assert c.get(key(1), accept_truncated=False) is None and c.get(key(1)) == cut
    assert c.get_many([key(1)], accept_truncated=False) == {}


def test_get_many_reads_buffer_and_file(tmp_path):
    c = RequestCache(tmp_path / "c.sqlite")
    for i in range(1200):
        c.put(key(i), "m", "r", "/chat/completions", {**CHAT, "id": str(i)}, "stop")
    c.flush()
    c.put(key(5000), "m", "r", "/chat/completions", {**CHAT, "id": "5000"}, "stop")
    got = c.get_many([key(i) for i in (*range(0, 1200, 3), 5000, 9999)])
    assert sorted(int(v["id"]) for v in got.values()) == [*range(0, 1200, 3), 5000]
    assert all(got[key(int(v["id"]))] is v for v in got.values())


def test_dispatcher_run_flushes_every_open_cache(tmp_path):
    c = open_cache(str(tmp_path / "d.sqlite"))

    async def rows():
        for i in range(3):
            c.put(key(i), "m", "r", "/chat/completions", CHAT, "stop")
            await asyncio.sleep(0)

    Dispatcher.get().run(rows())
    assert len(on_disk(tmp_path / "d.sqlite")) == 3


@pytest.mark.parametrize("reply", [
    CHAT,
    {"id": "long", "text": "x" * 5000},
    embedding_reply(array.array("f", [i / 7 - 20 for i in range(384)]).tolist()),  # float32 values, as vLLM's
    embedding_reply([0.1, 1e-310, -2.5e300, 1 / 3]),  # any double: stored exactly
    embedding_reply(Vector([i / 7 - 20 for i in range(384)])),  # as a base64 reply arrives: float32 bytes
    {"data": [{"embedding": "base64 text"}]},
    {"note": "an integer beyond 64 bits (orjson refuses it, json takes it)", "x": 2 ** 70},
])
def test_stored_forms_give_back_the_same_reply(tmp_path, reply):
    assert decode_reply(encode_reply(reply)) == reply
    c = RequestCache(tmp_path / "c.sqlite")
    c.put(key(1), "m", "r", "/embeddings", reply, "stop")
    c.flush()
    assert RequestCache(tmp_path / "c.sqlite").get(key(1)) == reply


def test_small_replies_are_plain_json_large_ones_compressed_vectors_binary():
    assert encode_reply(CHAT) == json.dumps(CHAT, separators=(",", ":")).encode()
    assert zlib.decompress(encode_reply({"t": "x" * 5000})) == json.dumps({"t": "x" * 5000}, separators=(",", ":")).encode()
    vec = embedding_reply(array.array("f", [i / 7 - 20 for i in range(384)]).tolist())
    blob = encode_reply(vec)
    assert blob.startswith(cache_mod.VECTORS) and 384 * 8 < len(blob) < 384 * 8 + 300 < len(json.dumps(vec)) / 2
    vec32 = embedding_reply(Vector(array.array("f", [i / 7 - 20 for i in range(384)]).tobytes()))
    blob = encode_reply(vec32)
    assert blob.startswith(cache_mod.VECTORS32) and 384 * 4 < len(blob) < 384 * 4 + 300
    back = decode_reply(blob)["data"][0]["embedding"]
    assert type(back) is Vector and back == vec["data"][0]["embedding"]  # the same float32 values as the list


def test_a_reply_with_nan_or_a_lone_surrogate_is_stored_and_read_back(tmp_path):
    """orjson refuses these; the standard library's json takes them, as before."""
    c = RequestCache(tmp_path / "c.sqlite")
    odd = {"choices": [{"text": "bad \udc80 byte", "logprob": float("-inf")}]}
    c.put(key(2), "m", "r", "/completions", odd, "stop")
    c.flush()
    got = RequestCache(tmp_path / "c.sqlite").get(key(2))
    assert got["choices"][0]["text"] == "bad \udc80 byte" and got["choices"][0]["logprob"] == float("-inf")


def test_entries_written_by_earlier_versions_are_read(tmp_path):
    """Earlier versions stored zlib-compressed JSON for every reply."""
    path = tmp_path / "old.sqlite"
    RequestCache(path)
    with sqlite3.connect(path) as c:
        c.execute("insert into replies values (?, 'm', 'r', '/chat/completions', 'stop', ?, 0, 0)",
                  (key(1), zlib.compress(json.dumps(CHAT, separators=(",", ":")).encode(), 3)))
    assert RequestCache(path).get(key(1)) == CHAT


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "Classify: é \"quoted\"\n\t\u2028"}], "temperature": 0, "max_tokens": 4,
     "structured_outputs": {"choice": ["bug", "other"]}, "model": "ignored"},
    {"input": "lone \udc80 surrogate", "truncate_prompt_tokens": -1, "z": [1.5e-05, 2 ** 70, None, True]},
])
def test_request_keys_are_those_of_earlier_versions(body):
    """A user's cache stays valid across versions: the key is the sha256 of this exact JSON."""
    import hashlib

    blob = json.dumps(["m", "r", "/p", {k: v for k, v in body.items() if k != "model"}], sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    assert request_key("m", "r", "/p", body) == hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def test_stage_keys_are_request_keys():
    """A stage's keys, with the body's fixed part encoded once, are ``request_key``'s; any body
    that is not the stage's (other values, other objects, extra fields, another path) is keyed the
    plain way, and so is a body holding the probe's own text."""
    from modelyard.cache import StageKeys

    choice = {"choice": ["bug", "other"]}
    template = {"model": "served", "temperature": 0, "max_tokens": 4, "messages": None, "structured_outputs": choice}
    keys = StageKeys("m", "r", "/chat/completions", template, "messages")
    for text in ("Classify: é \"q\"\n", "lone \udc80", ""):
        body = {**template, "messages": [{"role": "user", "content": text}]}
        assert keys("/chat/completions", body) == request_key("m", "r", "/chat/completions", body)
        others = [{**body, "structured_outputs": {"choice": ["bug", "other"]}, "temperature": 0.0},
                  {**body, "logprobs": True}, {k: v for k, v in body.items() if k != "max_tokens"},
                  {k: v for k, v in body.items() if k != "model"}]
        for other in others:
            assert keys("/chat/completions", other) == request_key("m", "r", "/chat/completions", other)
        assert keys("/completions", body) == request_key("m", "r", "/completions", body)
    assert keys("/chat/completions", template) != keys("/chat/completions", {**template, "temperature": 0.0})
    odd = {**template, "stop": [StageKeys._PROBE]}
    probe = StageKeys("m", "r", "/chat/completions", odd, "messages")
    body = {**odd, "messages": [{"role": "user", "content": "x"}]}
    assert probe._head is None and probe("/chat/completions", body) == request_key("m", "r", "/chat/completions", body)
