"""How a run stops: at any point, within seconds, and nothing it started outlives it.

- ``watch()`` (main thread) makes every SIGTERM and SIGINT also wake a thread of ours, whichever
  Python handler runs for it (Prefect installs its own during a flow run): ``signal.set_wakeup_fd``.
  That thread stops the run at once: ``STOPPING`` is set (no server starts any more, starts under way
  give up), every managed endpoint is marked gone (requests in flight fail instead of retrying), and
  the servers are stopped in parallel. The main thread unwinds as usual: Prefect marks the flow run
  Crashed (a bare signal) or Cancelled (a cancel from the UI or API), and the command exits 143.
- With a deadline (the command line, a deployment's flow process), a process still there
  ``DEADLINE_S`` after the signal stops Prefect's temporary API server and ends itself. Shards commit
  one by one, so the staging folder stays resumable whenever the process ends.
- A run that no worker supervises (``modelyard run`` against a Prefect server) watches its own flow
  run: cancelled from Prefect's UI or API, it stops the same way and ends Cancelled. (A
  deployment's run is cancelled by its worker, which delivers a SIGTERM.)
- ``guard_children(marker)``: a small process that ends this process's children whose command line
  holds ``marker`` once this process is gone, even after a SIGKILL. Prefect's temporary API server
  (uvicorn) is a plain child of the run that would otherwise live on.
"""

from __future__ import annotations

import _thread
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

from modelyard.server import PACKAGE, STOPPING

log = logging.getLogger("modelyard")
DEADLINE_S = 6.0
CANCEL_POLL_S = 2.0
API_MARKER = "prefect.server.api.server:create_app"
_begin_lock = threading.RLock()  # re-entrant: a second signal may arrive in the main thread's handler
_state: dict = {"watching": False, "deadline": False, "signal": None, "flow_run": None, "cancelled": False,
                "supervised": False}


