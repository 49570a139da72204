"""The report as one self-contained HTML page, and as markdown for a Prefect artifact.

The page needs no network and no server: images are inline PNGs (data URIs), the style and the
one small script are inline. The script marks the page once every chart's image has loaded with
a non-zero size (``<body data-charts-rendered="N" data-charts-expected="M" data-charts-ok>``), so
a headless browser can tell that the charts were drawn, not only that the file exists. The
numbers behind every chart are in ``<script type="application/json" id="modelyard-charts">``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import jinja2
from markupsafe import Markup

TEXT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1000px;color:#1d1d1f;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.facts{color:#555;margin:0 0 12px}.facts code{font-size:12px}
table{border-collapse:collapse;font-size:12px;margin:6px 0 12px}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child,td.l,th.l{text-align:left}
figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;display:block}figcaption{font-size:12px;color:#555}
</style></head>
<body data-charts-expected="{{ charts|length }}" data-charts-rendered="0">
<h1>{{ title }}</h1>
{% for r in runs %}<p class="facts">{% if runs|length > 1 %}<b>{{ r.label }}</b>: {% endif %}{{ r.rows }} rows,
{{ r.errors }} stage errors, {{ r.files }} file(s), {{ '%.1f'|format(r.wall_s) }} s, committed {{ r.committed }};
run <code>{{ r.run_id }}</code>{% if r.cost is not none %}, cost {{ '%.4g'|format(r.cost) }}{% endif %}; output <code>{{ r.output }}</code></p>
{% endfor %}
<table><tr><th class="l">stage</th>{% if runs|length > 1 %}<th class="l">partition</th>{% endif %}<th class="l">model</th><th class="l">kind</th>
<th>rows</th><th>ran</th><th>skipped</th><th>errors</th><th>cached</th><th>tokens in/out</th><th>rows/s</th><th>p50/p95 ms</th></tr>
{% for r in runs %}{% for name, s in r.stages.items() %}<tr><td>{{ name }}</td>{% if runs|length > 1 %}<td class="l">{{ r.label }}</td>{% endif %}
<td class="l">{% if s.strategy and s.strategy != 'single' and s.models %}{{ s.strategy }}: {{ s.models|join(', ') }}{% else %}{{ s.model or s.strategy or '-' }}{% endif %}</td><td class="l">{{ s.kind }}</td><td>{{ s.rows }}</td><td>{{ s.ran }}</td><td>{{ s.skipped }}</td>
<td>{{ s.errors }}</td><td>{{ s.cached }}</td><td>{{ s.prompt_tokens }}/{{ s.completion_tokens }}</td><td>{{ s.rows_per_s }}</td>
<td>{{ s.latency_ms_p50 | ms }}/{{ s.latency_ms_p95 | ms }}</td></tr>
{% endfor %}{% endfor %}</table>
{% for section, items in sections %}<h2>{{ section }}</h2>
{% for c in items %}<figure class="chart" data-chart="{{ c.id }}"><img alt="{{ c.title }}" src="data:image/png;base64,{{ c.png }}">
<figcaption>{{ c.title }}</figcaption></figure>
{% if c.table %}<table><tr><th class="l">stage</th><th class="l">reason</th><th>rows</th><th class="l">example row key</th>
{% if runs|length > 1 %}<th class="l">partition</th>{% endif %}</tr>
{% for e in c.table %}<tr><td>{{ e.stage }}</td><td class="l">{{ e.reason }}</td><td>{{ e.count }}</td><td class="l"><code>{{ e.example }}</code></td>
{% if runs|length > 1 %}<td class="l">{{ e.group }}</td>{% endif %}</tr>{% endfor %}</table>{% endif %}
{% endfor %}{% endfor %}
{% if not has_errors %}<h2>Errors</h2><p>No stage errors.</p>{% endif %}
<script type="application/json" id="modelyard-charts">{{ data_json }}</script>
<script>
window.addEventListener("load", function () {
  var figs = document.querySelectorAll("figure.chart"), ok = 0;
  figs.forEach(function (f) {
    var img = f.querySelector("img"), box = img && img.getBoundingClientRect();
    if (img && img.complete && img.naturalWidth > 0 && img.naturalHeight > 0 && box.width > 0 && box.height > 0) {
      f.setAttribute("data-rendered", "true"); ok++;
    }
  });
  document.body.setAttribute("data-charts-rendered", String(ok));
  if (ok === figs.length && ok > 0) document.body.setAttribute("data-charts-ok", "true");
});
</script>
</body></html>
"""


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


_ENV = jinja2.Environment(autoescape=True)
_ENV.filters["ms"] = _ms
PAGE = _ENV.from_string(TEXT)


def sections(charts: list[dict]) -> list[tuple[str, list[dict]]]:
    out: dict[str, list] = {}
    for c in charts:
        out.setdefault(c["section"], []).append(c)
    return list(out.items())


def html(title: str, report: dict[str, Any], images: dict[str, bytes]) -> str:
    charts = [{**c, "png": base64.b64encode(images[c["id"]]).decode()} for c in report["charts"]]
    data = json.dumps(report, separators=(",", ":"), default=str).replace("<", "\\u003c")
    return PAGE.render(title=title, runs=report["runs"], charts=charts, sections=sections(charts),
                       has_errors=any(c["id"] == "errors" for c in charts), data_json=Markup(data))


def markdown(title: str, report: dict[str, Any], images: dict[str, bytes]) -> str:
    """The same pictures for a Prefect markdown artifact (its UI renders data-URI images)."""
    lines = [f"# {title}", ""]
    for r in report["runs"]:
        lines.append(f"- **{r['label']}**: {r['rows']} rows, {r['errors']} stage errors, {r['wall_s']:.1f} s, "
                     f"output `{r['output']}`")
    for section, items in sections(report["charts"]):
        lines += ["", f"## {section}"]
        for c in items:
            b64 = base64.b64encode(images[c["id"]]).decode()
            lines += ["", f"**{c['title']}**", "", f"![{c['id']}](data:image/png;base64,{b64})"]
            if c.get("table"):
                lines += ["", "| stage | reason | rows | example row key |", "|---|---|---|---|"]
                lines += [f"| {e['stage']} | {e['reason'].replace('|', '/')} | {e['count']} | `{e['example']}` |"
                          for e in c["table"]]
    return "\n".join(lines) + "\n"
