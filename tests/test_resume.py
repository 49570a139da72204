"""Nothing lost, nothing paid twice: SIGKILL and resume, the request cache, engine faults, bad data.

Requests are counted with the vLLM server's own /metrics counters.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, requests_served, run_cli, vllm_process

pytestmark = pytest.mark.engine

ROWS = 200


def make_config(tmp_path: Path, server, *, cache: bool, extract_prompt: str = "Extract as JSON: {{ text }}",
                shard_rows: int = 40, name: str = "resume") -> Path:
    data = tmp_path / "in.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"id": f"r{i:04d}", "text": f"ticket number {i} about billing"}) + "\n"
                                for i in range(ROWS)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: {name}
input: {{uri: "{data}", key: id}}
shard_rows: {shard_rows}
parallel_shards: 1
models:
  tiny: {{model: "{server.served_name}", endpoints: ["{server.url}"]}}
stages:
  - name: classify
    model: tiny
    prompt: "Classify: {{{{ text }}}}"
    choice: [billing, bug, feature, other]
    params: {{temperature: 0, max_tokens: 8}}
    output: label
  - name: extract
    model: tiny
    when: "label in ['bug', 'billing']"
    prompt: "{extract_prompt}"
    json_schema: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    params: {{temperature: 0, max_tokens: 24}}
    output: details
  - name: tag
    model: tiny
    prompt: "Tag {{{{ label }}}}"
    regex: "[a-z]{{3}}"
    params: {{temperature: 0, max_tokens: 6}}
    output: tag
output: {{uri: "{tmp_path / 'out'}"}}
cache: {{enabled: {str(cache).lower()}}}
""")
    return cfg


def sent(rows: list[dict]) -> int:
    """Requests that reached the server for these rows: attempts of every stage not served from the cache."""
    return sum(rec["attempts"] for r in rows for rec in r["_lineage"].values() if not rec["cached"])


def read_output(out: Path):
    return ds.dataset(out, format="parquet").to_table()


def calls(rows: list[dict]) -> int:
    """Requests a set of output rows needed: one per stage that was not skipped."""
    return sum(1 for r in rows for rec in r["_lineage"].values() if not rec["skipped"])


