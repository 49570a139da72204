"""Chart data (``data.py``) drawn with matplotlib into PNG images.

matplotlib because the same pictures must show in two places: the self-contained page and the
Prefect UI, whose markdown artifacts render images but run no scripts, so a JavaScript chart
library could serve only the page. PNGs are quantized to a 256-colour palette with Pillow's fast
octree (a third of the size; median cut took 0.12 s for a run's five charts, fast octree 0.06 s for
smaller files); the demo's page stays well under 1 MB. Figures are built with the object API
(``Figure``, no pyplot state), so drawing is safe beside the run's other threads.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 80
WIDTH = 10.0
PANEL_H = 2.5
COLS = 3
EVENT_COLOURS = {"server-stop": "#7f7f7f", "wave": "#9467bd"}


def png(chart: dict[str, Any]) -> bytes:
    fig = figure(chart)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return _quantize(buf.getvalue())


def warm() -> None:
    """Draw one small figure and throw it away: what the first chart of a process pays once (the Agg
    canvas, the font files, PIL), about a quarter of a second here."""
    fig = Figure(figsize=(2, 1), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], label="warm")
    ax.set_title("warm")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _quantize(buf.getvalue())


def _quantize(data: bytes) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue() if out.tell() < len(data) else data


def figure(chart: dict[str, Any]) -> Figure:
    panels = chart["panels"]
    cols = chart.get("cols") or (1 if chart["kind"] == "lines" else min(COLS, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(WIDTH, PANEL_H * rows + 0.3), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        # fewer ticks: most of matplotlib's drawing time (categorical axes set their own below)
        ax.yaxis.set_major_locator(MaxNLocator(5))
        if chart["kind"] == "lines" or panel.get("type") == "hist":
            ax.xaxis.set_major_locator(MaxNLocator(7, integer=bool(panel.get("integer"))))
        if chart["kind"] == "lines":
            _lines(ax, panel, chart.get("events") or [])
        elif panel.get("type") == "hist":
            _hist(ax, panel)
        elif panel.get("type") == "counts":
            _counts(ax, panel)
        else:
            _bars(ax, panel)
        # a text, not set_title: matplotlib places titles by measuring every tick label (slow)
        ax.text(0, 1.03, panel["title"], transform=ax.transAxes, fontsize=9, va="bottom")
        ax.tick_params(labelsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def _empty(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#888888")
    ax.set_xticks([])
    ax.set_yticks([])


def _lines(ax, panel: dict, events: list[dict]) -> None:
    drawn = False
    for line in panel["lines"]:
        pts = [(x, y) for x, y in zip(line["x"], line["y"]) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=line["label"], linewidth=1.3)
            drawn = True
    _events(ax, events)
    if not drawn:
        _empty(ax, "no samples")
        return
    ax.set_ylabel(panel.get("ylabel", ""), fontsize=8)
    ax.set_xlabel(panel.get("xlabel", ""), fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncols=min(4, len(panel["lines"]) + 1))


def _events(ax, events: list[dict]) -> None:
    """Servers starting as shaded spans (start to healthy), stops as dashed lines, waves as lines."""
    labelled = set()

    def once(label: str) -> str | None:
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for i, e in enumerate(events):
        if e["kind"] == "server-start":
            end = next((x["t"] for x in events[i + 1:] if x.get("port") == e.get("port")
                        and x["kind"] in ("server-healthy", "server-stop")), None)
            if end is not None:
                ax.axvspan(e["t"], end, color="#bbbbbb", alpha=0.3, label=once("server starting"))
        elif e["kind"] == "server-stop":
            ax.axvline(e["t"], color=EVENT_COLOURS["server-stop"], linestyle="--", linewidth=0.8,
                       label=once("server stopped"))
        elif e["kind"] == "wave":
            ax.axvline(e["t"], color=EVENT_COLOURS["wave"], linewidth=1.0, label=once("wave start"))
            ax.annotate(f"wave {e.get('wave')}", (e["t"], 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                        color=EVENT_COLOURS["wave"], va="top", xytext=(2, -2), textcoords="offset points")


def _hist(ax, panel: dict) -> None:
    edges, groups = panel["edges"], list(panel["counts"])
    if not sum(panel["total"].values()):
        _empty(ax)
        return
    for g in groups:
        if len(groups) == 1:
            ax.stairs(panel["counts"][g], edges, fill=True, alpha=0.75)
        else:
            ax.stairs(panel["counts"][g], edges, label=g, linewidth=1.4)
    for k, mark in enumerate(panel.get("marks") or []):
        ax.axvline(mark["x"], color=("#d62728", "#ff7f0e")[k % 2], linestyle="--", linewidth=1.1,
                   label=f"{mark['label']} {mark['x']:.0f}")
    ax.set_xlabel(panel.get("xlabel", ""), fontsize=8)
    ax.set_ylabel("rows", fontsize=8)
    if len(groups) > 1 or panel.get("marks"):
        ax.legend(fontsize=7)


def _counts(ax, panel: dict) -> None:
    order, groups = list(panel["order"]), list(panel["values"])
    if any(panel["nulls"].values()):
        order.append("(null)")
    if not order:
        _empty(ax)
        return
    n = len(groups)
    width = 0.8 / n
    for k, g in enumerate(groups):
        vals = [panel["nulls"][g] if v == "(null)" else panel["values"][g].get(v, 0) for v in order]
        ax.bar([i + (k - (n - 1) / 2) * width for i in range(len(order))], vals, width, label=g if n > 1 else None)
    ax.set_xticks(range(len(order)), [v[:14] for v in order], rotation=30 if len(order) > 4 else 0, ha="right"
                  if len(order) > 4 else "center")
    ax.set_ylabel("rows", fontsize=8)
    if n > 1:
        ax.legend(fontsize=7)


def _bars(ax, panel: dict) -> None:
    cats, series = panel["categories"], panel["series"]
    if not cats or not any(any(v for v in s["values"]) for s in series):
        _empty(ax)
        return
    values = [list(s["values"]) for s in series]
    if panel.get("normalize"):
        totals = [sum(v[i] for v in values) or 1 for i in range(len(cats))]
        values = [[x / totals[i] for i, x in enumerate(v)] for v in values]
    pos = list(range(len(cats)))
    bar = ax.barh if panel.get("horizontal") else ax.bar
    if panel.get("stacked"):
        base = [0.0] * len(cats)
        for s, v in zip(series, values):
            (bar(pos, v, left=base, label=s["label"]) if panel.get("horizontal")
             else bar(pos, v, bottom=base, label=s["label"]))
            base = [b + x for b, x in zip(base, v)]
    else:
        n = len(series)
        width = 0.8 / n
        for k, (s, v) in enumerate(zip(series, values)):
            bar([p + (k - (n - 1) / 2) * width for p in pos], v, width, label=s["label"])
    if panel.get("horizontal"):
        ax.set_yticks(pos, [c[:60] for c in cats], fontsize=7)
        ax.set_xlabel(panel.get("xlabel", ""), fontsize=8)
    else:
        ax.set_xticks(pos, [c[:18] for c in cats], fontsize=7, rotation=20 if len(cats) > 3 else 0)
        ax.set_ylabel(panel.get("ylabel", ""), fontsize=8)
    if panel.get("stacked"):  # below the axes: stacked bars fill them
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=min(6, len(series)))
    elif len(series) > 1:
        ax.legend(fontsize=7)
