"""Ask one model one request for one row: the request cache, the engine, the reply's checks.

Every stage strategy (one model, cascade, vote, route) is built from ``ask``; what it returns,
an ``Answer``, is one model's attempt: its value or why it has none, what it cost in tokens and
time, and (when asked for) how sure the model was. An answer is cached when it is valid, and a
deterministic refusal (HTTP 400, such as a prompt longer than the context) is remembered too, so
an unchanged re-run pays for neither again (``--retry-errors`` asks again).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from modelyard.cache import RequestCache, deterministic, request_key
from modelyard.client import Pool, RequestFailed, post
from modelyard.confidence import confidence, logprob_params
from modelyard.failpoints import failpoint
from modelyard.job import CacheMiss, Job
from modelyard.stages import OutputInvalid, Stage

REFUSED = "refused"  # finish_reason under which the cache keeps a refusal
REMEMBERED_STATUS = {400}  # the engine refused the request itself: the same request is refused again


@dataclass
class Context:
    """What one pass over a shard shares: the HTTP session, the pools, the cache, the job."""

    client: Any
    pools: dict[str, Pool]
    cache: RequestCache | None
    job: Job


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
    latency_ms: float = 0.0
    attempts: int = 0
    cached: bool = False
    endpoint: str | None = None
    confidence: float | None = None
    facts: dict = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def text(self) -> str | None:
        """The answer as text, for lineage: strings as they are, anything else as JSON."""
        if not self.ok:
            return self.raw
        return self.value if isinstance(self.value, str) else json.dumps(self.value, separators=(",", ":"))


async def ask(ctx: Context, st: Stage, model: str, path: str, body: dict[str, Any], *,
              want_confidence: bool = False, extra: dict[str, Any] | None = None) -> Answer:
    """``model`` answers the stage's request ``body`` for one row (see the module docstring)."""
    job = ctx.job
    rt = job.models[model]
    body = {**body, "model": rt.served_name, **(extra or {})}
    if want_confidence and path != "/embeddings":
        body.update(logprob_params(st.cfg.api))
    a = Answer(model)
    cache, key, reply = ctx.cache, None, None
    if cache is not None and (job.cache_nondeterministic or deterministic(path, body)):
        key = request_key(rt.model_id, rt.revision, path, body)
        reply = cache.get(key, accept_truncated=not job.retry_truncated)
        if reply is not None and REFUSED in reply and job.retry_errors:
            reply = None
    if reply is not None:
        a.cached, a.endpoint = True, "cache"
        if REFUSED in reply:
            a.failed, a.error = True, reply[REFUSED]["message"]
            return a
    elif job.cache_only:
        raise CacheMiss(st.name)
    else:
        try:
            r = await post(ctx.client, ctx.pools[model], path, body)
        except RequestFailed as e:
            a.failed, a.attempts, a.error = True, e.attempts, explain(str(e))
            if key is not None and e.status in REMEMBERED_STATUS:
                cache.put(key, rt.model_id, rt.revision, path, {REFUSED: {"status": e.status, "message": a.error}},
                          REFUSED)
            return a
        a.attempts, a.latency_ms, a.endpoint, reply = r.attempts, round(r.latency_ms, 3), r.endpoint, r.body
    try:
        value, facts = st.parse(reply)
    except OutputInvalid as e:
        a.facts = _facts(reply)
        a.error, a.raw = str(e), e.raw
        _set_facts(a, a.facts)
        return a
    except (KeyError, IndexError, TypeError) as e:
        a.error, a.raw = f"malformed reply from the server: {type(e).__name__}: {e}", str(reply)[:2000]
        return a
    a.facts = facts
    _set_facts(a, facts)
    a.value, a.ok = value, True
    if want_confidence:
        a.confidence = confidence(reply, value, st.cfg.choice)
    if key is not None and not a.cached:
        cache.put(key, rt.model_id, rt.revision, path, reply, a.finish_reason)
    failpoint(f"reply:{st.name}")
    failpoint(f"reply:{st.name}@{model}")
    return a


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
