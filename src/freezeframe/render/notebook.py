"""Notebook display: a run's `_repr_html_` (header, the answers, the layer view, freeze map as a plain
HTML table, the findings; no JavaScript) and `show(run, name)`, one report figure as a plotly Figure."""

from __future__ import annotations

import html

from .html import STATE_COLORS, UNKNOWN_COLOR

e = html.escape
_TD = "border:1px solid #ddd;padding:2px 8px;text-align:left"


def _mix(lo: str, hi: str, t: float) -> str:
    a = [int(lo[i:i + 2], 16) for i in (1, 3, 5)]
    b = [int(hi[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b))


def freeze_map_table(fm: dict) -> str:
    head = "".join(f'<th style="{_TD}">{e(s["label"])}</th>' for s in fm["stages"])
    body = []
    for r, row in enumerate(fm["rows"]):
        cells = []
        for k in range(len(fm["stages"])):
            state, sh = fm["state"][r][k], fm["shade"][r][k]
            bg = UNKNOWN_COLOR if state is None else _mix(*STATE_COLORS[state], sh)
            fg = "#fff" if state is not None and sh > 0.55 else "#222"
            cells.append(f'<td style="{_TD};background:{bg};color:{fg}">{e(fm["text"][r][k])}</td>')
        types = e(", ".join(row["types"][:2]))
        body.append(f'<tr><td style="{_TD}" title="{e(row["name"])}">{e(row["label"])} '
                    f'<span style="color:#888">({types})</span></td>'
                    f'<td style="{_TD};text-align:right">{row["numel"]:,}</td>{"".join(cells)}</tr>')
    return (f'<table style="border-collapse:collapse;font-size:12px"><tr><th style="{_TD}">module</th>'
            f'<th style="{_TD}">params</th>{head}</tr>{"".join(body)}</table>')


SEVERITY_COLORS = {"error": "#b3261e", "warning": "#9a6700", "info": "#1f5fa8"}


def _answers(summary: dict) -> str:
    return "".join(f'<p style="margin:8px 0 0"><b>{e(a["question"])}</b><br>{e(a["answer"])}</p>'
                   for a in summary["answers"])


def _findings(findings: list[dict]) -> str:
    if not findings:
        return '<p style="color:#1e7a34">Findings: none — no known fine-tuning mistake in this run.</p>'
    items = []
    for f in findings:
        color = SEVERITY_COLORS.get(f["severity"], "#333")
        where = f" (stage {f['stage']})" if f.get("stage") is not None else ""
        items.append(f'<li><b style="color:{color}">{e(str(f["severity"]).upper())}</b> <b>{e(str(f["code"]))}</b>'
                     f'{e(where)}: {e(str(f["message"]))}</li>')
    return f'<p style="margin:8px 0 0"><b>Findings</b></p><ul style="margin:2px 0">{"".join(items)}</ul>'


def _layer_view(run, summary: dict) -> str:
    """The report's layer view (`<section id="layers">`, static HTML: nested blocks that open and
    close without JavaScript); its step slider moves only in the report (docs/report.md)."""
    from ..analyse.timeline import layer_view, timeline
    from .layers import layers_section

    stored = run._stored
    data = {"layer_view": layer_view(summary),
            "timeline": timeline(summary, stored.steps, stored, stored.scalars)}   # tensors streamed
    return layers_section(data)


def repr_html(run, *, depth: int | None = None) -> str:
    """Small inline HTML for Jupyter: no plotly.js, no script, every name escaped."""
    from ..analyse.figures import freeze_map

    summary = run.summary()
    r = summary["run"]
    state = "complete" if r["complete"] else f"INTERRUPTED — {r['recovered_steps']:,} steps recovered"
    fm = freeze_map(summary, depth)
    layers = _layer_view(run, summary)
    return (f'<div class="freezeframe-run" style="font-family:system-ui,sans-serif;font-size:13px">'
            f'<div><b>freezeframe run</b> <code>{e(r["path"])}</code>: {e(r["framework"])} · '
            f'{r["tensors_total"]:,} tensors · {r["params_total"]:,} parameters · {r["steps"]:,} steps · '
            f'{len(summary["stages"])} stages · {e(state)}</div>'
            f'<div style="margin:6px 0 2px;font-weight:600">Freeze map (module tree to depth {fm["depth"]}; '
            f'"changed": the bytes differ from the stage\'s start, "unchanged": bitwise equal; the % is the distance '
            f'‖W − W_ref‖/‖W_ref‖ from the weights watching began with, at the stage\'s end)</div>'
            f'{freeze_map_table(fm)}{_answers(summary)}{layers}{_findings(summary["findings"])}'
            f'<div style="color:#888">run.show("heatmap" | "lr" | "drift" | "loss" | "freeze_map") draws one figure; '
            f'freezeframe report {e(r["path"])} writes the interactive report.</div></div>')


def show(run, name: str, *, depth: int | None = None):
    """One report figure as a `plotly.graph_objects.Figure`: "freeze_map", "heatmap", "lr", "drift" or "loss"."""
    import plotly.graph_objects as go

    from ..analyse.figures import FIGURES, one_figure
    from ..errors import FreezeFrameError
    from . import html as report

    if name not in FIGURES:
        raise FreezeFrameError(f"unknown figure {name!r}: choose one of {', '.join(map(repr, FIGURES))}")
    data = one_figure(run, name, depth=depth)
    if name == "loss":
        if data is None:
            raise FreezeFrameError(f"{str(run.path)!r} logged no loss: there is no loss figure "
                                   "(rec.log(loss=...) records it)")
        summary = run.summary()
        from ..analyse.figures import boundaries, stages

        fig = report.loss_figure(data, stages(summary), boundaries(summary))
    else:
        fig = {"freeze_map": report.freeze_map_figure, "heatmap": report.heatmap_figure, "lr": report.lr_figure,
               "drift": report.drift_figure}[name](data)
    return go.Figure(fig)
