"""The report as one self-contained HTML page: the per-layer table, the stage diffs side by side, the
permutation groups as a graph. Inline CSS and SVG: nothing is fetched, so it opens offline."""

from __future__ import annotations

import difflib
import html
import itertools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import GroupReport, Report


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #eee; } td.name, td.note { text-align: left; }
tr.dense td { color: #777; }
table.diff { font: 12px monospace; } table.diff td { text-align: left; white-space: pre; }
.diff_add { background: #cfc; } .diff_chg { background: #ff8; } .diff_sub { background: #fcc; }
.diff_next, .diff_header { background: #eee; color: #555; }
details { margin: 0.3em 0; } summary { cursor: pointer; font-weight: bold; }
pre.provenance { background: #f6f6f6; padding: 0.5em; }
"""

_COLUMNS = ("layer", "shape", "pattern", "group in/out", "retained", "retained unpermuted", "sparsity",
            "bytes dense", "bytes compressed", "kernel", "predicted speedup", "est. error", "measured error", "note")


def render_html(report: Report) -> str:
    """The report as a self-contained HTML page."""
    config = report.config
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>vnm {config.v}:2:{config.m} report</title><style>{_STYLE}</style></head><body>",
             f"<h1>vnm {config.v}:2:{config.m} ({html.escape(config.criterion)}, {html.escape(config.method)})</h1>",
             _summary(report)]
    parts += ["<h2>Layers</h2>", _layer_table(report), "<h2>Permutation groups</h2>",
              "<p>Each circle is a channel space; a linear reads its input from one (blue) and writes its "
              "output to one (orange). Linears on one circle share its permutation.</p>",
              _group_svg(report), _group_table(report.groups), "<h2>Stages</h2>"]
    for stage in report.stages:
        parts.append(_stage_html(stage))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(report: Report) -> str:
    text = f"{len(report.sparse_layers)} of {len(report.layers)} linears sparse"
    if report.sparse_layers:
        text += f"; retained importance {report.retained():.2%} (without permutation {report.retained(False):.2%})"
    if report.output_error is not None:
        text += f"; measured output error vs dense {report.output_error:.4f}"
    times = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in report.seconds.items())
    return f"<p>{html.escape(text)}. Pass times: {html.escape(times)}.</p>"


def _cell(value: Any, css: str = "") -> str:
    return f'<td class="{css}">{html.escape(str(value))}</td>' if css else f"<td>{html.escape(str(value))}</td>"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _layer_table(report: Report) -> str:
    rows = ["<table><tr>" + "".join(f"<th>{name}</th>" for name in _COLUMNS) + "</tr>"]
    for layer in report.layers:
        groups = "/".join("-" if group is None else str(group) for group in (layer.in_group, layer.out_group))
        cells = [_cell(layer.name, "name"), _cell(f"{layer.shape[0]}x{layer.shape[1]}"), _cell(layer.pattern),
                 _cell(groups), _cell(_percent(layer.retained)),
                 _cell(_percent(layer.retained_unpermuted)), _cell(_percent(layer.sparsity if layer.sparse else None)),
                 _cell(layer.dense_bytes if layer.dense_bytes is not None else "-"),
                 _cell(layer.weight.nbytes if layer.weight is not None else "-"), _cell(layer.kernel or "-", "note"),
                 _cell("-" if layer.predicted_speedup is None else f"{layer.predicted_speedup:.2f}x"),
                 _cell("-" if layer.error is None else f"{layer.error:.4f}"),
                 _cell("-" if layer.measured_error is None else f"{layer.measured_error:.4f}"),
                 _cell(layer.reason or "", "note")]
        rows.append(f'<tr class="{"sparse" if layer.sparse else "dense"}">' + "".join(cells) + "</tr>")
    return "\n".join(rows) + "</table>"


def _group_table(groups: list[GroupReport]) -> str:
    rows = ["<table><tr><th>group</th><th>size</th><th>readers</th><th>writers</th><th>retained before</th>"
            "<th>retained after</th><th>status</th></tr>"]
    for group in groups:
        status = "permuted" if group.permuted else ("kept order: " + "; ".join(group.blocked_by) if group.blocked_by
                                                   else "not permuted")
        rows.append("<tr>" + "".join([_cell(group.id), _cell(group.size), _cell(", ".join(group.readers), "note"),
                                      _cell(", ".join(group.writers), "note"), _cell(_percent(group.retained_before)),
                                      _cell(_percent(group.retained_after)), _cell(status, "note")]) + "</tr>")
    return "\n".join(rows) + "</table>"


def _group_svg(report: Report) -> str:
    """Linears in a column in graph order, channel spaces as circles to their right; a circle's row is
    the middle of its members', and circles whose member ranges overlap go to separate columns."""
    groups = report.groups
    members = {name for group in groups for name in itertools.chain(group.readers, group.writers)}
    order = list(dict.fromkeys(layer.name for layer in report.layers if layer.name in members))
    if not order:
        return "<p>No linear belongs to a channel space.</p>"
    row_height, label_width, column_width = 22, 8 * max(len(name) for name in order) + 20, 70
    row = {name: index for index, name in enumerate(order)}
    spans = sorted(((min(row[n] for n in g.readers + g.writers), max(row[n] for n in g.readers + g.writers), g)
                    for g in groups if g.readers or g.writers), key=lambda span: span[0])
    column_ends: list[int] = []
    placed = []
    for start, end, group in spans:
        column = next((c for c, last in enumerate(column_ends) if last < start), len(column_ends))
        if column == len(column_ends):
            column_ends.append(end)
        column_ends[column] = end
        placed.append((column, (start + end) / 2, group))
    width = label_width + column_width * (len(column_ends) + 1)
    height = row_height * (len(order) + 1)
    y = lambda index: row_height * (index + 1)
    items = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="permutation groups">']
    for column, middle, group in placed:
        cx, cy = label_width + column_width * (column + 1), y(middle)
        for role, color in (("readers", "#1f77b4"), ("writers", "#ff7f0e")):
            for name in getattr(group, role):
                items.append(f'<line x1="{label_width - 6}" y1="{y(row[name])}" x2="{cx}" y2="{cy:.1f}" '
                             f'stroke="{color}" stroke-opacity="0.6"/>')
    for name, index in row.items():
        items.append(f'<text x="{label_width - 10}" y="{y(index) + 4}" text-anchor="end" '
                     f'font-family="monospace" font-size="12">{html.escape(name)}</text>')
    for column, middle, group in placed:
        cx, cy = label_width + column_width * (column + 1), y(middle)
        fill = "#9d9" if group.permuted else "#ddd"
        items.append(f'<circle cx="{cx}" cy="{cy:.1f}" r="13" fill="{fill}" stroke="#555"><title>group {group.id}: '
                     f'{group.size} channels, {"permuted" if group.permuted else "order kept"}</title></circle>')
        items.append(f'<text x="{cx}" y="{cy + 4:.1f}" text-anchor="middle" font-size="11">{group.id}</text>')
    items.append("</svg>")
    return "\n".join(items)


def _stage_html(stage) -> str:
    if not stage.changed:
        return f"<details><summary>{html.escape(stage.stage)}: graph unchanged</summary></details>"
    table = difflib.HtmlDiff(wrapcolumn=100).make_table(
        stage.before.splitlines(), stage.after.splitlines(), f"before {stage.stage}", f"after {stage.stage}",
        context=True, numlines=2)
    replaced = "\n".join(f"{node} <- {origin}" for node, origin in stage.provenance.items())
    return (f"<details open><summary>{html.escape(stage.stage)}: {len(stage.provenance)} node(s) new or replacing "
            f"another</summary>{table}<p>Provenance (new node &lt;- the node it replaced):</p>"
            f'<pre class="provenance">{html.escape(replaced)}</pre></details>')
