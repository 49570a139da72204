"""Run a model server and make sure it dies with the orchestrator. Standard library only.

``python _launcher.py PARENT_PID -- CMD ARGS...`` (with the engine environment's Python) starts CMD
in its own process group and stops that group (TERM, then KILL after ``GRACE_S``) when it is told to
stop (SIGTERM or SIGINT; SIGUSR1: KILL at once, for a server still starting, which would not answer
a TERM before its warm-up ends), or when the orchestrator that started it is gone, even after a
SIGKILL of the orchestrator, which would otherwise leave a vLLM server holding memory and cores.

``python _launcher.py --guard PARENT_PID MARKER`` watches PARENT_PID's children whose command line
holds MARKER (Prefect's temporary API server) and ends them once PARENT_PID is gone (Linux /proc).
"""

import os
import signal
import subprocess
import sys
import time

GRACE_S = 5  # vLLM stops in 1-2 s on SIGTERM; a server still there after this is killed


class Stop(Exception):
    """SIGTERM or SIGINT: stop the server."""


def _stat(pid):
    """(parent pid, start time) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def guard(parent, marker):
    """Remember PARENT's children matching MARKER while it lives; end them when it is gone."""
    seen = {}  # pid -> start time
    me = os.getpid()  # this guard's own command line holds the marker too
    while os.getppid() == parent:
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in seen and int(name) != me:
                st = _stat(int(name))
                if st and st[0] == parent and marker in _cmdline(int(name)):
                    seen[int(name)] = st[1]
        time.sleep(0.5)
    alive = [pid for pid, start in seen.items() if (_stat(pid) or (0, None))[1] == start]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + GRACE_S
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if (_stat(pid) or (0, None))[1] == seen[pid]]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return 0


def main():
    if sys.argv[1] == "--guard":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return guard(int(sys.argv[2]), sys.argv[3])
    parent = int(sys.argv[1])
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    asked = []  # the stop signals received
    running = []

    def stop(signum, _frame):
        asked.append(signum)
        if running:  # (before the child exists it must not inherit ignored signals: only note the stop)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # one stop is enough; the cleanup must finish
                signal.signal(s, signal.SIG_IGN)
            raise Stop  # out of the sleep below at once: the run that asked is waiting for the stop

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # before the child exists: no stop is lost
        signal.signal(s, stop)
    child = subprocess.Popen(cmd, start_new_session=True)
    running.append(child)
    try:
        while child.poll() is None and not asked:
            if os.getppid() != parent:
                break
            time.sleep(0.5)
    except Stop:
        pass
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    now = signal.SIGUSR1 in asked
    if now and child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        except ProcessLookupError:
            pass
    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait(timeout=GRACE_S)
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
