"""Shared fixtures: a Prefect test harness and real vLLM CPU servers, each started once a session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HOME = tempfile.mkdtemp(prefix="modelyard-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def demo_config():
    from modelyard.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml", {"date": "2026-11-27"})


@pytest.fixture(scope="session")
def servers(demo_config):
    """The demo's two models on real vLLM CPU servers, started side by side through modelyard's
    own managed-server code; runs of the demo config in this process reuse them."""
    from concurrent.futures import ThreadPoolExecutor

    from modelyard.serving import REGISTRY

    cfg = demo_config.config
    with ThreadPoolExecutor(2) as ex:
        futs = {n: ex.submit(REGISTRY.acquire, n, m, cfg.engine, demo_config.base_dir) for n, m in cfg.models.items()}
        started = {n: f.result() for n, f in futs.items()}
    yield started
    for s in started.values():
        REGISTRY.release(s)


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real console script in a subprocess, as a user would run it."""
    exe = Path(sys.executable).with_name("modelyard")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
