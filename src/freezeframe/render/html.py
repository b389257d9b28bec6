"""The report as one self-contained HTML file: plotly.js, CSS and the figure data inlined (opens from
disk offline, makes no network request); every name from the model is escaped."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import numpy as np

# Colours shared by every renderer (HTML, PNG, notebook).
STATE_COLORS = {  # (lightest, darkest) per state; the shade between them is how far the module moved
    "frozen": ("#dce6f2", "#2f5d8a"),
    "partial": ("#fbe7c0", "#c77a00"),
    "trainable": ("#d7efd4", "#1e7a34"),
}
UNKNOWN_COLOR = "#eeeeee"
FROZEN_CELL = "#b9b9b9"
GROUP_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
                "#7f7f7f", "#bcbd22"]
STAGE_COLORS = ["#e6550d", "#3182bd", "#31a354", "#756bb1", "#636363", "#d6616b"]
STAGE_FILLS = ["rgba(31,119,180,0.07)", "rgba(255,127,14,0.08)"]
MARKED_CELLS = (("zero", "update exactly 0", "#ff3d7f"),  # (figure-data key, legend, colour) of cells that
                ("nonfinite", "non-finite update (NaN/Inf)", "#000000"))  # must not read as small values
STATE_Z = {"frozen": 0.0, "partial": 1.0, "trainable": 2.0}

e = html.escape


# ----------------------------------------------------------------------------- shared pieces
def _group_color(label: str, order: list[str]) -> str:
    return GROUP_COLORS[order.index(label) % len(GROUP_COLORS)] if label in order else "#555555"


def _stage_decor(stages: list[dict], boundaries: list[float], *, shade: bool) -> tuple[list, list]:
    """Shapes (boundary lines, optional shading) and annotations (stage labels) over a step axis."""
    shapes, notes = [], []
    for k, s in enumerate(stages):
        if s["first_step"] is None:
            continue
        x0, x1 = s["first_step"] - 0.5, s["last_step"] + 0.5
        if shade:
            shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": x0, "x1": x1, "y0": 0, "y1": 1,
                           "fillcolor": STAGE_FILLS[k % 2], "line": {"width": 0}, "layer": "below"})
        notes.append({"x": (x0 + x1) / 2, "y": 1, "xref": "x", "yref": "paper", "yanchor": "bottom",
                      "showarrow": False, "text": e(s["label"]), "font": {"size": 11, "color": "#444"}})
    for b in boundaries:
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": b, "x1": b, "y0": 0, "y1": 1,
                       "line": {"color": "#333", "width": 1.5, "dash": "dash"}})
    return shapes, notes


def _layout(title: str, height: int, **extra) -> dict:
    layout = {"title": {"text": title, "x": 0, "xanchor": "left", "font": {"size": 15}},
              "height": height, "margin": {"l": 70, "r": 30, "t": 90, "b": 50},
              "font": {"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12},
              "paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff", "hoverlabel": {"align": "left"}}
    layout.update(extra)
    return layout


def _category_axis(rows: list[dict], breaks: list[int]) -> tuple[dict, list]:
    """A y axis of module names (the values, shown in hovers) with readable labels as tick text."""
    names = [e(r["name"]) for r in rows]
    axis = {"type": "category", "autorange": "reversed", "tickmode": "array", "tickvals": names,
            "ticktext": [e(r["label"]) for r in rows], "automargin": True, "showgrid": False,
            "categoryorder": "array", "categoryarray": names}
    shapes = [{"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": b - 0.5, "y1": b - 0.5,
               "line": {"color": "#333", "width": 1}} for b in breaks]
    return axis, shapes


# ----------------------------------------------------------------------------- the figures
def freeze_map_figure(fm: dict) -> dict:
    rows, stages = fm["rows"], fm["stages"]
    names = [e(r["name"]) for r in rows]
    xs = [e(s["label"]) for s in stages]
    z = [[None if st is None else STATE_Z[st] + min(sh, 0.999) for st, sh in zip(srow, hrow)]
         for srow, hrow in zip(fm["state"], fm["shade"])]
    hover = []
    for r, row in enumerate(rows):
        line = []
        for k, s in enumerate(stages):
            d = fm["drift_rel"][r][k]
            ch = fm["changed"][r][k]
            line.append(f"<b>{e(row['name'] or '(root)')}</b> ({e(', '.join(row['types']))})<br>"
                        f"{e(row['group'])} · {row['tensors']} tensors · {row['numel']:,} parameters<br>"
                        f"stage {e(s['label'])}<br>{fm['state'][r][k] or 'unknown'}; "
                        f"{'bytes changed' if ch else 'bitwise unchanged' if ch is False else 'change unknown'}<br>"
                        f"distance from reference at stage end: {'?' if d is None else f'{100 * d:.3g}%'}")
        hover.append(line)
    bands = []
    for k, st in enumerate(("frozen", "partial", "trainable")):
        lo, hi = STATE_COLORS[st]
        bands += [[k / 3, lo], [(k + 0.999) / 3, hi]]
    bands[-1][0] = 1.0
    trace = {"type": "heatmap", "x": xs, "y": names, "z": z, "zmin": 0, "zmax": 3, "colorscale": bands,
             "showscale": False, "xgap": 2, "ygap": 2, "text": [[e(t) for t in row] for row in fm["text"]],
             "texttemplate": "%{text}", "textfont": {"size": 11}, "customdata": hover,
             "hovertemplate": "%{customdata}<extra></extra>", "hoverongaps": False, "name": "freeze map"}
    legend = [{"type": "scatter", "x": [None], "y": [None], "mode": "markers", "name": label, "hoverinfo": "skip",
               "marker": {"symbol": "square", "size": 14, "color": STATE_COLORS[st][1]}}
              for st, label in (("trainable", "trainable"), ("partial", "partial (e.g. only BatchNorm trains)"),
                                ("frozen", "frozen"))]
    yaxis, shapes = _category_axis(rows, fm["group_breaks"])
    title = (f"Freeze map — module tree to depth {fm['depth']}; Δ = bytes changed in the stage, = = bitwise "
             "unchanged,<br>% and shade = distance from the starting weights at the stage's end")
    return {"data": [trace] + legend,
            "layout": _layout(title, max(260, 120 + 26 * len(rows)), yaxis=yaxis, shapes=shapes,
                              xaxis={"type": "category", "side": "top", "showgrid": False},
                              legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
                              margin={"l": 70, "r": 30, "t": 110, "b": 50})}


def heatmap_figure(hm: dict) -> dict:
    rows, stages = hm["rows"], hm["stages"]
    names = [e(r["name"]) for r in rows]
    traces = []
    span = "steps around %{x:.0f} (median of the bin)" if hm["downsampled"] else "step %{x}"
    col_stage = np.asarray(hm["stage_of_column"])
    for k, s in enumerate(stages):
        cols = np.flatnonzero(col_stage == k)
        frozen = [[1.0 if f else None] for f in hm["frozen"][:, k]] if len(rows) else []
        if s["first_step"] is not None and any(v[0] for v in frozen):
            traces.append({"type": "heatmap", "x": [s["first_step"] - 0.5, s["last_step"] + 0.5], "y": names,
                           "z": frozen, "zmin": 0, "zmax": 1, "showscale": False, "hoverongaps": False,
                           "colorscale": [[0, FROZEN_CELL], [1, FROZEN_CELL]], "name": f"frozen, stage {s['index']}",
                           "hovertemplate": f"<b>%{{y}}</b><br>stage {e(s['label'])}<br>frozen: not trainable in "
                                            "this stage, never updated<extra></extra>"})
        if not len(cols):
            continue
        traces.append({"type": "heatmap", "x": np.asarray(hm["x"])[cols], "y": names, "z": hm["values"][:, cols],
                       "coloraxis": "coloraxis", "hoverongaps": False, "name": f"stage {s['index']}",
                       "meta": {"stage": s["index"]},
                       "hovertemplate": f"<b>%{{y}}</b><br>{span}<br>stage {e(s['label'])}<br>"
                                        "log10(update / weight) = %{z:.2f}<extra></extra>"})
    for key, label, color in MARKED_CELLS:                      # exact zeros, NaN/Inf: own colours
        mask = np.asarray(hm[key])
        for k, s in enumerate(stages):
            cols = np.flatnonzero(col_stage == k)
            if not len(cols) or not mask[:, cols].any():
                continue
            traces.append({"type": "heatmap", "x": np.asarray(hm["x"])[cols], "y": names,
                           "z": np.where(mask[:, cols], np.float32(1), np.float32(np.nan)), "zmin": 0, "zmax": 1,
                           "colorscale": [[0, color], [1, color]], "showscale": False, "hoverongaps": False,
                           "name": f"{label}, stage {s['index']}",
                           "hovertemplate": f"<b>%{{y}}</b><br>{span}<br>stage {e(s['label'])}<br>{label}"
                                            "<extra></extra>"})
        if mask.any():
            traces.append({"type": "scatter", "x": [None], "y": [None], "mode": "markers", "name": label,
                           "hoverinfo": "skip", "marker": {"symbol": "square", "size": 14, "color": color}})
    traces.append({"type": "scatter", "x": [None], "y": [None], "mode": "markers", "name": "frozen in the stage",
                   "hoverinfo": "skip", "marker": {"symbol": "square", "size": 14, "color": FROZEN_CELL}})
    shapes, notes = _stage_decor(stages, hm["boundaries"], shade=False)
    yaxis, gshapes = _category_axis(rows, hm["group_breaks"])
    cmin, cmax = hm["range"] or (-6.0, 0.0)
    title = f"Update size per module and step: log10(‖ΔW‖ / ‖W‖), depth {hm['depth']}<br><sup>{e(hm['note'])}</sup>"
    return {"data": traces,
            "layout": _layout(title, min(2400, max(380, 220 + 20 * len(rows))), yaxis=yaxis,
                              shapes=shapes + gshapes, annotations=notes,
                              xaxis={"title": {"text": "optimizer step"}, "showgrid": False, "zeroline": False,
                                     "range": _step_range(stages)},
                              coloraxis={"colorscale": "Viridis", "cmin": cmin, "cmax": cmax,
                                         "colorbar": {"title": {"text": "log10<br>ratio"}, "len": 0.8}},
                              legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
                              margin={"l": 70, "r": 30, "t": 110, "b": 100})}


def _step_range(stages: list[dict]) -> list[float] | None:
    known = [s for s in stages if s["first_step"] is not None]
    return [known[0]["first_step"] - 0.5, known[-1]["last_step"] + 0.5] if known else None


def lr_figure(lr: dict) -> dict:
    order = lr["layer_groups"]
    traces, shown = [], set()
    for s in lr["series"]:
        if not len(s["steps"]):
            continue
        lg = s["layer_group"]
        traces.append({"type": "scatter", "mode": "lines+markers" if len(s["steps"]) < 3 else "lines",
                       "x": s["steps"], "y": s["lr"], "name": e(lg), "legendgroup": e(lg),
                       "showlegend": lg not in shown, "line": {"color": _group_color(lg, order), "width": 2},
                       "meta": {"group": s["group"], "stage": s["stage"]},
                       "hovertemplate": f"<b>{e(lg)}</b> ({e(s['name'])})<br>stage {s['stage']}: {e(s['stage_name'])}"
                                        "<br>step %{x}<br>lr %{y:.4g}<extra></extra>"})
        shown.add(lg)
    shapes, notes = _stage_decor(lr["stages"], lr["boundaries"], shade=True)
    return {"data": traces,
            "layout": _layout("Learning rate of every layer group at every step (log scale)", 420, shapes=shapes,
                              annotations=notes, yaxis={"type": "log", "title": {"text": "learning rate"},
                                                        "exponentformat": "power"},
                              xaxis={"title": {"text": "optimizer step"}, "zeroline": False},
                              legend={"title": {"text": "layer group (click to toggle)"}})}


def drift_figure(dr: dict) -> dict:
    """A dumbbell per module: its distance from the reference at the end of each stage, joined."""
    rows, stages = dr["rows"], dr["stages"]
    names = [e(r["name"]) for r in rows]
    drift = [[d for d in row] for row in dr["drift_rel"]]
    cx, cy = [], []
    for r, name in enumerate(names):
        pts = [d for d in drift[r] if d is not None]
        if len(pts) > 1:
            cx += pts + [None]
            cy += [name] * len(pts) + [None]
    traces = [{"type": "scatter", "mode": "lines", "x": cx, "y": cy, "showlegend": False, "hoverinfo": "skip",
               "line": {"color": "#9aa4ae", "width": 2}}]
    shades = _stage_colors(len(stages))
    for k, s in enumerate(stages):
        traces.append({"type": "scatter", "mode": "markers", "x": [row[k] for row in drift], "y": names,
                       "name": f"end of stage {e(s['label'])}", "meta": {"stage": s["index"]},
                       "marker": {"size": max(7, 13 - 2 * k), "color": shades[k], "line": {"width": 1, "color": "#fff"}},
                       "hovertemplate": f"<b>%{{y}}</b><br>end of stage {e(s['label'])}<br>distance from reference "
                                        "%{x:.3~%}<extra></extra>"})
    note = dr["continuity"] or "a single stage"
    menus = [{"type": "buttons", "direction": "right", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom",
              "pad": {"b": 4},
              "buttons": [{"label": "linear", "method": "relayout", "args": [{"xaxis.type": "linear"}]},
                          {"label": "log", "method": "relayout", "args": [{"xaxis.type": "log"}]}]}]
    title = (f"Distance from the reference (pretrained) weights at the end of each stage, ‖W − W_ref‖ / ‖W_ref‖"
             f"<br><sup>{e(note)}</sup>")
    yaxis, shapes = _category_axis(rows, dr.get("group_breaks", []))
    return {"data": traces,
            "layout": _layout(title, max(320, 170 + 24 * len(rows)), updatemenus=menus, yaxis=yaxis, shapes=shapes,
                              xaxis={"tickformat": ".2~%", "title": {"text": "relative distance from the reference"},
                                     "rangemode": "tozero", "side": "bottom"},
                              legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
                              margin={"l": 70, "r": 30, "t": 90, "b": 90})}


def _stage_colors(n: int) -> list[str]:
    """One colour per stage, distinct from its neighbours."""
    return [STAGE_COLORS[k % len(STAGE_COLORS)] for k in range(n)]


def loss_figure(ls: dict, stages: list[dict], boundaries: list[float]) -> dict:
    trace = {"type": "scatter", "mode": "lines", "x": ls["steps"], "y": ls["values"], "name": e(ls["name"]),
             "line": {"color": "#333", "width": 1.2}, "hovertemplate": "step %{x}<br>%{y:.4g}<extra></extra>"}
    shapes, notes = _stage_decor(stages, boundaries, shade=True)
    return {"data": [trace],
            "layout": _layout(f"{e(ls['name'])} per step, as logged (stages shaded)", 380, shapes=shapes,
                              annotations=notes, showlegend=False, yaxis={"title": {"text": e(ls["name"])}},
                              xaxis={"title": {"text": "optimizer step"}, "zeroline": False})}


def plotly_figures(data: dict) -> dict[str, dict]:
    """Every figure as a plotly figure dict (numpy arrays left as they are)."""
    out = {"freeze_map": freeze_map_figure(data["freeze_map"]), "heatmap": heatmap_figure(data["heatmap"]),
           "lr": lr_figure(data["lr"]), "drift": drift_figure(data["drift"])}
    if data["loss"] is not None:
        out["loss"] = loss_figure(data["loss"], data["stages"], data["boundaries"])
    return out


# ----------------------------------------------------------------------------- JSON in a <script>
_DTYPES = {np.dtype("float32"): "f4", np.dtype("float64"): "f8", np.dtype("int32"): "i4", np.dtype("int16"): "i2",
           np.dtype("int8"): "i1", np.dtype("uint32"): "u4", np.dtype("uint16"): "u2", np.dtype("uint8"): "u1"}


def _typed_array(a: np.ndarray) -> dict | list:
    """A numpy array as plotly.js's typed-array spec {dtype, bdata (base64, little-endian), shape}."""
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    elif a.dtype.kind in "iu" and a.dtype not in _DTYPES:
        a = a.astype(np.int32) if a.size == 0 or (a.min() >= -2**31 and a.max() < 2**31) else a.astype(np.float64)
    elif a.dtype.kind == "f" and a.dtype not in _DTYPES:
        a = a.astype(np.float64)
    elif a.dtype.kind not in "iuf":
        return [_plain(v) for v in a.tolist()]
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    out = {"dtype": _DTYPES[a.dtype.newbyteorder("=")], "bdata": base64.b64encode(a.tobytes()).decode("ascii")}
    if a.ndim > 1:
        out["shape"] = ", ".join(str(n) for n in a.shape)
    return out


