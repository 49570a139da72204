"""Worker processes that run shards at once split each endpoint's bound (Ray, Dask)."""

from __future__ import annotations

import dataclasses

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
