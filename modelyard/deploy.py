"""`modelyard deploy`: register deployments/prefect.yaml with the Prefect server.

It creates the process work pools the file names (no Docker needed), then runs Prefect's own
`prefect deploy --all` from the project folder, with MODELYARD_PROJECT_DIR set so the
deployments' pull step points workers at this checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from modelyard.errors import UserError
from modelyard.serving import PROJECT


def pools_of(prefect_yaml: Path) -> set[str]:
    try:
        spec = yaml.safe_load(prefect_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{prefect_yaml}: {e}") from None
    pools = set()
    for d in spec.get("deployments") or []:
        wp = d.get("work_pool") or {}
        if wp.get("name"):
            pools.add(wp["name"])
    return pools


def ensure_pools(names: set[str]) -> list[str]:
    """Create the process work pools that do not exist yet; returns the ones created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name in sorted(names):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                created.append(name)
    return created


def deploy(prefect_yaml: str | None) -> tuple[list[str], str]:
    if not os.environ.get("PREFECT_API_URL"):
        raise UserError("modelyard deploy registers deployments with a Prefect server: set PREFECT_API_URL "
                        "(for a local one: `prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api)")
    path = Path(prefect_yaml or PROJECT / "deployments" / "prefect.yaml").resolve()
    if not path.is_file():
        raise UserError(f"{path}: no such prefect.yaml")
    created = ensure_pools(pools_of(path))
    prefect = Path(sys.executable).with_name("prefect")
    env = {**os.environ, "MODELYARD_PROJECT_DIR": str(PROJECT)}
    r = subprocess.run([str(prefect), "--no-prompt", "deploy", "--all", "--prefect-file", str(path)],
                       cwd=PROJECT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"prefect deploy failed for {path}:\n{(r.stdout + r.stderr)[-3000:]}")
    return created, r.stdout
