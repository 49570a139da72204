"""What a run did over time, sampled at a fixed cost: the data behind the report's time charts.

One process-wide ``RECORDER`` keeps

- timed events (``event("server-start", model=..., port=...)``: server start, healthy and stop,
  the start of each GPU wave), at most ``MAX_EVENTS`` of them;
- a sampler thread that reads ``modelyard.progress.TRACKER`` (rows and tokens finished per
  stage) and the requests in flight per endpoint of ``modelyard.client.Dispatcher``'s pools.

Memory does not grow with rows or run time: a series holds at most ``MAX_POINTS`` samples; when
it is full every other sample is dropped and the interval doubles, so a long run keeps evenly
spaced points over its whole length (``MAX_POINTS + 1`` at most). Counters are cumulative, so rates between any two kept
points stay exact. ``snapshot()`` is what the manifest's ``telemetry`` section holds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

MAX_POINTS = 400
MAX_EVENTS = 500
INTERVAL_S = 0.5
SERVER_KINDS = ("server-start", "server-healthy", "server-stop")


class Series:
    """Evenly spaced samples of named cumulative values, at most ``max_points`` of them."""

    def __init__(self, max_points: int = MAX_POINTS, interval: float = INTERVAL_S):
        self.max_points, self.interval = max_points, interval
        self.t: list[float] = []
        self.values: dict[tuple, list[float | None]] = {}
        self.latest: tuple[float, dict] | None = None

    def add(self, t: float, values: dict[tuple, float]) -> None:
        """Keep a sample if it is ``interval`` after the last kept one; else hold it as the newest."""
        if self.t and t - self.t[-1] < self.interval * 0.99:
            self.latest = (t, values)
            return
        self.latest = None
        for key in values.keys() - self.values.keys():  # a series that appears late: empty before
            self.values[key] = [None] * len(self.t)
        self.t.append(t)
        for key, col in self.values.items():
            col.append(values.get(key))
        if len(self.t) > self.max_points and len(self.t) % 2:  # odd: every other one keeps first and last
            self.t = self.t[::2]
            self.values = {k: v[::2] for k, v in self.values.items()}
            self.interval *= 2

    def points(self) -> tuple[list[float], dict[tuple, list]]:
        """The kept samples and, last, the newest one (counters are cumulative: nothing is lost)."""
        if self.latest is None:
            return list(self.t), {k: list(v) for k, v in self.values.items()}
        t, values = self.latest
        keys = self.values.keys() | values.keys()
        return [*self.t, t], {k: [*self.values.get(k, [None] * len(self.t)), values.get(k)] for k in keys}


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: deque = deque(maxlen=MAX_EVENTS)
        self.dropped = 0
        self.series = Series()
        self.started: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def event(self, kind: str, **fields: Any) -> None:
        with self.lock:
            if len(self.events) == self.events.maxlen:
                self.dropped += 1
            self.events.append({"time": time.time(), "kind": kind, **fields})

    def begin(self, interval: float = INTERVAL_S) -> None:
        """A new run: empty series, and the sampler started (events of this process are kept)."""
        self.end()
        with self.lock:
            self.series, self.started = Series(interval=interval), time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(self._stop,), daemon=True,
                                        name="modelyard-telemetry")
        self.sample()
        self._thread.start()

    def end(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.series.interval):
            self.sample()

    def sample(self) -> None:
        values = {**_tracker_values(), **_in_flight_values()}
        with self.lock:
            if self.started is not None:
                self.series.add(time.time() - self.started, values)

    def snapshot(self) -> dict[str, Any]:
        """The run so far, for the manifest: times in seconds from ``started`` (epoch seconds).

        Events from before the run are kept only for servers still starting when it began (the
        command line starts them beside Prefect): the run waited on them."""
        self.sample()
        with self.lock:
            begun = self.started or time.time()
            events = list(self.events)
            series = self.series
            times, columns = series.points()
            dropped = self.dropped
        early = _still_starting(events, begun)
        t0 = min([begun, *(e["time"] for e in early)])
        kept = [e for e in events if e["time"] >= begun or e in early]
        shift = begun - t0
        stages: dict[str, dict[str, list]] = {}
        in_flight: dict[str, dict[str, Any]] = {}
        for key, col in columns.items():
            if key[0] == "stage":
                stages.setdefault(key[1], {})[key[2]] = col
            elif any(col):  # the process's client keeps the pools of earlier runs: only this run's busy ones
                in_flight[f"{key[1]} {key[2]}"] = {"model": key[1], "endpoint": key[2], "values": col}
        return {
            "started": t0, "interval_s": series.interval, "max_points": series.max_points,
            "t": [round(t + shift, 3) for t in times],
            "stages": stages, "in_flight": in_flight,
            "events": [{**{k: v for k, v in e.items() if k != "time"}, "t": round(e["time"] - t0, 3)} for e in kept],
            "events_dropped": dropped,
        }


def _still_starting(events: list[dict], begun: float) -> list[dict]:
    """Server events before ``begun`` of servers that became healthy after it (or not yet)."""
    early = [e for e in events if e["time"] < begun and e["kind"] in SERVER_KINDS]
    out = []
    for e in early:
        if e["kind"] != "server-start":
            continue
        later = [x for x in events if x["time"] > e["time"] and x.get("port") == e.get("port")
                 and x["kind"] in ("server-healthy", "server-stop")]
        if not later or later[0]["time"] >= begun:
            out.append(e)
    return out


def _tracker_values() -> dict[tuple, float]:
    from modelyard.progress import TRACKER

    out: dict[tuple, float] = {}
    with TRACKER._lock:
        for name, c in TRACKER.counters.items():
            out[("stage", name, "rows")] = c.rows
            out[("stage", name, "tokens")] = c.prompt_tokens + c.completion_tokens
            out[("stage", name, "errors")] = c.errors
            out[("stage", name, "cached")] = c.cached
    return out


def _in_flight_values() -> dict[tuple, float]:
    from modelyard.client import Dispatcher

    d = Dispatcher._instance
    if d is None:
        return {}
    out: dict[tuple, float] = {}
    for _ in range(3):  # the pools dict may grow while it is read
        try:
            pools = list(d.pools.values())
            break
        except RuntimeError:
            continue
    else:
        return {}
    for pool in pools:
        for ep in pool.endpoints:
            key = ("in_flight", pool.name, ep.url)
            out[key] = out.get(key, 0) + ep.in_flight
    return out


RECORDER = Recorder()


def event(kind: str, **fields: Any) -> None:
    """Record a timed event of this process (a hook: never raises)."""
    try:
        RECORDER.event(kind, **fields)
    except Exception:  # noqa: BLE001 - a picture must never break a run
        pass


def begin() -> None:
    RECORDER.begin()


def end() -> None:
    RECORDER.end()


def snapshot() -> dict[str, Any]:
    """The manifest's ``telemetry`` section; stops the sampler (the run is committing)."""
    snap = RECORDER.snapshot()
    RECORDER.end()
    return snap
