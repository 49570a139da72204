"""Run it like production: a real `prefect server`, a real process worker, deploy, backfill,
artifacts read back through Prefect's API, partitions on disk, OpenLineage events validated, and a
deployment run with a managed server cancelled through Prefect's API.

The process worker turns a SIGTERM into a SIGINT to itself and stops on that; a process started
with SIGINT ignored (what a non-interactive shell does to a job it puts in the background, such as
a CI step or `make test &`) passes the ignored SIGINT on to the worker, which then never stops: it
keeps polling, and once the session's Prefect server is gone, logs connection errors with back-off
up to 60 s. The worker here is started with SIGINT restored, so SIGTERM stops it in about 1.5 s."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
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
    (tmp / "data" / "managed.jsonl").write_text("".join(json.dumps({"id": k, "text": f"ticket {k}"}) + "\n"
                                                        for k in range(200)))
    managed = tmp / "managed.yaml"
    managed.write_text(f"""
name: prod-managed
input: {{uri: "{tmp}/data/managed.jsonl", key: id}}
shard_rows: 50
models:
  tiny: {{model: builtin:tiny-llama, serve: {{max_model_len: 512, max_num_seqs: 16}}}}
stages:
  - {{name: gen, model: tiny, prompt: "{{{{ text }}}}", params: {{max_tokens: 16, temperature: 0}}, output: y}}
output: {{uri: "{tmp}/managed-out"}}
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
  - name: prod-managed
    entrypoint: flows/pipeline.py:run_pipeline
    work_pool: {{name: {pool}}}
    parameters: {{config: "{managed}"}}
""")
    env = {"PREFECT_API_URL": prefect_server}
    r = run_cli("deploy", str(tmp / "prefect.yaml"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"created process work pool '{pool}'" in r.stdout
    worker_env = {**os.environ, **env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", pool],
                              cwd=ROOT, env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=_sigint_restored)
    yield {"tmp": tmp, "cfg": cfg, "env": env, "name": "modelyard-pipeline/prod-daily"}
    t0 = time.monotonic()
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        pytest.fail(f"the process worker did not stop within 30 s of SIGTERM:\n{(tmp / 'worker.log').read_text()[-3000:]}")
    finally:
        log.close()
    print(f"process worker stopped {time.monotonic() - t0:.1f} s after SIGTERM")


def _sigint_restored() -> None:
    """In the worker's process: SIGINT back to its default, whatever the test runner inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def test_a_deployment_run_cancelled_through_the_api_ends_cancelled_with_its_servers_stopped(project, prefect_server):
    """Cancel from Prefect's API while the run's managed server starts: the worker delivers it as a
    SIGTERM, the flow process stops its server at once and the run ends Cancelled."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        run = run_deployment("modelyard-pipeline/prod-managed", timeout=0)
        seen: dict[int, tuple[float, str]] = {}
        deadline = time.monotonic() + 300
        with get_client(sync_client=True) as client:
            while not any("_vllm_server.py" in cmd for _, cmd in seen.values()):
                fr = client.read_flow_run(run.id)
                assert time.monotonic() < deadline and not fr.state.is_final(), fr.state
                pid = int(str(fr.infrastructure_pid).rsplit(":", 1)[-1]) if fr.infrastructure_pid else None
                if pid:
                    try:
                        for k in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                            seen[k.pid] = (k.create_time(), " ".join(k.cmdline()))
                    except psutil.Error:
                        pass
                time.sleep(0.2)
            t0 = time.monotonic()
            client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"))
            while not (fr := client.read_flow_run(run.id)).state.is_final():
                assert time.monotonic() - t0 < 120, fr.state
                time.sleep(0.2)
            took = time.monotonic() - t0
    assert fr.state.type.value == "CANCELLED", fr.state
    plan = _artifact(prefect_server, run.id, "prod-managed-gpu-plan")
    assert "| 1 | 0:gen | tiny | 0 | CPU | CPU |" in plan and "KV cache 0.06 GiB, given to vLLM" in plan
    left = []
    for _ in range(50):
        left = [cmd[:160] for p, (c, cmd) in seen.items() if _running(psutil, p, c)]
        if not left:
            break
        time.sleep(0.1)
    print(f"cancelled through the API: Cancelled after {took:.1f} s")
    assert left == []
    assert not (project["tmp"] / "managed-out").exists()


def _artifact(prefect_server: str, run_id, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [run_id]}))
    return next(a.data for a in arts if a.key == key)


def _running(psutil, pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_cli_run_cancelled_through_the_api_ends_cancelled_with_its_servers_stopped(prefect_server, tmp_path):
    """`modelyard run` against a Prefect server, no worker: it watches its own flow run, and a cancel
    from the API (or the UI) stops it within seconds, its servers too, and the run ends Cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    from tests.test_placement import _alive, _descendants, _sigterm_config

    cfg = _sigterm_config(tmp_path, "cli-cancel")
    log = tmp_path / "run.log"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("modelyard")), "run", str(cfg), "--param",
                             "date=2026-11-27"], cwd=ROOT, env={**os.environ, "PREFECT_API_URL": prefect_server},
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115
    seen: dict = {}
    deadline = time.monotonic() + 300
    while not ("Beginning flow run" in log.read_text() and any("_vllm_server.py" in c for _, c in seen.values())):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        seen.update(_descendants(proc.pid))
        time.sleep(0.1)
    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["cli-cancel-2026-11-27"])))
        t0 = time.monotonic()
        client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"))
        while proc.poll() is None and time.monotonic() - t0 < 30:
            seen.update(_descendants(proc.pid))
            time.sleep(0.05)
        took = time.monotonic() - t0
        state = client.read_flow_run(run.id).state
    print(f"CLI run cancelled through the API: exit {proc.returncode} after {took:.1f} s, {state.type.value}")
    assert proc.returncode == 143, log.read_text()[-3000:]
    assert took < 10
    assert state.type.value == "CANCELLED", state
    assert "cancelled from Prefect: nothing was committed" in log.read_text()
    for _ in range(30):
        if not _alive(seen):
            break
        time.sleep(0.1)
    assert _alive(seen) == []