@pytest.mark.parametrize("point, shards_done", [("reply:classify:100", 2), ("shard-done:2", 2), ("merge:2", 5)])
def test_sigkill_then_resume(servers, prefect_server, tmp_path, point, shards_done):
    tiny = servers["tiny"]
    cfg = make_config(tmp_path, tiny, cache=False)
    env = {"PREFECT_API_URL": prefect_server}
    m0 = requests_served(tiny)
    r = run_cli("run", str(cfg), env={**env, "MODELYARD_FAILPOINT": point})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing partial is visible
    m1 = requests_served(tiny)
    r = run_cli("run", str(cfg), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m2 = requests_served(tiny)
    table = read_output(tmp_path / "out")
    keys = table.column("_row_key").to_pylist()
    assert len(keys) == len(set(keys)) == ROWS and keys == [f"r{i:04d}" for i in range(ROWS)]
    rows = table.to_pylist()
    # the resumed run sent exactly the requests of the shards that were not committed
    not_done = [r for r in rows if r["_source"]["shard"] >= shards_done]
    print(f"killed at {point}: first run sent {m1 - m0} requests, the resume sent {m2 - m1} "
          f"(a full run needs {calls(rows)})")
    assert m2 - m1 == calls(not_done), (m2 - m1, calls(not_done))
    assert m1 - m0 >= calls([r for r in rows if r["_source"]["shard"] < shards_done])
    # rows of committed shards keep the run that made them; the others carry the resuming run
    assert len({r["_run_id"] for r in rows}) == (1 if shards_done == 5 else 2)


def test_prefect_flow_run_retry_resumes_a_killed_run(servers, prefect_server, tmp_path):
    """The machine dies (SIGKILL after 2 of 5 shards); something marks the run crashed (as a
    heartbeat automation would); `prefect flow-run retry` runs it again with its own parameters,
    and it resumes: only the 3 unfinished shards' requests reach the server."""
    import re
    import subprocess
    import sys

    import httpx

    tiny = servers["tiny"]
    cfg = make_config(tmp_path, tiny, cache=False, name="retried")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    r = run_cli("run", str(cfg), env={**env, "MODELYARD_FAILPOINT": "shard-done:2"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", r.stderr)[1]
    flow_run = httpx.get(f"{prefect_server}/flow_runs/{run_id}").json()
    assert flow_run["state"]["type"] == "RUNNING"  # nobody told the server the process died
    httpx.post(f"{prefect_server}/flow_runs/{run_id}/set_state",
               json={"state": {"type": "CRASHED", "name": "Crashed", "message": "process killed"},
                     "force": True}).raise_for_status()
    m1 = requests_served(tiny)
    prefect = Path(sys.executable).with_name("prefect")
    p = subprocess.run([str(prefect), "flow-run", "retry", run_id, "--entrypoint", "flows/pipeline.py:run_pipeline"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert httpx.get(f"{prefect_server}/flow_runs/{run_id}").json()["state"]["type"] == "COMPLETED"
    rows = read_output(tmp_path / "out").to_pylist()
    keys = [r["_row_key"] for r in rows]
    assert len(keys) == len(set(keys)) == ROWS
    not_done = [r for r in rows if r["_source"]["shard"] >= 2]
    print(f"prefect flow-run retry re-sent {requests_served(tiny) - m1} requests")
    assert requests_served(tiny) - m1 == calls(not_done)


def test_unchanged_rerun_sends_nothing_and_a_prompt_change_only_that_stage(servers, prefect_harness, tmp_path):
    from flows.pipeline import run_pipeline

    tiny = servers["tiny"]
    cfg = make_config(tmp_path, tiny, cache=True)
    m0 = requests_served(tiny)
    t0 = time.perf_counter()
    first = run_pipeline(config=str(cfg))
    t_first = time.perf_counter() - t0
    m1 = requests_served(tiny)
    rows = read_output(tmp_path / "out").to_pylist()
    # identical requests within the run (e.g. the 'tag' stage's few distinct prompts) are cached too
    assert m1 - m0 == sent(rows) < calls(rows)
    assert first["stages"]["classify"]["cached"] == 0

    t0 = time.perf_counter()
    again = run_pipeline(config=str(cfg))
    t_again = time.perf_counter() - t0
    m2 = requests_served(tiny)
    assert m2 - m1 == 0
    rows2 = read_output(tmp_path / "out").to_pylist()
    for a, b in zip(rows, rows2):
        assert (a["label"], a["details"], a["tag"]) == (b["label"], b["details"], b["tag"])
        for rec in b["_lineage"].values():
            assert rec["skipped"] or (rec["cached"] and rec["attempts"] == 0)
    assert again["stages"]["classify"]["cached"] == ROWS
    print(f"unchanged re-run: {t_again:.1f} s vs first {t_first:.1f} s ({t_again / t_first:.2f})")

    cfg = make_config(tmp_path, tiny, cache=True, extract_prompt="Now extract as JSON: {{ text }}")
    changed = run_pipeline(config=str(cfg))
    m3 = requests_served(tiny)
    extract_calls = sum(1 for r in rows2 if not r["_lineage"]["extract"]["skipped"])
    assert extract_calls > 0
    assert m3 - m2 == extract_calls == sent(read_output(tmp_path / "out").to_pylist())  # the rest: cache
    assert changed["stages"]["classify"]["cached"] == ROWS
    assert changed["stages"]["extract"]["cached"] == 0

    r = run_cli("cache", "info", str(cfg))
    assert r.returncode == 0 and tiny.served_name in r.stdout
    r = run_cli("cache", "prune", str(cfg), "--model", tiny.served_name)
    assert r.returncode == 0 and int(r.stdout.split("pruned ")[1].split()[0]) >= ROWS + extract_calls
    r = run_cli("cache", "info", str(cfg))
    assert r.returncode == 0 and tiny.served_name not in r.stdout


def test_retry_errors_resends_only_failed_requests(servers, prefect_harness, prefect_server, tmp_path):
    """Rows that failed (here: a schema the tiny model cannot satisfy in 3 tokens) are re-sent;
    everything else comes from the cache."""
    from flows.pipeline import run_pipeline

    tiny = servers["tiny"]
    cfg = make_config(tmp_path, tiny, cache=True, name="retry")
    text = cfg.read_text().replace("max_tokens: 24", "max_tokens: 3")
    cfg.write_text(text)
    run_pipeline(config=str(cfg))
    failed = pq.read_table(tmp_path / "out" / "_errors" / "errors.parquet").num_rows
    assert failed > 0
    m0 = requests_served(tiny)
    r = run_cli("run", str(cfg), "--retry-errors", env={"PREFECT_API_URL": prefect_server}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{failed} stage error(s)" in r.stderr
    assert requests_served(tiny) - m0 == failed


def test_retry_truncated_resends_replies_cut_at_max_tokens(servers, prefect_harness, prefect_server, tmp_path):
    """--retry-truncated: replies that stopped at max_tokens (and failed ones) are asked again,
    everything else comes from the cache; the vLLM server's own counters say how many."""
    from flows.pipeline import run_pipeline

    tiny = servers["tiny"]
    cfg = make_config(tmp_path, tiny, cache=True, name="truncated")
    text = cfg.read_text()
    assert '    regex: "[a-z]{3}"\n' in text
    cfg.write_text(text.replace('    regex: "[a-z]{3}"\n', ""))  # `tag`: free text cut at 6 tokens
    run_pipeline(config=str(cfg))
    rows = read_output(tmp_path / "out").to_pylist()
    cut = sum(1 for r in rows for rec in r["_lineage"].values() if rec["finish_reason"] == "length")
    failed = sum(1 for r in rows for rec in r["_lineage"].values() if rec["error"] and rec["attempts"])
    assert sum(r["_lineage"]["tag"]["finish_reason"] == "length" for r in rows) > ROWS // 2
    m0 = requests_served(tiny)
    r = run_cli("run", str(cfg), "--retry-truncated", env={"PREFECT_API_URL": prefect_server}, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "truncated replies are re-sent too" in r.stderr
    assert requests_served(tiny) - m0 == cut + failed
    again = read_output(tmp_path / "out").to_pylist()
    assert len(again) == ROWS
    for r in again:  # a reply that stopped on its own comes from the cache; one that was cut is asked again
        for name in ("classify", "tag"):
            rec = r["_lineage"][name]
            if not rec["error"]:
                assert rec["cached"] == (rec["finish_reason"] != "length"), (name, rec)


def test_managed_server_killed_mid_run_is_restarted(servers, prefect_harness, tmp_path, monkeypatch):
    """SIGKILL the real vLLM process of a managed model in the middle of a run: the watchdog
    restarts it on the same port, in-flight requests wait and are retried, every row is served."""
    from flows.pipeline import run_pipeline
    from modelyard.progress import TRACKER

    monkeypatch.chdir(ROOT)
    tiny = servers["tiny"]
    old_pid = vllm_process(tiny).pid
    killed = threading.Event()

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            c = TRACKER.counters.get("classify")
            if c is not None and c.rows >= 60:
                os.kill(old_pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.2)

    TRACKER.reset([], 0, 0)  # counts of earlier runs must not trigger the kill
    threading.Thread(target=killer, daemon=True).start()
    out = tmp_path / "out"
    manifest = run_pipeline(config="configs/demo.yaml", params={"date": "2026-11-27"}, output=str(out))
    assert killed.is_set()
    table = read_output(out)
    assert table.num_rows == 300 and len(set(table.column("_row_key").to_pylist())) == 300
    assert manifest["stages"]["classify"]["errors"] == 0 and manifest["stages"]["reply"]["errors"] == 0
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    assert vllm_process(tiny).pid != old_pid and tiny.alive()
    attempts = [rec["attempts"] for lin in table.column("_lineage").to_pylist() for rec in lin.values()]
    assert max(attempts) >= 2  # some requests were in flight when the server died, and were retried


def test_bad_rows_become_clear_error_rows(servers, prefect_harness, tmp_path):
    from flows.pipeline import run_pipeline

    tiny = servers["tiny"]
    data = tmp_path / "in.jsonl"
    long_text = " ".join(f"word{i}" for i in range(3000))
    rows = [{"id": "ok", "text": "hello"}, {"id": "null", "text": None}, {"id": "empty", "text": "  "},
            {"id": "long", "text": long_text}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: bad-rows
input: {{uri: "{data}", key: id}}
models:
  tiny: {{model: "{tiny.served_name}", endpoints: ["{tiny.url}"]}}
stages:
  - {{name: s, model: tiny, prompt: "{{{{ text }}}}", params: {{max_tokens: 4, temperature: 0}}, output: y}}
output: {{uri: "{tmp_path / 'out'}"}}
""")
    run_pipeline(config=str(cfg))
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    by_key = {r["_row_key"]: r for r in table}
    assert set(by_key) == {"ok", "null", "empty", "long"}
    assert by_key["ok"]["y"] is not None and by_key["ok"]["_lineage"]["s"]["error"] is None
    assert by_key["null"]["_lineage"]["s"]["error"] == "column(s) text are null on this row"
    assert by_key["empty"]["_lineage"]["s"]["error"] == "the rendered prompt is empty"
    err = by_key["long"]["_lineage"]["s"]["error"]
    assert err.startswith("too long: the prompt has") and "1024 tokens (max_model_len)" in err, err
    errors = pq.read_table(tmp_path / "out" / "_errors" / "errors.parquet").to_pylist()
    assert {e["_row_key"] for e in errors} == {"null", "empty", "long"}
