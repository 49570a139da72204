"""What `run` prints at the end and what `inspect` shows: read from the manifest and the parts."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from rich.console import Console
from rich.table import Table

from modelyard.commit import ERRORS, read_manifest
from modelyard.errors import UserError


def load_manifest(output: str) -> dict[str, Any]:
    m = read_manifest(output)
    if m is None:
        raise UserError(f"{output}: no _manifest.json here: not a committed modelyard output (or a partitioned "
                        "dataset: name the partition folder)")
    return m


def stage_table(manifest: dict[str, Any]) -> Table:
    t = Table(title="stages")
    for c in ("stage", "model", "kind", "ran", "skip", "err", "cached", "tokens in/out", "rows/s", "tok/s",
              "p50/p95 ms"):
        t.add_column(c, justify="left" if c in ("stage", "model", "kind") else "right", no_wrap=True)
    for name, s in manifest["stages"].items():
        t.add_row(name, s["model"], s["kind"], str(s["ran"]), str(s["skipped"]), str(s["errors"]), str(s["cached"]),
                  f"{s['prompt_tokens']}/{s['completion_tokens']}", f"{s['rows_per_s']:.1f}",
                  f"{s['tokens_per_s']:.0f}", f"{_ms(s.get('latency_ms_p50'))}/{_ms(s.get('latency_ms_p95'))}")
    return t


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def print_summary(console: Console, manifest: dict[str, Any]) -> None:
    console.print(stage_table(manifest))
    errors = manifest["errors"]["rows"]
    console.print(f"committed {manifest['rows']} rows in {len(manifest['files'])} file(s) "
                  f"in {manifest['timing']['wall_s']:.1f} s, {errors} stage error(s)")
    if errors:
        console.print(f"errors: {posixpath.join(manifest['output']['uri'], ERRORS)}")
    console.print(f"output: {manifest['output']['uri']}")


def print_manifest(console: Console, output: str) -> None:
    m = load_manifest(output)
    console.print(f"[bold]{m['job']}[/]  run {m['run_id']}  committed {m['timing']['committed']}")
    console.print(f"config {m['config']['path']} sha256 {m['config']['sha256'][:16]}…  params {m['params']}")
    console.print(f"input {m['input']['uri']} ({m['input']['rows']} rows, {m['input']['shards']} shards, "
                  f"fingerprint {m['input']['fingerprint'][:16]}…)")
    t = Table(title="models")
    for c in ("name", "model", "revision", "engine", "served by"):
        t.add_column(c)
    for n, x in m["models"].items():
        t.add_row(n, x["model"], str(x["revision"]), str(x["engine_version"]),
                  "managed" if x["managed"] else ", ".join(x["endpoints"]))
    console.print(t)
    console.print(stage_table(m))
    ft = Table(title="files")
    for c in ("path", "rows", "bytes", "sha256"):
        ft.add_column(c)
    for f in m["files"]:
        ft.add_row(f["path"], str(f["rows"]), str(f["bytes"]), f["sha256"][:16] + "…")
    console.print(ft)
    console.print(f"errors: {m['errors']['rows']} in {m['errors']['path']}")


def find_row(output: str, key: str) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    """(manifest, the row, its error records) for a row key, reading only the listed parts."""
    m = load_manifest(output)
    fs, base = url_to_fs(output)
    for f in m["files"]:
        with fs.open(posixpath.join(base, f["path"]), "rb") as fh:
            table = pq.read_table(fh, filters=[("_row_key", "=", key)])
        if table.num_rows:
            row = table.slice(0, 1).to_pylist()[0]
            errors = []
            ep = posixpath.join(base, ERRORS)
            if fs.exists(ep):
                with fs.open(ep, "rb") as fh:
                    et = pq.read_table(fh)
                errors = et.filter(pc.equal(et.column("_row_key"), pa.scalar(key))).to_pylist()
            return m, row, errors
    raise UserError(f"{output}: no row with key {key!r}")


def print_row(console: Console, output: str, key: str) -> None:
    m, row, errors = find_row(output, key)
    lineage = row.pop("_lineage")
    console.print(f"[bold]row {key}[/]  from {row.pop('_source')}  run {row.pop('_run_id')}")
    row.pop("_row_key")
    outputs = {s["output"] for s in m["stages"].values()}
    console.print("input: " + json.dumps({k: v for k, v in row.items() if k not in outputs}, default=str)[:2000])
    for name, rec in lineage.items():
        s = m["stages"][name]
        value = row.get(s["output"])
        if isinstance(value, list) and len(value) > 8:
            value = f"[{', '.join(f'{x:.4f}' for x in value[:8])}, …] ({len(value)} values)"
        console.print(f"\n[bold]stage {name}[/] → {s['output']} = {value!r}", highlight=False)
        for k, v in rec.items():
            console.print(f"  {k}: {v}", highlight=False)
        console.print(f"  prompt template: {s['prompt']!r}", highlight=False)
        console.print(f"  params: {json.dumps(s['params'])}  constraint: {json.dumps(s['constraint'])[:200]}",
                      highlight=False)
    for e in errors:
        console.print(f"\n[red]error in {e['stage']}[/]: {e['error']}\n  raw: {e['raw']!r}", highlight=False)
