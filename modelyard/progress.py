"""Per-stage counters shared by the shards of this process, and their display.

Shards update a ``Tracker``; the command line shows it live (rich) on a terminal, or as plain
log lines otherwise. Counters only: nothing here waits on a model.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("modelyard")


class Every:
    """Whether to show progress now: the first time, then once ``seconds`` have passed since the
    last time shown, and always at the end. A Prefect progress artifact is one API call per update
    (35-40 ms of the flow's thread and of the API server here): at one update per shard, a run of
    100,000 rows in 50 short shards spent about 2 s on them."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.seconds, self.clock, self.last = seconds, clock, None

    def __call__(self, final: bool = False) -> bool:
        now = self.clock()
        if final or self.last is None or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


@dataclass
class StageCounter:
    rows: int = 0  # rows this stage has finished (run, skipped or failed)
    skipped: int = 0
    errors: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float | None = None
    last: float | None = None

    def rate(self, n: float) -> float:
        if self.started is None or self.last is None or self.last <= self.started:
            return 0.0
        return n / (self.last - self.started)


@dataclass
class Tracker:
    stages: list[str] = field(default_factory=list)
    total_rows: int = 0
    shards_total: int = 0
    shards_done: int = 0
    counters: dict[str, StageCounter] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self, stages: list[str], total_rows: int, shards: int) -> None:
        with self._lock:
            self.stages, self.total_rows, self.shards_total, self.shards_done = list(stages), total_rows, shards, 0
            self.counters = {s: StageCounter() for s in stages}

    def record(self, stage: str, *, skipped=False, error=False, cached=False, prompt_tokens=0, completion_tokens=0,
               count=1) -> None:
        now = time.monotonic()
        with self._lock:
            c = self.counters.setdefault(stage, StageCounter())
            c.rows += count
            c.skipped += count if skipped else 0
            c.errors += count if error else 0
            c.cached += count if cached else 0
            c.prompt_tokens += prompt_tokens or 0
            c.completion_tokens += completion_tokens or 0
            if c.started is None:
                c.started = now
            c.last = now

    def add(self, stage: str, stats: dict) -> None:
        """Counts of a shard finished earlier (a resumed run)."""
        with self._lock:
            c = self.counters.setdefault(stage, StageCounter())
            for k in ("rows", "skipped", "errors", "cached", "prompt_tokens", "completion_tokens"):
                setattr(c, k, getattr(c, k) + stats.get(k, 0))

    def started(self, stage: str) -> None:
        with self._lock:
            c = self.counters.setdefault(stage, StageCounter())
            if c.started is None:
                c.started = time.monotonic()

    def shard_done(self) -> None:
        with self._lock:
            self.shards_done += 1

    def rows_table(self) -> list[dict]:
        """One dict per stage: what the display and the log lines show."""
        out = []
        with self._lock:
            for s in self.stages:
                c = self.counters.get(s, StageCounter())
                rate = c.rate(c.rows)
                left = self.total_rows - c.rows
                out.append({
                    "stage": s, "rows": c.rows, "total": self.total_rows, "rows_s": rate,
                    "tokens_s": c.rate(c.prompt_tokens + c.completion_tokens), "errors": c.errors,
                    "skipped": c.skipped, "cached": c.cached,
                    "eta_s": (left / rate) if rate > 0 and left > 0 else (0.0 if left <= 0 else None),
                })
        return out


TRACKER = Tracker()  # the process's tracker: one pipeline run at a time per process


def fmt_eta(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def render(tracker: Tracker):
    from rich.table import Table

    t = Table(title=f"modelyard  shards {tracker.shards_done}/{tracker.shards_total}", expand=False)
    for col in ("stage", "rows", "rows/s", "tokens/s", "errors", "skipped", "ETA"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for r in tracker.rows_table():
        t.add_row(r["stage"], f"{r['rows']}/{r['total']}", f"{r['rows_s']:.1f}", f"{r['tokens_s']:.0f}",
                  str(r["errors"]), str(r["skipped"]), fmt_eta(r["eta_s"]))
    return t


class Display:
    """Live table on a terminal; a log line per stage every ``interval`` seconds otherwise."""

    def __init__(self, tracker: Tracker, live: bool, interval: float = 10.0):
        self.tracker, self.live, self.interval = tracker, live, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live = None

    def __enter__(self) -> Display:
        if self.live:
            from rich.live import Live

            self._live = Live(get_renderable=lambda: render(self.tracker), refresh_per_second=2, transient=False)
            self._live.__enter__()
        else:
            self._thread = threading.Thread(target=self._log_loop, daemon=True, name="modelyard-progress")
            self._thread.start()
        return self

    def _log_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.log_once()

    def log_once(self) -> None:
        for r in self.tracker.rows_table():
            if r["rows"]:
                log.info("stage %s: %d/%d rows, %.1f rows/s, %.0f tokens/s, %d errors, %d skipped, ETA %s",
                         r["stage"], r["rows"], r["total"], r["rows_s"], r["tokens_s"], r["errors"], r["skipped"],
                         fmt_eta(r["eta_s"]))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._live is not None:
            self._live.__exit__(*exc)
