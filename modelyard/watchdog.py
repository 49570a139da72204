"""Restarts managed servers that die during a run, on the same port, up to a limit.

While a server restarts its endpoint is marked so that requests wait instead of spending their
retries; past the limit it is marked gone and the run fails naming the model. Once the run is
stopping (a signal), nothing is restarted.
"""

from __future__ import annotations

import logging
import threading

from modelyard.client import ENDPOINT_STATE
from modelyard.errors import EngineError
from modelyard.serving import STOPPING, Server

log = logging.getLogger("modelyard")


class Watchdog:
    def __init__(self, servers: dict[str, tuple[Server, int]], interval: float = 0.5):
        self.servers, self.interval = servers, interval
        self.restarts = {name: 0 for name in servers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="modelyard-watchdog")

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for server, _ in self.servers.values():
            if not STOPPING.is_set():
                ENDPOINT_STATE.pop(server.url, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for name, (server, limit) in self.servers.items():
                if (server.alive() or self._stop.is_set() or STOPPING.is_set()
                        or ENDPOINT_STATE.get(server.url, "").startswith("gone")):
                    continue
                code = server.proc.returncode if server.proc else None
                if self.restarts[name] >= limit:
                    ENDPOINT_STATE[server.url] = (f"gone: the vLLM server died (exit code {code}) and was restarted "
                                                  f"{limit} time(s) already. Last lines of {server.log_path}:\n"
                                                  f"{server.tail(15)}")
                    log.error("models.%s: vLLM server died again; giving up after %d restart(s)", name, limit)
                    continue
                self.restarts[name] += 1
                ENDPOINT_STATE[server.url] = "restarting"
                log.warning("models.%s: vLLM server died (exit code %s); restarting it (%d/%d)",
                            name, code, self.restarts[name], limit)
                try:
                    with server.lock:
                        server.start(same_port=True)
                        server.wait_healthy(900)
                    ENDPOINT_STATE.pop(server.url, None)
                    log.warning("models.%s: vLLM server is back after restart %d", name, self.restarts[name])
                except EngineError as e:
                    ENDPOINT_STATE[server.url] = f"gone: restart failed: {e}"