class Terminated(BaseException):
    """SIGTERM: the run is being stopped (not an error of the user's)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def install() -> None:
    """For ``modelyard run``: SIGTERM raises ``Terminated`` in the main thread (outside a flow run;
    inside one Prefect's own handler raises first, then hands the signal back to this one), and
    either signal stops the servers at once, with a deadline."""
    def on_term(signum, frame):
        begin_stop(signum)
        if not _state.get("raised"):  # once: a second SIGTERM must not break the clean-up under way
            _state["raised"] = True
            raise Terminated(signum)

    signal.signal(signal.SIGTERM, on_term)
    if not _state.get("unraisable_hook"):
        _state["unraisable_hook"] = True
        sys.unraisablehook = _raise_lost_terminations(sys.unraisablehook)
    watch(deadline=True)


def _raise_lost_terminations(hook):
    """A signal's handler runs wherever the main thread is, also inside a callback whose exceptions
    Python ignores (a weakref callback during an import, a ``__del__``): ``Terminated`` raised there
    is printed and lost, and the run would go on until the deadline ended it. Seen: SIGTERM while
    the servers start, the run's clean-up skipped and the process ended 6 s later. A lost
    ``Terminated`` is delivered again, as a signal, where the main thread goes next."""
    lost: queue.SimpleQueue[int] = queue.SimpleQueue()  # put() is safe in a handler or a callback

    def redeliver() -> None:  # from another thread: in the main thread the handler would run (and be lost) at once
        while True:
            _thread.interrupt_main(lost.get())

    threading.Thread(target=redeliver, name="modelyard-redeliver", daemon=True).start()

    def on_unraisable(u):
        if isinstance(u.exc_value, Terminated):
            _state["raised"] = False  # nothing unwound: the next delivery raises again
            lost.put(u.exc_value.signum)
            return
        hook(u)
    return on_unraisable


def watch(deadline: bool = False) -> None:
    """Wake ``begin_stop`` on SIGTERM/SIGINT, whoever handles them. Main thread only; idempotent."""
    _state["deadline"] = _state["deadline"] or deadline
    if _state["watching"] or threading.current_thread() is not threading.main_thread():
        return
    r, w = socket.socketpair()
    w.setblocking(False)
    previous = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    _state["watching"] = True
    _state["pipe"] = (r, w)  # kept alive with the process

    def loop():
        while True:
            data = r.recv(64)
            if previous != -1:
                try:
                    os.write(previous, data)  # whoever listened before still hears it
                except OSError:
                    pass
            for b in data:
                if b in (signal.SIGTERM, signal.SIGINT):
                    begin_stop(b)

    threading.Thread(target=loop, name="modelyard-signals", daemon=True).start()


def check() -> None:
    """Raise if the run is stopping: nothing new may start after a signal."""
    if STOPPING.is_set():
        from modelyard.errors import EngineError

        raise EngineError(f"not started: {STOPPING.reason}")


def stop_signal() -> int | None:
    """The signal that stopped the run, if one did."""
    return _state["signal"]


def cancelled() -> bool:
    """Was the run cancelled from Prefect (rather than signalled)?"""
    return _state["cancelled"]


def flow_run_started(run_id: str | None, supervised: bool = False) -> None:
    """The flow run under way. ``supervised``: a worker or runner delivers its cancellation; otherwise,
    against a Prefect server, a thread watches the run's state for a cancel from the UI or API."""
    _state["flow_run"], _state["supervised"] = run_id, supervised
    if run_id and not supervised and os.environ.get("PREFECT_API_URL") and not _state.get("cancel_watch"):
        _state["cancel_watch"] = True  # one watcher a process; it follows the flow run under way
        threading.Thread(target=_watch_cancel, name="modelyard-cancel", daemon=True).start()


def _watch_cancel() -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while not STOPPING.wait(CANCEL_POLL_S):
            run_id = _state["flow_run"]
            try:
                state = client.read_flow_run(run_id).state if run_id and not _state["supervised"] else None
            except Exception:  # noqa: BLE001 - the API may be briefly away; look again
                continue
            if state is not None and state.is_cancelling():
                _state["cancelled"] = True
                begin_stop(signal.SIGTERM, "the flow run was cancelled from Prefect")
                return


def begin_stop(signum: int, reason: str | None = None) -> None:
    """Stop everything the run started, at once (idempotent); then, with a deadline, end the process."""
    with _begin_lock:  # the main thread's handler and the signal thread both come here
        if STOPPING.is_set():
            return
        _state["signal"] = signum
        STOPPING.begin(reason or f"the run received {signal.Signals(signum).name}")
    from modelyard.serving import REGISTRY

    name = signal.Signals(signum).name
    log.warning("%s: stopping the run's vLLM servers; finished shards are kept and a re-run resumes", name)
    threading.Thread(target=REGISTRY.stop_all, args=(STOPPING.reason,), name="modelyard-stop", daemon=True).start()
    if _state["deadline"]:
        threading.Thread(target=_deadline, name="modelyard-deadline", daemon=True).start()


def _deadline() -> None:
    time.sleep(DEADLINE_S)
    log.warning("still running %.0f s after the signal: ending now", DEADLINE_S)
    _report_crash()
    stop_api_server()
    from modelyard.serving import REGISTRY

    REGISTRY.stop_all(STOPPING.reason)  # normally long done; the launchers also notice this exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(128 + (_state["signal"] or signal.SIGTERM))


def _report_crash() -> None:
    """Best effort, briefly: the flow run gets its final state before the process ends on its own:
    Cancelled if it was cancelled from Prefect, else Crashed (not a run its worker is cancelling: the
    worker marks it Cancelled once the process is gone)."""
    run_id = _state["flow_run"]
    if not run_id or "prefect" not in sys.modules:
        return
    done = threading.Event()

    def report():
        try:
            from prefect.client.orchestration import get_client
            from prefect.states import Cancelled, Crashed

            with get_client(sync_client=True) as client:
                state = client.read_flow_run(run_id).state
                if state is None or state.is_final() or (state.is_cancelling() and _state["supervised"]):
                    return
                final = Cancelled if _state["cancelled"] or state.is_cancelling() else Crashed
                client.set_flow_run_state(run_id, final(message=f"stopped: {STOPPING.reason}"), force=True)
        except Exception as e:  # noqa: BLE001 - the process ends either way
            log.warning("could not give the flow run its final state: %s", e)
        finally:
            done.set()

    threading.Thread(target=report, daemon=True).start()
    done.wait(2.0)


def temporary_api_servers() -> list:
    """The temporary API servers Prefect started in this process (none when it was not imported)."""
    server_mod = sys.modules.get("prefect.server.api.server")
    if server_mod is None:
        return []
    return [srv for srv in list(server_mod.SubprocessASGIServer._instances.values()) if srv.running]


def stop_api_server() -> None:
    """Stop Prefect's temporary API server if this process started one."""
    for srv in temporary_api_servers():
        try:
            srv.stop()
        except Exception:  # noqa: BLE001
            pass


def guard_children(marker: str = API_MARKER) -> subprocess.Popen | None:
    """Start the guard that ends this process's children matching ``marker`` once this process is gone."""
    try:
        return subprocess.Popen([sys.executable, str(PACKAGE / "_launcher.py"), "--guard", str(os.getpid()), marker],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as e:
        log.warning("could not start the guard of Prefect's temporary API server: %s", e)
        return None
