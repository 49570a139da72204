"""Reading a vLLM server's log: the line that says why it did not start.

vLLM runs its API server, engine core and worker in separate processes; when the worker fails (say,
not enough memory), each wrapper above it logs its own traceback, and the log ends with
``Engine core initialization failed. See root cause above.``. The root cause is the first exception
line of the log.
"""

from __future__ import annotations

import re

_PREFIX = re.compile(r"^(?:\([\w.-]+ pid=\d+\) )?(?:(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:.]+ \[[^\]]*\] )?")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt): \S")


def first_error(text: str) -> str | None:
    """The first exception a server's log records (its worker's, before the wrappers that say
    ``See root cause above``); else its first ERROR line; None if there is neither."""
    fallback = None
    for line in text.splitlines():
        m = _PREFIX.match(line)
        level, rest = m.group(1), line[m.end():].strip()
        if level in ("DEBUG", "INFO", "WARNING"):
            continue
        if _EXCEPTION.match(rest) and "See root cause above" not in rest:
            return rest
        if fallback is None and level in ("ERROR", "CRITICAL") and not rest.startswith(("Traceback", "File ", "^")):
            fallback = rest
    return fallback
