"""Run it like production: a real `prefect server`, a real process worker, deploy, backfill,
artifacts read back through Prefect's API, partitions on disk, OpenLineage events validated."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.browser import dump_dom, rendered
from tests.conftest import ROOT, run_cli
from tests.report_checks import check_report
from tests.test_openlineage import SPEC, check
from tests.test_openlineage import spec as spec  # noqa: F401,PLC0414  (the validator fixture)

pytestmark = pytest.mark.engine

DATES = ["2026-11-25", "2026-11-26", "2026-11-27"]


@pytest.fixture(scope="module")
def project(servers, prefect_server, tmp_path_factory):
    """A partitioned config on the session's tiny server, deployed with a process worker running."""
    tmp = tmp_path_factory.mktemp("prod")
    tiny = servers["tiny"]
    for i, d in enumerate(DATES):
        p = tmp / "data" / f"dt={d}" / "in.jsonl"
        p.parent.mkdir(parents=True)
        p.write_text("".join(json.dumps({"id": f"{d}-{k}", "text": f"ticket {k} of {d}"}) + "\n"
                             for k in range(20 + 5 * i)))
    cfg = tmp / "daily.yaml"
    cfg.write_text(f"""
name: prod-daily
input: {{uri: "{tmp}/data/dt={{date}}/in.jsonl", key: id}}
shard_rows: 10
models:
  tiny: {{model: "{tiny.served_name}", endpoints: ["{tiny.url}"]}}
stages:
  - {{name: classify, model: tiny, prompt: "Classify {{{{ text }}}}", choice: [a, b, c],
      params: {{temperature: 0, max_tokens: 4}}, output: label}}
  - {{name: extract, model: tiny, when: "label == 'a'", prompt: "JSON {{{{ text }}}}",
      json_schema: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}},
      params: {{temperature: 0, max_tokens: 16}}, output: info}}
output: {{uri: "{tmp}/out", partition: "dt={{date}}"}}
""")
    pool = f"test-pool-{uuid.uuid4().hex[:6]}"
    (tmp / "prefect.yaml").write_text(f"""
name: modelyard-test
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{{{ $MODELYARD_PROJECT_DIR }}}}"
deployments:
  - name: prod-daily
    entrypoint: flows/pipeline.py:run_pipeline
    work_pool: {{name: {pool}}}
    parameters: {{config: "{cfg}", timezone: Europe/Berlin}}
    schedules: [{{cron: "30 2 * * *", timezone: Europe/Berlin, active: false}}]
""")
    env = {"PREFECT_API_URL": prefect_server}
    r = run_cli("deploy", str(tmp / "prefect.yaml"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"created process work pool '{pool}'" in r.stdout
    worker_env = {**os.environ, **env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", pool],
                              cwd=ROOT, env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield {"tmp": tmp, "cfg": cfg, "env": env, "name": "modelyard-pipeline/prod-daily"}
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=60)
    log.close()


def flow_runs(prefect_server: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("modelyard-pipeline/prod-daily")
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep.id]}))
        out = []
        for run in runs:
            arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            out.append((run, arts))
        return out


