"""Worker processes that run shards at once split each endpoint's bound (Ray, Dask)."""

from __future__ import annotations

import dataclasses
import os

import pytest
from prefect.task_runners import ThreadPoolTaskRunner

from modelyard.config import parse_config
from modelyard.job import Job, ModelRuntime
from tasks.runners import concurrent_workers

CONFIG = """
name: t
input: {uri: in.jsonl}
models:
  a: {model: x/a, endpoints: ["http://127.0.0.1:9/v1"], max_in_flight: 96}
output: {uri: out}
stages:
  - {name: s, model: a, prompt: "{{ t }}", output: o}
"""


@pytest.mark.parametrize(("workers", "limit"), [(1, 96), (2, 48), (3, 32), (200, 1)])
def test_each_worker_process_gets_its_share_of_the_bound(tmp_path, workers, limit):
    cfg = parse_config(CONFIG, "t.yaml")
    job = Job(config=cfg, base_dir=str(tmp_path), job_key="k", output_root=str(tmp_path / "out"), run_id="r",
              models={"a": ModelRuntime("a", "x/a", "x/a", ["http://127.0.0.1:9/v1"], "-", "-")})
    pool = dataclasses.replace(job, workers=workers).pools()["a"]
    assert pool.limit == limit
    if workers <= 96:  # together never above the endpoint's bound (more workers than that: one each)
        assert pool.limit * workers <= 96


def test_threads_of_one_process_share_its_bound():
    assert concurrent_workers(ThreadPoolTaskRunner(max_workers=4)) == 1


def test_local_ray_workers_report_to_the_runs_temporary_api_server(tmp_path):
    """``modelyard run`` without PREFECT_API_URL runs a temporary API server; its local Ray workers
    report to it rather than each starting one of its own (five API server processes seen for a
    run on two workers before, one now), and the run's task runs are in its database."""
    import sqlite3
    import subprocess
    import sys
    import time

    import yaml

    from benchmarks import _instant

    data = tmp_path / "in.jsonl"
    data.write_text("".join(f'{{"id": {i}, "text": "ticket {i}"}}\n' for i in range(400)))
    with _instant.instant_endpoint(tmp_path / "nginx", dimensions=8) as url:
        cfg = tmp_path / "ray.yaml"
        cfg.write_text(yaml.safe_dump({
            "name": "rayapi", "input": {"uri": str(data), "key": "id"}, "shard_rows": 100,
            "models": {"m": {"model": _instant.CHAT, "endpoints": [url]}},
            "stages": [{"name": "label", "model": "m", "prompt": "{{ text }}", "choice": _instant.CHOICES,
                        "params": {"temperature": 0, "max_tokens": 4}, "output": "label"}],
            "output": {"uri": str(tmp_path / "out")}, "runner": {"kind": "ray", "num_cpus": 2}}))
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
        env.pop("PREFECT_API_URL", None)
        exe = os.path.join(os.path.dirname(sys.executable), "modelyard")
        def api_servers() -> set[str]:
            ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
            return {line.split()[0] for line in ps.splitlines()
                    if "uvicorn" in line and "prefect.server.api.server:create_app" in line}

        before = api_servers()  # other runs' servers (a session's harness) are not this run's
        proc = subprocess.Popen([exe, "run", str(cfg)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        servers: set[str] = set()
        while proc.poll() is None:
            servers |= api_servers() - before
            time.sleep(0.2)
        log = proc.stdout.read()
    assert proc.returncode == 0, log[-3000:]
    assert "committed 400 rows" in log
    assert len(servers) == 1, servers  # the run's own; none in the workers
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as c:
        shard_runs = c.execute("select count(*) from task_run where name like '%shard-%'").fetchone()[0]
    assert shard_runs == 4  # the workers' task runs are in the run's own database
