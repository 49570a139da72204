"""The run in pictures: ``_report.html`` in every committed output, the same charts in the Prefect UI,
and ``modelyard report`` to redraw them or compare a backfill's partitions.

What the charts draw comes from the committed output alone: the manifest (statistics, and its
``telemetry`` section sampled during the run by ``modelyard.telemetry``) and the parts
(distributions, read in bounded memory), so any committed output can be redrawn later.
"""

from __future__ import annotations

import logging
import posixpath
import threading
from typing import Any

from fsspec.core import url_to_fs

from modelyard.charts.scan import Source
from modelyard.commit import REPORT
from modelyard.errors import UserError

log = logging.getLogger("modelyard")
_LAST: dict[str, Any] = {}  # the images of the last report drawn at a commit, for its Prefect artifact
_WARMING: list[threading.Thread] = []


def warm_up() -> None:
    """Load the drawing stack in a thread of its own, once per process: matplotlib's import and a
    first figure take about half a second here, which a run otherwise pays after its commit. The
    flow calls this when it is about to wait for its servers to start."""
    if _WARMING:
        return

    def load() -> None:
        try:
            import pyarrow as pa

            from modelyard.charts.draw import warm
            from modelyard.charts.scan import numbers

            numbers(pa.array([0.0]))  # pyarrow's to_numpy imports pandas, a quarter of a second here
            warm()
        except Exception as e:  # noqa: BLE001 - the report draws (or warns) at the commit as before
            log.debug("charts: warm-up failed: %s", e)

    _WARMING.append(threading.Thread(target=load, name="modelyard-charts-warm-up", daemon=True))
    _WARMING[0].start()


def render(sources: list[Source]) -> tuple[str, dict[str, Any], dict[str, bytes]]:
    """(title, chart data, PNG per chart id) for one output or several partitions."""
    from modelyard.charts.data import build
    from modelyard.charts.draw import png

    for thread in _WARMING:  # one thread draws at a time: no first figure of two threads at once
        thread.join()

    report = build(sources)
    images = {c["id"]: png(c) for c in report["charts"]}
    job = sources[0].manifest["job"]
    if len(sources) > 1:
        title = f"{job}: {len(sources)} partitions side by side"
    else:
        title = job if sources[0].label == job else f"{job}: {sources[0].label}"
    return title, report, images


def page_html(sources: list[Source]) -> str:
    from modelyard.charts.page import html

    return html(*render(sources))


def label_of(manifest: dict) -> str:
    partition = manifest["output"].get("partition")
    return posixpath.basename(manifest["output"]["uri"].rstrip("/")) if partition else manifest["job"]


def write_report(output: str, manifest: dict) -> None:
    """Draw ``_report.html`` into a just-committed output; a failure only warns (the data is committed,
    and ``modelyard report OUTPUT`` draws it again)."""
    from modelyard.charts.page import html
    from modelyard.staging import write_bytes_atomic

    try:
        fs, folder = url_to_fs(output)
        title, report, images = render([Source(label_of(manifest), manifest, fs, folder)])
        write_bytes_atomic(fs, posixpath.join(folder, REPORT), html(title, report, images).encode())
        _LAST.clear()
        _LAST.update(run_id=manifest["run_id"], title=title, report=report, images=images)
    except Exception as e:  # noqa: BLE001 - a picture never fails a run
        log.warning("could not draw %s in %s: %s: %s", REPORT, output, type(e).__name__, e)


def artifact_markdown(manifest: dict) -> str:
    """The report as markdown for the run's Prefect artifact (drawn again if not the last commit's)."""
    from modelyard.charts.page import markdown

    if _LAST.get("run_id") == manifest["run_id"]:
        return markdown(_LAST["title"], _LAST["report"], _LAST["images"])
    fs, folder = url_to_fs(manifest["output"]["uri"])
    return markdown(*render([Source(label_of(manifest), manifest, fs, folder)]))


def sources_for(outputs: list[str], partitions: bool = False) -> list[Source]:
    """Committed outputs to draw: each OUTPUT, or the committed partitions under it."""
    from modelyard.commit import MANIFEST, read_manifest

    found: list[Source] = []
    for out in outputs:
        fs, root = url_to_fs(out)
        root = root.rstrip("/")
        m = None if partitions else read_manifest(out)
        if m is not None:
            found.append(Source(label_of(m) if len(outputs) == 1 else _short(out), m, fs, root))
            continue
        manifests = sorted(fs.glob(f"{root}/*/{MANIFEST}")) or sorted(fs.glob(f"{root}/*/*/{MANIFEST}"))
        if not manifests:
            raise UserError(f"{out}: no _manifest.json here or in the partition folders beneath it: "
                            "not a committed modelyard output")
        for path in manifests:
            folder = posixpath.dirname(path)
            m = read_manifest(_join(out, posixpath.relpath(folder, root)))
            found.append(Source(posixpath.relpath(folder, root), m, fs, folder))
    jobs = {s.manifest["job"] for s in found}
    if len(jobs) > 1:
        raise UserError(f"the outputs come from different jobs ({', '.join(sorted(jobs))}): compare one job's partitions")
    return found


def _short(out: str) -> str:
    return posixpath.basename(out.rstrip("/")) or out


def _join(uri: str, rel: str) -> str:
    return uri.rstrip("/") + "/" + rel


def default_path(outputs: list[str]) -> str:
    """Where `modelyard report` writes: _report.html in the one folder named, else in the current folder."""
    if len(outputs) == 1:
        return _join(outputs[0], REPORT)
    return "modelyard-report.html"


def write(outputs: list[str], path: str | None = None, partitions: bool = False) -> tuple[str, list[Source]]:
    sources = sources_for(outputs, partitions)
    target = path or default_path(outputs)
    from modelyard.staging import write_bytes_atomic

    fs, p = url_to_fs(target)
    write_bytes_atomic(fs, p, page_html(sources).encode())
    return target, sources
