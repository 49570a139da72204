"""JSON on the request path through orjson, with the standard library where orjson says no.

Every request body is encoded and every reply decoded once per request, and the request cache
encodes and decodes every stored reply: with ``json`` that cost a row more than its rendering
(an encoder object is built per call). orjson is several times faster; what it refuses falls
back to ``json``, so nothing changes in what is accepted: integers beyond 64 bits, lone
surrogates in strings (``json`` escapes them), ``NaN`` and ``Infinity`` in a reply.

Not for cache keys: ``cache.request_key`` keeps its own encoding, so no key changes.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any) -> bytes:
    """Compact JSON as bytes (UTF-8)."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError: a big integer, a lone surrogate, a type it does not know
        return json.dumps(obj, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # NaN, Infinity, big numbers as Python reads them; else json's own error
        return json.loads(data)
