"""The run in pictures, without a model: the telemetry recorder, the page drawn from real Parquet
parts and a manifest with cascade, vote and route stages, opened offline in headless Chromium,
and `modelyard report` comparing three partitions."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from modelyard import charts, telemetry
from modelyard.progress import TRACKER
from tests.browser import rendered, screenshot
from tests.conftest import run_cli
from tests.report_checks import check_report
from tests.report_outputs import make_output

DATES = ["2026-11-25", "2026-11-26", "2026-11-27"]


def test_series_stays_bounded_and_evenly_spaced():
    s = telemetry.Series(max_points=50, interval=0.5)
    now, seen = 0.0, {}
    for i in range(300):  # as the sampler does: one sample per interval, and one at the end
        s.add(now, {("stage", "a", "rows"): 3 * i, ("in_flight", "m", "u"): i % 7})
        seen[now] = 3 * i
        now += s.interval if i < 298 else s.interval / 3
    t, values = s.points()
    assert len(t) <= 52 and all(len(v) == len(t) for v in values.values())
    gaps = [b - a for a, b in zip(t, t[1:-1])]
    assert s.interval > 8 and all(g == pytest.approx(s.interval) for g in gaps)  # evenly spaced
    assert 0 < t[-1] - t[-2] < s.interval  # and the newest sample last
    assert t[0] == 0.0 and values[("stage", "a", "rows")][-1] == 3 * 299
    assert values[("stage", "a", "rows")] == [seen[x] for x in t]  # cumulative values kept exact


def test_recorder_samples_the_tracker_and_keeps_the_run_events():
    rec = telemetry.Recorder()
    rec.event("server-start", model="old", port=1)
    rec.event("server-healthy", model="old", port=1)  # up before the run: not the run's
    rec.event("server-start", model="slow", port=2)  # still starting when the run begins: the run waited
    time.sleep(0.02)
    TRACKER.reset(["a"], 100, 1)
    rec.begin(interval=0.01)
    stop = threading.Event()

    def work():
        while not stop.is_set():
            TRACKER.record("a", prompt_tokens=3, completion_tokens=1)
            time.sleep(0.001)

    t = threading.Thread(target=work)
    t.start()
    rec.event("server-healthy", model="slow", port=2)
    time.sleep(0.5)
    stop.set()
    t.join()
    snap = rec.snapshot()
    rec.end()
    rows = snap["stages"]["a"]["rows"]
    assert rows[-1] == TRACKER.counters["a"].rows > 0
    assert snap["stages"]["a"]["tokens"][-1] == 4 * rows[-1]
    assert rows == sorted(rows) and snap["t"] == sorted(snap["t"]) and len(snap["t"]) > 5
    assert [(e["kind"], e["model"]) for e in snap["events"]] == [("server-start", "slow"), ("server-healthy", "slow")]
    assert snap["events"][0]["t"] == 0.0 and snap["t"][0] > 0  # the run's time starts at the early server start
    assert len(json.dumps(snap)) < 100_000


def test_page_opens_offline_and_every_chart_is_drawn_from_the_manifest(tmp_path):
    out = tmp_path / "out"
    manifest = make_output(out, rows=600)
    charts.write([str(out)])
    path, _ = charts.write([str(out)])  # a second page in the same process (a served deployment draws many)
    html = (out / "_report.html").read_text()
    assert path.endswith("_report.html") and len(html) < 2_000_000
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing to fetch: no CDN, no server
    _, data = rendered(out / "_report.html")
    ids = {c["id"] for c in data["charts"]}
    assert {"throughput", "in-flight", "latency", "output-classify", "output-extract", "output-embed",
            "together-classify", "together-topic", "together-summary", "cost", "errors", "shares"} <= ids
    assert check_report(data, {"tickets": out}) == ids
    cascade = next(c for c in data["charts"] if c["id"] == "together-classify")
    assert "thresholds 0.800" in cascade["title"]  # the calibration is shown
    cost = next(c for c in data["charts"] if c["id"] == "cost")
    saved = cost["panels"][2]["series"]
    assert [s["values"] for s in saved] == [[manifest["stages"]["classify"]["cost"]["total"]],
                                            [manifest["stages"]["classify"]["cost"]["all_last_tier"]]]
    assert len(data["charts"][0]["events"]) == 4  # server start, healthy, wave, stop are marked
    screenshot((out / "_report.html").resolve().as_uri(), tmp_path / "page.png")


def test_report_command_compares_three_partitions(tmp_path):
    ds = tmp_path / "daily"
    for i, d in enumerate(DATES):
        make_output(ds / f"dt={d}", rows=150 + 50 * i, seed=i, partition="dt={date}")
    r = run_cli("report", str(ds), "--partitions")
    assert r.returncode == 0, r.stderr
    assert "3 partitions side by side" in r.stdout
    _, data = rendered(ds / "_report.html")
    parts = {f"dt={d}": ds / f"dt={d}" for d in DATES}
    assert [x["label"] for x in data["runs"]] == list(parts)
    checked = check_report(data, parts)
    assert {"throughput-rows", "throughput-tokens", "latency", "output-classify", "shares", "errors"} <= checked
    for c in data["charts"]:
        if c["id"].startswith("throughput"):
            assert all([line["label"] for line in p["lines"]] == list(parts) for p in c["panels"])
    label = next(c for c in data["charts"] if c["id"] == "output-classify")["panels"][0]
    assert set(label["values"]) == set(parts) and all(sum(v.values()) > 0 for v in label["values"].values())
    # several OUTPUT arguments do the same
    r = run_cli("report", *map(str, parts.values()), "--out", str(tmp_path / "two.html"))
    assert r.returncode == 0 and (tmp_path / "two.html").exists()


def test_report_command_explains_a_folder_without_output(tmp_path):
    r = run_cli("report", str(tmp_path))
    assert r.returncode == 2 and "no _manifest.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("message,expected", [
    ("too long: the prompt has 1234 tokens, the model's context is 1024 tokens",
     "too long: the prompt has N tokens, the model's context is N tokens"),
    ("", "(empty message)"),
    ("first line 1.5\nsecond", "first line N"),
])
def test_error_reasons_group_messages_that_differ_only_in_numbers(message, expected):
    from modelyard.charts.scan import reason

    assert reason(message) == expected


@pytest.mark.parametrize("values,integer", [([1.0] * 5 + [1.0 + 1e-7], False), ([0.0] * 4, False), ([24] * 3, True)])
def test_a_histogram_of_about_one_value_has_a_readable_range(values, integer):
    import numpy as np

    from modelyard.charts.scan import Hist

    h = Hist(integer=integer)
    h.observe(np.array(values, float))
    h.add("g", np.array(values, float))
    edges, counts = h.edges(), h.result(["g"])["counts"]["g"]
    assert edges[-1] - edges[0] >= 0.09 * max(1.0, abs(values[0])) and len(edges) >= 6
    assert sorted(counts)[-1] == len(values) and 0 < counts.index(len(values)) < len(counts) - 1  # one bar, inside


def test_a_report_that_cannot_be_drawn_only_warns(tmp_path, caplog):
    out = tmp_path / "out"
    manifest = make_output(out, rows=20)
    (out / "part-00000.parquet").write_bytes(b"not parquet")  # the parts went missing or bad after the commit
    with caplog.at_level("WARNING", logger="modelyard"):
        charts.write_report(str(out), manifest)
    assert not (out / "_report.html").exists()
    assert "could not draw _report.html" in caplog.text


def test_norm_histograms_count_every_vector_once_and_read_the_vectors_once(tmp_path, monkeypatch):
    """The norms of the first pass are binned in the second, which reads no vector again; the
    counts are those of float64 norms computed here with numpy from the parts."""
    import numpy as np
    import pyarrow.parquet as pq
    from fsspec.implementations.local import LocalFileSystem

    from modelyard.charts import distributions
    from modelyard.charts.scan import BINS

    sources = []
    for i in range(2):
        out = tmp_path / f"dt={i}"
        manifest = make_output(out, rows=300 + 200 * i, seed=i)
        sources.append(distributions.Source(f"dt={i}", manifest, LocalFileSystem(), str(out)))
    read: list[list[str]] = []
    real = distributions.batches
    monkeypatch.setattr(distributions, "batches", lambda src, cols: (read.append(cols), real(src, cols))[1])
    result = distributions.scan(sources)
    (panel,) = [o for o in result["outputs"] if o["name"] == "embedding (norm)"]
    assert panel["what"] == "norm" and sum("embedding" in cols for cols in read) == len(sources)
    norms = {}
    for src in sources:
        vectors = [v for v in pq.read_table(f"{src.folder}/part-00000.parquet")["embedding"].to_pylist() if v]
        norms[src.label] = np.linalg.norm(np.array(vectors, np.float64), axis=1)
    every = np.concatenate(list(norms.values()))
    edges = np.linspace(every.min(), every.max(), BINS + 1)  # the range of both groups, as a report's
    assert np.allclose(panel["edges"], edges, atol=1e-6)
    for label, want in norms.items():
        assert panel["total"][label] == len(want) > 0
        assert panel["counts"][label] == np.histogram(want, bins=edges)[0].tolist()
