"""Run a model server and make sure it dies with the orchestrator. Standard library only.

Run with the engine environment's Python: ``python _launcher.py PARENT_PID -- CMD ARGS...``.
It starts CMD in its own process group and stops that group (TERM, then KILL) when it is told
to stop, or when the orchestrator that started it is gone, even after a SIGKILL of the
orchestrator, which would otherwise leave a vLLM server holding memory and cores.
"""

import os
import signal
import subprocess
import sys
import time


class Stop(Exception):
    """SIGTERM or SIGINT: stop the server."""


def main() -> int:
    parent = int(sys.argv[1])
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    child = subprocess.Popen(cmd, start_new_session=True)

    def stop(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough; the cleanup below must finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Stop  # out of the sleep below at once: the run that asked is waiting for the stop

    try:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while child.poll() is None:
            if os.getppid() != parent:
                break
            time.sleep(0.5)
    except Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        except ProcessLookupError:
            pass
    try:  # the server's own children (vLLM's engine core) must not outlive it
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    rc = child.returncode
    return 128 - rc if rc is not None and rc < 0 else (rc or 0)  # killed by signal N: 128 + N, like a shell


if __name__ == "__main__":
    sys.exit(main())
