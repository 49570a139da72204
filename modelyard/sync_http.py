"""Blocking HTTP for the few calls made outside the request path: endpoint probes, health polls,
OpenLineage posts.

Every new ``httpx.Client`` builds its own SSL context, loading the CA bundle again: about 20 ms
of CPU each, whether or not the URL is ``https://``. On a small machine that CPU is taken from
the vLLM server starting or answering beside it. The clients made here share one context,
built at first use, with httpx's own defaults (certifi's bundle, ``SSL_CERT_FILE`` honoured).
"""

from __future__ import annotations

import functools
import ssl
from typing import Any

import httpx


@functools.cache
def ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def client(**kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` with these options and the process's shared SSL context."""
    return httpx.Client(verify=ssl_context(), **kwargs)
