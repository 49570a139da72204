"""Headless Chromium (Debian's `chromium`, installed by `make test` when missing) for the report tests.

Pages are opened with every host name unresolvable and a dead proxy, so anything a page tried
to fetch from the network would fail: a report that renders here renders offline.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]


def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium)")
    return exe


def _run(url: str, *args: str, offline: bool = True, budget_ms: int = 10000, timeout: float = 120) -> str:
    with tempfile.TemporaryDirectory(prefix="modelyard-chromium-") as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
               "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
               "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", *(OFFLINE if offline else []), *args, url]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def dump_dom(url: str, **kw) -> str:
    return _run(url, "--dump-dom", **kw)


def screenshot(url: str, png: Path, width: int = 1100, height: int = 4000, **kw) -> Path:
    _run(url, f"--screenshot={png}", f"--window-size={width},{height}", **kw)
    assert png.stat().st_size > 10_000
    return png


def body_attrs(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body))


def chart_data(dom: str) -> dict:
    m = re.search(r'<script type="application/json" id="modelyard-charts">(.*?)</script>', dom, re.S)
    return json.loads(m.group(1))


def rendered(path: Path) -> tuple[dict, dict]:
    """Open a report offline: (its <body> attributes, the numbers behind its charts), checking that
    every chart's image loaded with a non-zero size."""
    dom = dump_dom(path.resolve().as_uri())
    attrs, data = body_attrs(dom), chart_data(dom)
    assert attrs.get("data-charts-ok") == "true", attrs
    assert int(attrs["data-charts-rendered"]) == int(attrs["data-charts-expected"]) == len(data["charts"]) > 0
    assert dom.count('data-rendered="true"') == len(data["charts"])
    return attrs, data
