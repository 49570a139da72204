"""The benchmarks run (each with --quick) and end with their one-line summary.

They assert nothing about speed: only that each script ran to the end and printed its last line
in the documented format, with positive numbers.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
LAST_LINES = {
    "throughput.py": rf"ratio_vs_raw={NUMBER} ratio_vs_run_batch={NUMBER} peak_rss_mb={NUMBER} "
                     rf"cpu_ratio_vs_raw={NUMBER}",
    "memory.py": rf"rows=([0-9]+) peak_rss_mb={NUMBER} rss_ratio_vs_100k={NUMBER}",
    "overlap.py": rf"overlap_ratio={NUMBER}",
    "orchestrator.py": rf"chat_rows_s={NUMBER} chat_ratio_vs_bare={NUMBER} embed_rows_s={NUMBER} "
                       rf"cached_rows_s={NUMBER} peak_rss_mb={NUMBER}",
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", sorted(LAST_LINES))
def test_benchmark_quick(script, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, f"{script} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(LAST_LINES[script], last)
    assert m, f"{script}: unexpected last line {last!r}"
    assert all(float(g) > 0 for g in m.groups()), last


def test_cascade_benchmark_quick(servers, small_server):
    """On the session's two generative servers (no server of its own)."""
    urls = f"small={servers['tiny'].url},big={small_server.url}"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cascade.py"), "--quick", "--endpoints", urls],
                       cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, f"cascade.py exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(rf"small_acc={NUMBER} big_acc={NUMBER} best_cascade_acc={NUMBER} "
                     rf"best_cascade_cost_vs_big={NUMBER} escalated=(\S+)", last)
    assert m, f"cascade.py: unexpected last line {last!r}"