def _plain(x):
    if isinstance(x, np.ndarray):
        return _typed_array(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def script_json(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' survives (a name like `</script>` cannot end the
    element), and no NaN/Infinity (null instead)."""
    text = json.dumps(_plain(obj), allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ----------------------------------------------------------------------------- the page
CSS = """
:root{--fg:#1d1d1f;--muted:#666;--line:#ddd;--ok:#1e7a34;--bad:#b3261e;--warn:#9a6700}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:#fafafa}
header{background:#1d2b3a;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:20px}
header .facts{color:#cfd8e3}header .warn{color:#ffd27a}
nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);padding:6px 28px}
nav a{margin-right:16px;color:#1f5fa8;text-decoration:none}
main{padding:8px 28px 40px;max-width:1500px}
section{background:#fff;border:1px solid var(--line);border-radius:6px;margin:18px 0;padding:12px 18px}
section h2{font-size:17px;margin:4px 0 6px}p.how{color:var(--muted);margin:2px 0 8px}
.qa h3{font-size:15px;margin:12px 0 2px}.qa p{margin:0 0 8px}
table.stages{border-collapse:collapse;margin:6px 0 10px}
table.stages th,table.stages td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
table.stages th{background:#f3f5f8}.yes{color:var(--ok)}.no{color:var(--bad);font-weight:600}.dim{color:var(--muted)}
ul.findings{padding-left:20px}.sev-error{color:var(--bad);font-weight:700}.sev-warning{color:var(--warn);font-weight:700}
.sev-info{color:#1f5fa8;font-weight:700}.fig{width:100%}footer{color:var(--muted);padding:0 28px 20px}
"""

SECTIONS = {
    "freeze_map": ("Freeze map", "Which modules each stage trained. Columns are stages, rows modules in model "
                                 "order with their layer group; green trains, blue frozen, orange partial (e.g. only "
                                 "the BatchNorm layers of a frozen block train). The darker the cell, the further the "
                                 "module is from the weights watching began with, at the stage's end."),
    "heatmap": ("Update heatmap", "What each optimizer step did to each module: colour is log10 of ‖ΔW‖/‖W‖ "
                                  "(−3 means the step moved the weights by 0.1 % of their size). Grey cells are "
                                  "frozen for the stage — no update at all, not a small one. Dashed lines are stage "
                                  "boundaries. Hover a cell for module, step, stage and value; drag to zoom."),
    "lr": ("Learning rates", "The learning rate every layer group got at every step, on a log scale: the "
                             "one-cycle shape of each stage and the discriminative spread after unfreezing. Click a "
                             "group in the legend to hide or show it."),
    "drift": ("Drift from the reference weights", "How far each module is from the weights watching began with "
                                                  "(the pretrained weights), at the end of each stage. A stage that "
                                                  "continues from the previous one starts where that line left off."),
    "loss": ("Loss", "The loss as logged at each step, stages shaded."),
}


def _facts(summary: dict) -> str:
    r = summary["run"]
    state = "complete" if r["complete"] else f"INTERRUPTED — {r['recovered_steps']:,} steps recovered"
    out = (f"<div class=facts>{e(r['framework'])} · {r['tensors_total']:,} tensors · {r['params_total']:,} parameters"
           f" · {r['steps']:,} steps · {len(summary['stages'])} stages · {e(state)}</div>")
    if r.get("error"):
        out += f"<div class=warn>recording stopped early: {e(str(r['error']))}</div>"
    for w in r.get("warnings") or []:
        out += f"<div class=warn>warning: {e(str(w))}</div>"
    return out


def _lr(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def stages_table(summary: dict) -> str:
    head = ("<tr><th>#</th><th>stage</th><th>steps</th><th>forward passes<br>train / eval</th><th>trainable</th>"
            "<th>lr_max per group</th><th>starts from previous end</th></tr>")
    body = []
    for s in summary["stages"]:
        fp = s["forward_passes"] or {}
        if s["starts_from_previous_end"] is None:
            cont = "<span class=dim>— (first)</span>"
        elif s["starts_from_previous_end"]:
            cont = f"<span class=yes>yes ({e(str(s['continuity']))})</span>"
        else:
            cont = (f"<span class=no>NO: {len(s['changed_since_previous_end'])} tensors differ "
                    f"({e(str(s['continuity']))})</span>")
        lrs = " / ".join(f"{e(g['name'])} {_lr(g['lr_max'])}" for g in s["groups"]) or "—"
        trial = " <span class=dim>[trial]</span>" if s["kind"] == "trial" else ""
        body.append(f"<tr><td>{s['index']}</td><td>{e(s['name'])}{trial}</td><td>{s['steps']:,}</td>"
                    f"<td>{fp.get('train')} / {fp.get('eval')}</td>"
                    f"<td>{s['tensors_trainable']:,} / {summary['run']['tensors_total']:,} tensors<br>"
                    f"{s['params_trainable']:,} parameters</td><td>{lrs}</td><td>{cont}</td></tr>")
    return f"<table class=stages>{head}{''.join(body)}</table>"


def answers_html(summary: dict) -> str:
    qa = "".join(f"<h3>{e(a['question'])}</h3><p>{e(a['answer'])}</p>" for a in summary["answers"])
    return f"<div class=qa>{qa}</div>"


def findings_html(findings: list[dict]) -> str:
    if not findings:
        return "<p class=yes>Findings: none — no known fine-tuning mistake in this run.</p>"
    items = []
    for f in findings:
        sev = f["severity"] if f["severity"] in ("error", "warning", "info") else "info"
        where = f" (stage {f['stage']})" if f.get("stage") is not None else ""
        items.append(f"<li><span class=sev-{sev}>{e(sev.upper())}</span> <b>{e(str(f['code']))}</b>{e(where)}: "
                     f"{e(str(f['message']))}</li>")
    return f"<h3>Findings</h3><ul class=findings>{''.join(items)}</ul>"


BOOT = """
(function(){
  var data = JSON.parse(document.getElementById('ff-data').textContent);
  var config = {responsive: true, displaylogo: false, scrollZoom: false};
  data.order.forEach(function(name){
    var fig = data.figures[name];
    Plotly.newPlot('fig-' + name, fig.data, fig.layout, config);
  });
})();
"""


def render_html(run, *, data: dict | None = None, depth: int | None = None) -> str:
    """The report of `run` as one HTML string (figure data from `analyse.figures` unless given)."""
    import plotly.offline

    from ..analyse.figures import from_run
    from ..analyse.tables import adapters_table
    from .adapters import adapters_html

    summary = run.summary()
    data = from_run(run, depth=depth) if data is None else data
    figs = plotly_figures(data)
    title = f"freezeframe · {summary['run']['path']}"
    nav = ['<a href="#answers">Answers</a>'] + [f'<a href="#{n}">{SECTIONS[n][0]}</a>' for n in figs]
    sections = [f'<section id="answers"><h2>The three questions, answered from this run</h2>{answers_html(summary)}'
                f'<h3>Stages</h3>{stages_table(summary)}{adapters_html(adapters_table(summary))}'
                f'{findings_html(summary["findings"])}</section>']
    for name in figs:
        heading, how = SECTIONS[name]
        sections.append(f'<section id="{name}"><h2>{heading}</h2><p class=how>{e(how)}</p>'
                        f'<div class=fig id="fig-{name}"></div></section>')
    if data["loss"] is None:
        sections.append('<section id="loss"><h2>Loss</h2><p class=how>This run logged no loss '
                        '(<code>rec.log(loss=...)</code> adds it).</p></section>')
    payload = script_json({"order": list(figs), "figures": figs})
    return "".join([
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style>",
        f"<script>{plotly.offline.get_plotlyjs()}</script></head><body>",
        f"<header><h1>freezeframe report · <span>{e(summary['run']['path'])}</span></h1>{_facts(summary)}</header>",
        f"<nav>{''.join(nav)}</nav><main>{''.join(sections)}</main>",
        f"<footer>freezeframe {e(_version())} · built {e(time.strftime('%Y-%m-%d %H:%M'))}</footer>",
        f'<script type="application/json" id="ff-data">{payload}</script>',
        f"<script>{BOOT}</script></body></html>\n",
    ])


def _version() -> str:
    from .._version import __version__

    return __version__


def write_html(run, path, *, data: dict | None = None, depth: int | None = None) -> Path:
    """Write the report to `path` (one self-contained file); returns the path. Refused, before
    any work, over a file of a run, over an existing file that is not HTML, in a directory that
    cannot be written (docs/run-format.md, "What is written where")."""
    from ..store.outputs import check_report_file, replacing

    path = check_report_file(path, runs=(run.path,) if getattr(run, "path", None) else ())
    with replacing(path) as f:
        f.write(render_html(run, data=data, depth=depth).encode("utf-8"))
    return path