def test_deploy_backfill_artifacts_and_idempotency(project, prefect_server):
    r = run_cli("backfill", project["name"], "--start", DATES[0], "--end", DATES[-1], "--parallel", "2",
                env=project["env"], timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("COMPLETED") == 3, r.stdout
    runs = flow_runs(prefect_server)
    assert len(runs) == 3
    by_date = {}
    for run, arts in runs:
        assert run.state.type.value == "COMPLETED"
        assert "backfill" in run.tags
        date = run.name.removeprefix("prod-daily-")
        assert run.parameters["params"]["date"] == date
        by_date[date] = (run, arts)
    assert sorted(by_date) == DATES
    for i, d in enumerate(DATES):
        run, arts = by_date[d]
        rows = 20 + 5 * i
        keys = {a.key: a for a in arts}
        assert set(keys) == {"prod-daily-stages", "prod-daily-summary", "prod-daily-output", "prod-daily-progress",
                             "prod-daily-report"}
        kinds = {"table": keys["prod-daily-stages"], "markdown": keys["prod-daily-summary"],
                 "link": keys["prod-daily-output"], "progress": keys["prod-daily-progress"]}
        assert kinds["table"].type == "table" and kinds["progress"].type == "progress"
        table = kinds["table"].data
        table = json.loads(table) if isinstance(table, str) else table
        stages = {row["stage"]: row for row in table}
        assert stages["classify"]["rows"] == rows and stages["classify"]["ran"] == rows
        assert stages["extract"]["ran"] + stages["extract"]["skipped"] == rows
        assert stages["classify"]["model"] == "builtin:tiny-llama" and stages["classify"]["revision"]
        assert stages["classify"]["latency_ms_p95"] >= stages["classify"]["latency_ms_p50"] > 0
        assert f"dt={d}" in kinds["markdown"].data and f"{rows} rows committed" in kinds["markdown"].data
        assert f"/out/dt={d})" in kinds["link"].data  # a link artifact is markdown: [text](link)
        assert float(kinds["progress"].data) == 100.0
        part = project["tmp"] / "out" / f"dt={d}"
        manifest = json.loads((part / "_manifest.json").read_text())
        assert manifest["run_id"] == str(run.id) and manifest["rows"] == rows
        assert pq.read_table(part / "part-00000.parquet").num_rows == rows
        # the run in pictures: the same charts in _report.html and in the report artifact
        _, page = rendered(part / "_report.html")
        report = keys["prod-daily-report"]
        assert report.type == "markdown"
        images = re.findall(r"!\[([\w-]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", report.data)
        assert [i for i, _ in images] == [c["id"] for c in page["charts"]]
        assert check_report(page, {f"dt={d}": part}) == {c["id"] for c in page["charts"]}
    # the Prefect UI draws the artifact's images (its own page is /artifacts/artifact/<id>)
    ui = prefect_server.removesuffix("/api")
    artifact = {a.key: a for a in by_date[DATES[0]][1]}["prod-daily-report"]
    dom = dump_dom(f"{ui}/artifacts/artifact/{artifact.id}", offline=False, budget_ms=20000)
    drawn = re.findall(r'<img[^>]+src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert drawn == [b64 for _, b64 in re.findall(r"!\[([\w-]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)",
                                                   artifact.data)]
    # and `modelyard report` puts the three partitions side by side
    r = run_cli("report", str(project["tmp"] / "out"), "--partitions")
    assert r.returncode == 0 and "3 partitions side by side" in r.stdout, r.stdout + r.stderr
    _, side = rendered(project["tmp"] / "out" / "_report.html")
    parts = {f"dt={d}": project["tmp"] / "out" / f"dt={d}" for d in DATES}
    assert {"throughput-rows", "latency", "output-classify", "shares"} <= check_report(side, parts)
    rows_panel = next(c for c in side["charts"] if c["id"] == "throughput-rows")["panels"][0]
    assert [line["label"] for line in rows_panel["lines"]] == list(parts)

    again = run_cli("backfill", project["name"], "--start", DATES[0], "--end", DATES[-1], env=project["env"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("SKIPPED") == 3
    assert len(flow_runs(prefect_server)) == 3  # the same backfill again creates no run


def test_partition_rerun_replaces_only_its_partition_and_a_failure_keeps_it(project, spec):
    out = project["tmp"] / "out"
    before = {d: json.loads((out / f"dt={d}" / "_manifest.json").read_text())["run_id"] for d in DATES}
    r = run_cli("run", str(project["cfg"]), "--param", f"date={DATES[1]}", env=project["env"])
    assert r.returncode == 0, r.stderr[-2000:]
    after = {d: json.loads((out / f"dt={d}" / "_manifest.json").read_text())["run_id"] for d in DATES}
    assert after[DATES[0]] == before[DATES[0]] and after[DATES[2]] == before[DATES[2]]
    assert after[DATES[1]] != before[DATES[1]]

    # a failing run of that partition (its input turned corrupt) leaves the committed version intact
    src = project["tmp"] / "data" / f"dt={DATES[1]}" / "in.jsonl"
    good = src.read_text()
    files_before = sorted(p.name for p in (out / f"dt={DATES[1]}").iterdir())
    try:
        src.write_text(good + "{not json\n")
        r = run_cli("run", str(project["cfg"]), "--param", f"date={DATES[1]}", env=project["env"])
        assert r.returncode == 2 and "line" in r.stderr and "not valid JSON" in r.stderr
    finally:
        src.write_text(good)
    # and so does a run that fails inside the flow (its model is not served where it says)
    broken = project["tmp"] / "broken.yaml"
    broken.write_text(project["cfg"].read_text().replace('tiny: {model: "', 'tiny: {model: "nope-'))
    r = run_cli("run", str(broken), "--param", f"date={DATES[1]}", env=project["env"])
    assert r.returncode == 2 and "does not serve 'nope-" in r.stderr, r.stderr[-2000:]
    assert json.loads((out / f"dt={DATES[1]}" / "_manifest.json").read_text())["run_id"] == after[DATES[1]]
    assert sorted(p.name for p in (out / f"dt={DATES[1]}").iterdir()) == files_before

    # OpenLineage: the committed partition's START and COMPLETE, and the failed run's FAIL
    events = [json.loads(x) for x in (out / f"dt={DATES[1]}" / "_lineage" / "openlineage.jsonl").read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    for e in events:
        check(e, spec)
    complete = events[1]
    assert complete["outputs"][0]["name"].endswith(f"out/dt={DATES[1]}")
    lineage = complete["outputs"][0]["facets"]["columnLineage"]["fields"]
    assert [f["field"] for f in lineage["label"]["inputFields"]] == ["text"]
    log = [json.loads(x) for x in (project["tmp"] / "_modelyard" / "out" / "openlineage.jsonl").read_text().splitlines()]
    fails = [e for e in log if e["eventType"] == "FAIL"]
    assert fails and "does not serve 'nope-" in fails[-1]["run"]["facets"]["errorMessage"]["message"]
    for e in fails:
        check(e, spec)
    assert SPEC.exists()
