"""Named points where a test can kill this process for real: MODELYARD_FAILPOINT=NAME[:N].

The N-th time the process reaches NAME (default the first), it sends itself SIGKILL: no clean-up,
no finally blocks, exactly like a machine that dies. The variable is read when the process
starts; unset (always, outside tests) a failpoint costs one comparison.
"""

from __future__ import annotations

import os
import signal
import threading

_counts: dict[str, int] = {}
_lock = threading.Lock()


SPEC = os.environ.get("MODELYARD_FAILPOINT")  # read once: failpoints sit on the per-row path


def failpoint(name: str) -> None:
    spec = SPEC
    if not spec:
        return
    target, _, nth = spec.rpartition(":")
    if not nth.isdigit():
        target, nth = spec, "1"
    if target != name:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == int(nth or 1)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
