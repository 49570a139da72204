"""Prefect's logging configuration for a command that may start Prefect's temporary API server.

Prefect 3.9 stops its temporary server at exit with SIGTERM. The server's services cancel whatever
they were still writing (the last events of a run, most often after a SIGTERM or a run with many
task runs), and SQLAlchemy and Prefect log each cancellation as an error with its traceback:
``Exception during reset or similar``, ``Error flushing 1 events (1 to retry, 0 dropped)``, each
ending in ``asyncio.exceptions.CancelledError``. Nothing of the run is lost (its states are already
written), but a user reads a traceback after a run that went well, or that they stopped on purpose.

``install()`` points ``PREFECT_LOGGING_SETTINGS_PATH`` at Prefect's own default configuration with
one filter added to its handlers: in the temporary server's process only, a record whose exception is
a cancellation is dropped. A user's own configuration (that variable, or ``$PREFECT_HOME/logging.yml``)
is left as it is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

FILTER = "modelyard_server_shutdown"


class ServerShutdownNoise(logging.Filter):
    """Drop records of a cancelled task, in Prefect's temporary API server only (Prefect marks that
    process with ``PREFECT__SERVER_EPHEMERAL=1``). In a server a cancellation is its shutdown, or a
    client that went away; elsewhere it may be a run's failure, and is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.active = os.environ.get("PREFECT__SERVER_EPHEMERAL") == "1"

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.active or not record.exc_info:
            return True
        import asyncio  # here: the command imports this module before it needs asyncio

        return not isinstance(record.exc_info[1], asyncio.CancelledError)


def config_text() -> str | None:
    """Prefect's default logging configuration with the filter on each handler (None: no Prefect)."""
    import yaml

    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        return None
    default = Path(list(spec.submodule_search_locations)[0]) / "logging" / "logging.yml"
    config = yaml.safe_load(default.read_text())
    config.setdefault("filters", {})[FILTER] = {"()": f"{__name__}.ServerShutdownNoise"}
    for handler in config.get("handlers", {}).values():
        handler["filters"] = [*handler.get("filters", []), FILTER]
    return yaml.safe_dump(config, sort_keys=False)


def install() -> Path | None:
    """Use the configuration above unless the user has one; return its path (None: left alone)."""
    if os.environ.get("PREFECT_LOGGING_SETTINGS_PATH"):
        return None
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    if (home / "logging.yml").exists():
        return None
    try:
        text = config_text()
        if text is None:
            return None
        path = home / f"modelyard-logging-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yml"
        if not path.exists():
            home.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
    except (OSError, ImportError, ValueError) as e:  # Prefect's own configuration still works
        logging.getLogger(__name__).debug("kept Prefect's logging configuration: %s", e)
        return None
    os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = str(path)
    return path
