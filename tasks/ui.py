"""What a run shows in the Prefect UI: artifacts and events. Thin wrappers; never fail a run.

- a progress artifact, updated as shards finish;
- a table artifact with one row per stage (model, revision, rows, skipped, errors, cached,
  tokens, rows/s, tokens/s, p50/p95 latency);
- a markdown summary (output location, manifest facts) and a link artifact to the output;
- the run in pictures (``<job>-report``): the charts of ``_report.html`` as markdown images;
- events ``modelyard.stage.finished`` (one per stage) and ``modelyard.run.committed`` for automations.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from uuid import UUID

from modelyard.report import money, stage_note, stage_rows

log = logging.getLogger("modelyard")


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:100]


def tag_run(tags: list[str]) -> None:
    """Add the job, stage and model tags to the running flow run, for filtering runs in the UI.

    Only the flow run: a tag on task runs makes Prefect look up tag-based concurrency limits at
    every task start, and the first lookup for a new set of tags cost up to 2 s here."""
    from prefect import runtime
    from prefect.client.orchestration import get_client

    run_id = runtime.flow_run.id
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, tags=sorted({*(runtime.flow_run.tags or []), *tags}))
    except Exception as e:  # the UI is a view: never fail a run for it
        log.warning("could not tag the flow run: %s", e)


def progress_start(job: str, shards: int, wave: str = "") -> UUID | None:
    from prefect.artifacts import create_progress_artifact

    try:
        return create_progress_artifact(0.0, key=artifact_key(job, "progress"),
                                        description=f"{job}: shards {wave}done out of {shards}")
    except Exception as e:  # the UI is a view: a failed artifact never fails the run
        log.warning("could not create the progress artifact: %s", e)
        return None


def progress_update(artifact_id: UUID | None, done: int, total: int) -> None:
    from prefect.artifacts import update_progress_artifact

    if artifact_id is None:
        return
    try:
        update_progress_artifact(artifact_id, 100.0 * done / max(total, 1))
    except Exception as e:
        log.warning("could not update the progress artifact: %s", e)


def gpu_plan(cfg, plan) -> None:
    """The placement plan of the managed servers (per server its devices and memory share, per wave
    why it starts where it does): logged, and the ``<job>-gpu-plan`` markdown artifact."""
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact

    if not any(m.managed for m in cfg.models.values()):
        return
    get_run_logger().info(plan.describe())
    try:
        create_markdown_artifact(plan.to_markdown(), key=artifact_key(cfg.name, "gpu-plan"),
                                 description=f"{cfg.name}: where each managed vLLM server runs, with "
                                 "which memory share")
    except Exception as e:
        log.warning("could not create the GPU plan artifact: %s", e)


def summary_markdown(manifest: dict[str, Any]) -> str:
    out = manifest["output"]["uri"]
    lines = [
        f"# {manifest['job']}: {manifest['rows']} rows committed",
        "",
        f"- output: `{out}` ({len(manifest['files'])} file(s), manifest `{out.rstrip('/')}/_manifest.json`)",
        f"- partition: `{manifest['output']['partition'] or '-'}`; params: `{manifest['params']}`",
        f"- input: `{manifest['input']['uri']}` ({manifest['input']['rows']} rows in {manifest['input']['shards']} "
        f"shards, fingerprint `{manifest['input']['fingerprint'][:16]}`)",
        f"- config: `{manifest['config']['path']}` sha256 `{manifest['config']['sha256'][:16]}`",
        f"- errors: {manifest['errors']['rows']} in `{manifest['errors']['path']}`",
        f"- wall time: {manifest['timing']['wall_s']:.1f} s",
        "",
        "| model | served as | revision | engine |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | `{m['model']}` | `{m['revision']}` | vLLM {m['engine_version']} |"
              for n, m in manifest["models"].items()]
    notes = [(n, stage_note(s)) for n, s in manifest["stages"].items() if s.get("strategy", "single") != "single"]
    if notes:
        lines += ["", "## Cascades, votes and routes", ""] + [f"- **{n}**: {note}" for n, note in notes]
    cost = manifest.get("cost")
    if cost:
        lines += ["", f"## Cost: {money(cost['total'])}", "", "| stage | cost | per row | all rows on the last tier |",
                  "|---|---|---|---|"]
        for n, s in manifest["stages"].items():
            c = s.get("cost") or {}
            lines.append(f"| {n} | {_num(c.get('total'))} | {_num(c.get('per_row'))} | {_num(c.get('all_last_tier'))} |")
        lines += ["", "| model | cost |", "|---|---|"] + [f"| {m} | {_num(c)} |" for m, c in cost["by_model"].items()]
    return "\n".join(lines)


def _num(v) -> str:
    return money(v)


def publish_run(manifest: dict[str, Any]) -> None:
    """The run's table, summary and link artifacts, and its events."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
    from prefect.events import emit_event

    job = manifest["job"]
    try:
        create_table_artifact(stage_rows(manifest), key=artifact_key(job, "stages"),
                              description=f"{job}: per-stage statistics of this run")
        create_markdown_artifact(summary_markdown(manifest), key=artifact_key(job, "summary"),
                                 description=f"{job}: what this run committed")
        uri = manifest["output"]["uri"]
        link = uri if "://" in uri else "file://" + uri
        create_link_artifact(link, link_text=uri, key=artifact_key(job, "output"),
                             description=f"{job}: the committed output")
    except Exception as e:
        log.warning("could not create the run's artifacts: %s", e)
    report_artifact(manifest)
    try:
        for row in (r for r in stage_rows(manifest) if r["level"] == "stage"):
            emit_event(event="modelyard.stage.finished",
                       resource={"prefect.resource.id": f"modelyard.stage.{job}.{row['stage']}",
                                 "prefect.resource.name": f"{job}/{row['stage']}"},
                       payload={**row, "run_id": manifest["run_id"], "params": manifest["params"]})
        emit_event(event="modelyard.run.committed",
                   resource={"prefect.resource.id": f"modelyard.output.{manifest['output']['uri']}",
                             "prefect.resource.name": job},
                   payload={"run_id": manifest["run_id"], "rows": manifest["rows"], "errors": manifest["errors"]["rows"],
                            "output": manifest["output"]["uri"], "params": manifest["params"]})
    except Exception as e:
        log.warning("could not emit the run's events: %s", e)


def report_artifact(manifest: dict[str, Any]) -> None:
    """The charts of the run's ``_report.html`` as a markdown artifact (the Prefect UI renders its images)."""
    from prefect.artifacts import create_markdown_artifact

    from modelyard.charts import artifact_markdown

    job = manifest["job"]
    try:
        create_markdown_artifact(artifact_markdown(manifest), key=artifact_key(job, "report"),
                                 description=f"{job}: the run in pictures (as in _report.html)")
    except Exception as e:  # the UI is a view: never fail a run for it
        log.warning("could not create the report artifact: %s", e)
