"""Backfills: one run per partition date, idempotent.

Against a deployment, flow runs are created on the Prefect server (scheduled at the partition's
date, tag ``backfill``, an idempotency key per deployment, partition and config, at most
``parallel`` unfinished at once). With a config file, the runs happen here, in order. Either way a
partition already committed by the same config is skipped unless ``force``.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelyard import pipeline
from modelyard.commit import read_manifest, target_uri
from modelyard.config import LoadedConfig
from modelyard.errors import UserError
from modelyard.serving import PROJECT

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Partition:
    date: str
    state: str = "PENDING"
    flow_run: str | None = None
    flow_run_id: Any = None
    rows: int | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def dates(start: str, end: str, every: str = "1d") -> list[str]:
    m = re.fullmatch(r"(\d+)([dw])", every.strip())
    if not m:
        raise UserError(f"--every {every!r}: use a number of days or weeks, like 1d or 1w")
    step = dt.timedelta(days=int(m[1]) * (7 if m[2] == "w" else 1))
    try:
        d0, d1 = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    except ValueError as e:
        raise UserError(f"--start/--end: {e}; use YYYY-MM-DD") from None
    if d1 < d0:
        raise UserError(f"--end {end} is before --start {start}")
    if step.days == 0:
        raise UserError("--every must be at least 1d")
    out, d = [], d0
    while d <= d1:
        out.append(d.isoformat())
        d += step
    return out


def committed_by_same_config(loaded: LoadedConfig) -> dict | None:
    """The partition's manifest when the same config (and params) already committed it."""
    cfg = loaded.config
    m = read_manifest(target_uri(cfg.output.uri, cfg.output.partition))
    if m and m["config"]["sha256"] == loaded.sha256 and m.get("params") == loaded.params:
        return m
    return None


def resolve_config(path: str) -> str:
    """A deployment's config path is relative to the project folder its worker runs in."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return str(p)
    return str(PROJECT / p)


def run_local(config: str, days: list[str], params: dict[str, str], force: bool, on_update=None) -> list[Partition]:
    """Run the partitions one after another in this process."""
    from flows.pipeline import run_pipeline

    parts = [Partition(d) for d in days]
    for part in parts:
        loaded = pipeline.load(config, {**params, "date": part.date}, None)
        done = committed_by_same_config(loaded)
        if done and not force:
            part.state, part.rows, part.note = "SKIPPED", done["rows"], "already committed by this config"
        else:
            part.state = "RUNNING"
            on_update and on_update(parts)
            try:
                m = run_pipeline(config=config, params={**params, "date": part.date})
                part.state, part.rows, part.flow_run_id = "COMPLETED", m["rows"], m["run_id"]
            except Exception as e:  # one failed partition does not stop the others
                part.state, part.note = "FAILED", f"{type(e).__name__}: {e}"[:300]
        on_update and on_update(parts)
    return parts


def run_deployment_backfill(name: str, days: list[str], force: bool, parallel: int, wait: bool,
                            on_update=None, poll: float = 2.0) -> list[Partition]:
    """Create one flow run per partition through the deployment; optionally wait for them."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise UserError(f"deployment {name!r} not found on the Prefect server (give FLOW/DEPLOYMENT, "
                            "e.g. modelyard-pipeline/demo-daily; `prefect deployment ls` lists them)") from None
        base = dict(dep.parameters or {})
        if "config" not in base:
            raise UserError(f"deployment {name!r} has no `config` parameter: it is not a modelyard deployment")
        tz = base.get("timezone") or "UTC"
        config = resolve_config(base["config"])
        parts = [Partition(d) for d in days]
        pending = list(parts)
        running: list[Partition] = []
        nonce = f":force-{int(time.time())}" if force else ""
        while pending or (wait and running):
            for p in list(running):
                state = client.read_flow_run(p.flow_run_id).state
                p.state = state.type.value if state else "UNKNOWN"
                if p.state in FINAL:
                    running.remove(p)
                    if p.state == "COMPLETED":
                        m = committed_by_same_config(pipeline.load(config, _params(base, p.date), None))
                        p.rows = m["rows"] if m else None
            while pending and len(running) < parallel:
                p = pending.pop(0)
                loaded = pipeline.load(config, _params(base, p.date), None)
                done = committed_by_same_config(loaded)
                if done and not force:
                    p.state, p.rows, p.note = "SKIPPED", done["rows"], "already committed by this config"
                    continue
                midnight = dt.datetime.combine(dt.date.fromisoformat(p.date), dt.time(), _zone(tz))
                run = run_deployment(
                    name, parameters={**base, "params": _params(base, p.date)}, scheduled_time=midnight,
                    flow_run_name=f"{loaded.config.name}-{p.date}", tags=["backfill", f"job:{loaded.config.name}"],
                    idempotency_key=f"modelyard-backfill:{dep.id}:{p.date}:{loaded.sha256[:16]}{nonce}",
                    timeout=0)
                p.flow_run, p.flow_run_id = run.name, run.id
                p.state = run.state.type.value if run.state else "SCHEDULED"
                if p.state in FINAL:
                    p.note = "an earlier backfill already ran it"
                else:
                    running.append(p)
            on_update and on_update(parts)
            if not wait and not pending:
                break
            if running or pending:
                time.sleep(poll)
        return parts


def _params(base: dict, date: str) -> dict[str, str]:
    return {**(base.get("params") or {}), "date": date}


def _zone(name: str):
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)
