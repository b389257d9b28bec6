"""The report's figures as plotly figure dicts (freeze map, update heatmap, learning rates, drift,
loss, per-epoch values), drawn from `analyse.figures` data; every name from the model is escaped.
Every chart whose x axis is the optimizer step carries the epoch ticks and stage events
(docs/report.md, "Reading the time axis")."""

from __future__ import annotations

import html

import numpy as np

# Colours shared by every renderer (HTML, PNG, notebook).
STATE_COLORS = {  # (lightest, darkest) per state; the shade between them is how far the module moved
    "frozen": ("#dce6f2", "#2f5d8a"),
    "partial": ("#fbe7c0", "#c77a00"),
    "trainable": ("#d7efd4", "#1e7a34"),
}
STATE_LABELS = {"trainable": "trains", "partial": "partly trains (e.g. only its BatchNorm layers)",
                "frozen": "frozen"}
UNKNOWN_COLOR = "#eeeeee"
FROZEN_CELL = "#b9b9b9"
GROUP_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
                "#7f7f7f", "#bcbd22"]
GROUP_DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]
GROUP_MARKERS = ["circle-open", "square", "diamond", "triangle-up", "x"]
STAGE_COLORS = ["#e6550d", "#3182bd", "#31a354", "#756bb1", "#636363", "#d6616b"]
STAGE_FILLS = ["rgba(31,119,180,0.07)", "rgba(255,127,14,0.08)"]
MARKED_CELLS = (("zero", "update exactly 0", "#ff3d7f"),  # (figure-data key, legend, colour) of cells that
                ("nonfinite", "non-finite update (NaN/Inf)", "#000000"))  # must not read as small values
STATE_Z = {"frozen": 0.0, "partial": 1.0, "trainable": 2.0}
EVENT_COLOR = "#b3261e"
MAX_EPOCH_LABELS = 16   # more epochs than this on one chart: every k-th epoch is labelled (all get a line)
STEP_AXIS = {"title": {"text": "optimizer step"}, "zeroline": False}

e = html.escape


def mix(lo: str, hi: str, t: float) -> str:
    a = [int(lo[i:i + 2], 16) for i in (1, 3, 5)]
    b = [int(hi[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b))


# ----------------------------------------------------------------------------- shared pieces
def _group_color(label: str, order: list[str]) -> str:
    return GROUP_COLORS[order.index(label) % len(GROUP_COLORS)] if label in order else "#555555"


def time_decor(stages: list[dict], boundaries: list[float], timeline: dict | None, *,
               shade: bool) -> tuple[list, list]:
    """Shapes and annotations over a step axis: stage shading and labels, the stage boundaries
    with the event that began each stage (`unfreeze()` …), and a dotted line at every epoch start
    with its label (shapes named "ff-epoch" / "ff-event")."""
    shapes, notes = [], []
    for k, s in enumerate(stages):
        if s["first_step"] is None:
            continue
        x0, x1 = s["first_step"] - 0.5, s["last_step"] + 0.5
        if shade:
            shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": x0, "x1": x1, "y0": 0, "y1": 1,
                           "fillcolor": STAGE_FILLS[k % 2], "line": {"width": 0}, "layer": "below"})
        notes.append({"x": (x0 + x1) / 2, "y": 1, "xref": "x", "yref": "paper", "yanchor": "bottom", "yshift": 15,
                      "showarrow": False, "text": f"stage {e(s['label'])}", "font": {"size": 11, "color": "#444"}})
    timeline = timeline or {}
    events = {float(ev["step"]): ev["label"] for ev in timeline.get("events") or []}
    for b in sorted(set(boundaries) | set(events)):
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": b, "x1": b, "y0": 0, "y1": 1,
                       "name": "ff-event", "line": {"color": "#333", "width": 1.5, "dash": "dash"}})
        if b in events:
            notes.append({"x": b, "y": 1, "xref": "x", "yref": "paper", "yanchor": "bottom", "xanchor": "left",
                          "yshift": 30, "showarrow": False, "text": f"▸ {e(str(events[b]))}",
                          "font": {"size": 11, "color": EVENT_COLOR}})
    ticks = timeline.get("epoch_ticks") or []
    every = max(1, -(-len(ticks) // MAX_EPOCH_LABELS))
    start = min((s["first_step"] - 0.5 for s in stages if s["first_step"] is not None), default=None)
    for k, t in enumerate(ticks):
        x = t["step"] - 0.5
        if x not in events and x not in boundaries and x != start:   # the axis' left edge needs no line
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
                           "name": "ff-epoch", "line": {"color": "rgba(90,90,90,0.45)", "width": 1, "dash": "dot"}})
        if k % every == 0 or t["label"].endswith(" 1"):
            notes.append({"x": x, "y": 1, "xref": "x", "yref": "paper", "yanchor": "bottom", "xanchor": "left",
                          "showarrow": False, "text": e(str(t["label"])), "name": "ff-epoch",
                          "font": {"size": 9, "color": "#777"}})
    return shapes, notes


def _layout(title: str, height: int, **extra) -> dict:
    layout = {"title": {"text": title, "x": 0, "xanchor": "left", "font": {"size": 15}},
              "height": height, "margin": {"l": 70, "r": 30, "t": 90, "b": 50},
              "font": {"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12},
              "paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff", "hoverlabel": {"align": "left"}}
    layout.update(extra)
    return layout


def row_names(rows: list[dict]) -> list[str]:
    """The y value of each row: its readable label (the same text on the axis and in every hover),
    made unique with the module's name where two labels coincide."""
    labels = [r["label"] for r in rows]
    seen = {x: labels.count(x) for x in labels}
    return [e(x if seen[x] == 1 else f"{x} ({r['name']})") for x, r in zip(labels, rows)]


def _category_axis(rows: list[dict], breaks: list[int]) -> tuple[dict, list]:
    names = row_names(rows)
    axis = {"type": "category", "autorange": "reversed", "tickmode": "array", "tickvals": names, "ticktext": names,
            "automargin": True, "showgrid": False, "categoryorder": "array", "categoryarray": names}
    shapes = [{"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": b - 0.5, "y1": b - 0.5,
               "line": {"color": "#333", "width": 1}} for b in breaks]
    return axis, shapes


def _context(epoch: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """(…, 2) [epoch, batch] in the smallest unsigned dtype that holds them (hover customdata)."""
    both = np.stack([np.asarray(epoch), np.asarray(batch)], axis=-1)
    top = int(both.max()) if both.size else 0
    return both.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)


def when(stage_index: int, has_epochs: bool, *, binned: bool = False) -> str:
    """Hover line "stage 1 · epoch 2 · batch 7 · step 37" (customdata holds [epoch, batch])."""
    if binned:
        ep = " · epoch %{customdata[0]}" if has_epochs else ""
        return f"stage {stage_index}{ep} · steps around %{{x:.0f}} (median of the bin)"
    ep = " · epoch %{customdata[0]} · batch %{customdata[1]}" if has_epochs else ""
    return f"stage {stage_index}{ep} · step %{{x}}"


def _swatch(name: str, color: str, **extra) -> dict:
    return {"type": "scatter", "x": [None], "y": [None], "mode": "markers", "name": name, "hoverinfo": "skip",
            "marker": {"symbol": "square", "size": 14, "color": color, "line": {"width": 1, "color": "#888"}},
            **extra}


# ----------------------------------------------------------------------------- the figures
def freeze_map_figure(fm: dict) -> dict:
    rows, stages = fm["rows"], fm["stages"]
    names = row_names(rows)
    xs = [e(s["label"]) for s in stages]
    z = [[None if st is None else STATE_Z[st] + min(sh, 0.999) for st, sh in zip(srow, hrow)]
         for srow, hrow in zip(fm["state"], fm["shade"])]
    hover = []
    for r, row in enumerate(rows):
        line = []
        for k, s in enumerate(stages):
            d, ch = fm["drift_rel"][r][k], fm["changed"][r][k]
            line.append(f"<b>{names[r]}</b><br>module {e(row['name'] or '(root)')} ({e(', '.join(row['types']))})<br>"
                        f"{e(row['group'])} · {row['tensors']} tensors · {row['numel']:,} parameters<br>"
                        f"stage {e(s['label'])}: {STATE_LABELS.get(fm['state'][r][k], 'unknown')}; "
                        f"{'changed (bytes differ from the stage start)' if ch else 'bitwise unchanged' if ch is False else 'change unknown'}"
                        f"<br>at the stage end: {'?' if d is None else f'{100 * d:.3g} %'} from start (relative L2)")
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
    legend = []
    for st in ("trainable", "partial", "frozen"):      # only states some cell has, in the cells' colour
        shades = [sh for srow, hrow in zip(fm["state"], fm["shade"]) for x, sh in zip(srow, hrow) if x == st]
        if shades:
            legend.append(_swatch(STATE_LABELS[st], mix(*STATE_COLORS[st], float(np.median(shades))),
                                  meta={"state": st}))
    yaxis, shapes = _category_axis(rows, fm["group_breaks"])
    title = (f"Freeze map — module tree to depth {fm['depth']}<br><sup>changed = bytes differ from the stage's "
             "start; unchanged = bitwise equal; 13 % from start = distance from the weights watching began with "
             "(relative L2) at the stage's end; darker = further</sup>")
    return {"data": [trace] + legend,
            "layout": _layout(title, max(260, 120 + 26 * len(rows)), yaxis=yaxis, shapes=shapes,
                              xaxis={"type": "category", "side": "top", "showgrid": False},
                              legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
                              margin={"l": 70, "r": 30, "t": 110, "b": 50})}


def heatmap_figure(hm: dict, timeline: dict | None = None) -> dict:
    rows, stages = hm["rows"], hm["stages"]
    names = row_names(rows)
    traces = []
    col_stage = np.asarray(hm["stage_of_column"])
    ctx = _context(hm["epoch"], hm["batch"]) if "epoch" in hm else None
    any_frozen = False
    for k, s in enumerate(stages):
        cols = np.flatnonzero(col_stage == k)
        frozen = [[1.0 if f else None] for f in hm["frozen"][:, k]] if len(rows) else []
        if s["first_step"] is not None and any(v[0] for v in frozen):
            any_frozen = True
            traces.append({"type": "heatmap", "x": [s["first_step"] - 0.5, s["last_step"] + 0.5], "y": names,
                           "z": frozen, "zmin": 0, "zmax": 1, "showscale": False, "hoverongaps": False,
                           "colorscale": [[0, FROZEN_CELL], [1, FROZEN_CELL]], "name": f"frozen, stage {s['index']}",
                           "hovertemplate": f"<b>%{{y}}</b><br>stage {e(s['label'])}<br>frozen: not trainable in "
                                            "this stage, never updated<extra></extra>"})
        if not len(cols):
            continue
        has_epochs = ctx is not None and bool(np.asarray(hm["epoch"])[cols].any())
        trace = {"type": "heatmap", "x": np.asarray(hm["x"])[cols], "y": names, "z": hm["values"][:, cols],
                 "coloraxis": "coloraxis", "hoverongaps": False, "name": f"stage {s['index']}",
                 "meta": {"stage": s["index"]},
                 "hovertemplate": f"<b>%{{y}}</b><br>{when(s['index'], has_epochs, binned=hm['downsampled'])}<br>"
                                  f"stage {e(s['label'])}<br>log10(‖ΔW‖ / ‖W‖) = %{{z:.2f}}<extra></extra>"}
        if has_epochs:
            trace["customdata"] = np.ascontiguousarray(np.broadcast_to(ctx[cols], (len(rows), len(cols), 2)))
        traces.append(trace)
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
                           "hovertemplate": f"<b>%{{y}}</b><br>{when(s['index'], False, binned=hm['downsampled'])}"
                                            f"<br>stage {e(s['label'])}<br>{label}<extra></extra>"})
        if mask.any():
            traces.append(_swatch(label, color))
    if any_frozen:
        traces.append(_swatch("frozen in the stage", FROZEN_CELL))
    shapes, notes = time_decor(stages, hm["boundaries"], timeline, shade=False)
    yaxis, gshapes = _category_axis(rows, hm["group_breaks"])
    cmin, cmax = hm["range"] or (-6.0, 0.0)
    title = f"Update size per module and step: log10(‖ΔW‖ / ‖W‖), depth {hm['depth']}<br><sup>{e(hm['note'])}</sup>"
    return {"data": traces,
            "layout": _layout(title, min(2400, max(380, 240 + 20 * len(rows))), yaxis=yaxis,
                              shapes=shapes + gshapes, annotations=notes,
                              xaxis={**STEP_AXIS, "showgrid": False, "range": _step_range(stages)},
                              coloraxis={"colorscale": "Viridis", "cmin": cmin, "cmax": cmax,
                                         "colorbar": {"title": {"text": "log10<br>ratio"}, "len": 0.8}},
                              legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
                              margin={"l": 70, "r": 30, "t": 140, "b": 100})}


def _step_range(stages: list[dict]) -> list[float] | None:
    known = [s for s in stages if s["first_step"] is not None]
    return [known[0]["first_step"] - 0.5, known[-1]["last_step"] + 0.5] if known else None


def _sub(note: str | None) -> str:
    """A figure's second title line saying how its data was downsampled (none: nothing was)."""
    return f"<br><sup>{e(note)}</sup>" if note else ""


def lr_figure(lr: dict, timeline: dict | None = None) -> dict:
    """One line per layer group and stage. Groups of one stage that share an lr are drawn with
    decreasing widths and their own dash, so every one stays visible, and the stage says so."""
    order = lr["layer_groups"]
    traces, shown, notes_same = [], set(), []
    by_stage: dict[int, list[dict]] = {}
    for s in lr["series"]:
        if len(s["steps"]):
            by_stage.setdefault(s["stage"], []).append(s)
    for stage, series in by_stage.items():
        first = series[0]
        same = len(series) > 1 and all(np.array_equal(x["lr"], first["lr"]) and np.array_equal(x["steps"], first["steps"])
                                       for x in series[1:])
        if same:
            notes_same.append((stage, first["steps"], ", ".join(e(x["layer_group"]) for x in series)))
        for k, s in enumerate(series):
            lg = s["layer_group"]
            has_epochs = "epoch" in s and bool(np.asarray(s["epoch"]).any())
            trace = {"type": "scatter", "mode": "lines+markers" if len(s["steps"]) < 3 else "lines",
                     "x": s["steps"], "y": s["lr"], "name": e(lg), "legendgroup": e(lg),
                     "showlegend": lg not in shown,
                     "line": {"color": _group_color(lg, order), "width": max(1.5, 5 - 1.3 * k),
                              "dash": GROUP_DASHES[k % len(GROUP_DASHES)]},
                     "meta": {"group": s["group"], "stage": s["stage"]},
                     "hovertemplate": f"<b>{e(lg)}</b> ({e(s['name'])})<br>{when(stage, has_epochs)}<br>"
                                      f"stage {stage}: {e(s['stage_name'])}<br>lr %{{y:.4g}}<extra></extra>"}
            if has_epochs:
                trace["customdata"] = _context(s["epoch"], s["batch"])
            if same:  # one line drawn over the others: each group gets its own marker too
                trace.update(mode="lines+markers", marker={"symbol": GROUP_MARKERS[k % len(GROUP_MARKERS)],
                                                           "size": 8, "maxdisplayed": 12})
            traces.append(trace)
            shown.add(lg)
    shapes, notes = time_decor(lr["stages"], lr["boundaries"], timeline, shade=True)
    for stage, steps, groups in notes_same:
        notes.append({"x": float(np.median(steps)), "y": 0.02, "xref": "x", "yref": "paper", "yanchor": "bottom",
                      "showarrow": False, "text": f"one lr for {groups}", "font": {"size": 10, "color": "#555"}})
    return {"data": traces,
            "layout": _layout("Learning rate of every layer group at every step (log scale)" + _sub(lr.get("note")), 440,
                              shapes=shapes,
                              annotations=notes, yaxis={"type": "log", "title": {"text": "learning rate"},
                                                        "exponentformat": "power"},
                              xaxis=dict(STEP_AXIS), margin={"l": 70, "r": 30, "t": 120, "b": 50},
                              legend={"title": {"text": "layer group (click to toggle)"}})}


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Powers of ten from lo to hi (fractions), as percentages: few ticks, each readable."""
    out = [10.0 ** p for p in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)]
    return out, [f"{100 * v:.4g} %" for v in out]


def drift_figure(dr: dict) -> dict:
    """A dumbbell per module: its distance from the reference at the end of each stage, joined.
    Earlier stages are open rings, later ones smaller filled dots, so neither hides the other;
    on the log scale a distance of exactly 0 sits on a floor tick "0 (bitwise unchanged)"."""
    rows, stages = dr["rows"], dr["stages"]
    names = row_names(rows)
    drift = [list(row) for row in dr["drift_rel"]]
    positive = [d for row in drift for d in row if d]
    floor = (min(positive) / 4) if positive else 1e-6
    top = max(positive) if positive else 1.0

    def connector(zero: float):
        cx, cy = [], []
        for r, name in enumerate(names):
            pts = [zero if d == 0 else d for d in drift[r] if d is not None]
            if len(pts) > 1:
                cx += pts + [None]
                cy += [name] * len(pts) + [None]
        return cx, cy

    cx, cy = connector(0.0)
    traces = [{"type": "scatter", "mode": "lines", "x": cx, "y": cy, "showlegend": False, "hoverinfo": "skip",
               "line": {"color": "#9aa4ae", "width": 2}}]
    shades = [STAGE_COLORS[k % len(STAGE_COLORS)] for k in range(len(stages))]
    last = len(stages) - 1
    for k, s in enumerate(stages):
        ring = k < last
        traces.append({"type": "scatter", "mode": "markers", "x": [row[k] for row in drift], "y": names,
                       "name": f"end of stage {e(s['label'])}", "meta": {"stage": s["index"]},
                       "customdata": [("0 (bitwise unchanged)" if row[k] == 0 else "?" if row[k] is None
                                       else f"{100 * row[k]:.3g} %") for row in drift],
                       "marker": {"size": 15 if ring else 8, "color": shades[k],
                                  "symbol": "circle-open" if ring else "circle",
                                  "line": {"width": 2.5 if ring else 1, "color": shades[k] if ring else "#fff"}},
                       "hovertemplate": f"<b>%{{y}}</b><br>end of stage {e(s['label'])}<br>distance from the "
                                        "reference: %{customdata} (relative L2)<extra></extra>"})
    ticks, labels = _log_ticks(floor * 4, top)
    log_x = [connector(floor)[0]] + [[floor if row[k] == 0 else row[k] for row in drift] for k in range(len(stages))]
    lin_x = [cx] + [[row[k] for row in drift] for k in range(len(stages))]
    menus = [{"type": "buttons", "direction": "right", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom",
              "pad": {"b": 4},
              "buttons": [{"label": "linear", "method": "update",
                           "args": [{"x": lin_x}, {"xaxis.type": "linear", "xaxis.tickmode": "auto",
                                                   "xaxis.nticks": 8, "xaxis.autorange": True}]},
                          {"label": "log", "method": "update",
                           "args": [{"x": log_x}, {"xaxis.type": "log", "xaxis.tickmode": "array",
                                                   "xaxis.tickvals": [floor] + ticks,
                                                   "xaxis.ticktext": ["0 (bitwise unchanged)"] + labels,
                                                   "xaxis.autorange": True}]}]}]
    note = dr["continuity"] or "a single stage"
    title = (f"Distance from the reference (pretrained) weights at the end of each stage, ‖W − W_ref‖ / ‖W_ref‖"
             f"<br><sup>{e(note)}</sup>")
    yaxis, shapes = _category_axis(rows, dr.get("group_breaks", []))
    return {"data": traces,
            "layout": _layout(title, max(320, 170 + 24 * len(rows)), updatemenus=menus, yaxis=yaxis, shapes=shapes,
                              xaxis={"tickformat": ".2~%", "nticks": 8, "rangemode": "tozero", "side": "bottom",
                                     "title": {"text": "relative L2 distance from the reference weights"}},
                              legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
                              margin={"l": 70, "r": 30, "t": 90, "b": 90})}


def loss_figure(ls: dict, stages: list[dict], boundaries: list[float], timeline: dict | None = None) -> dict:
    """The logged loss, one trace per stage, hover "stage 1 · epoch 2 · batch 7 · step 37"."""
    steps = np.asarray(ls["steps"])
    stage_of = np.asarray(ls.get("stage", np.full(len(steps), -1)))
    traces = []
    for idx in dict.fromkeys(stage_of.tolist()):
        sel = np.flatnonzero(stage_of == idx)
        has_epochs = "epoch" in ls and bool(np.asarray(ls["epoch"])[sel].any())
        where = when(idx, has_epochs) if idx >= 0 else "step %{x}"
        trace = {"type": "scatter", "mode": "lines", "x": steps[sel], "y": np.asarray(ls["values"])[sel],
                 "name": e(ls["name"]), "meta": {"stage": idx}, "line": {"color": "#333", "width": 1.2},
                 "hovertemplate": f"{where}<br>{e(ls['name'])} %{{y:.4g}}<extra></extra>"}
        if has_epochs:
            trace["customdata"] = _context(np.asarray(ls["epoch"])[sel], np.asarray(ls["batch"])[sel])
        traces.append(trace)
    shapes, notes = time_decor(stages, boundaries, timeline, shade=True)
    return {"data": traces,
            "layout": _layout(f"{e(ls['name'])} per step, as logged (stages shaded)" + _sub(ls.get("note")), 400,
                              shapes=shapes,
                              annotations=notes, showlegend=False, yaxis={"title": {"text": e(ls["name"])}},
                              xaxis=dict(STEP_AXIS), margin={"l": 70, "r": 30, "t": 120, "b": 50})}


TIME_CHARTS = ("heatmap", "lr", "loss", "epochs")   # figures whose x axis is the optimizer step


def plotly_figures(data: dict) -> dict[str, dict]:
    """Every figure as a plotly figure dict (numpy arrays left as they are)."""
    tl = data.get("timeline")
    out = {"freeze_map": freeze_map_figure(data["freeze_map"]), "heatmap": heatmap_figure(data["heatmap"], tl),
           "lr": lr_figure(data["lr"], tl), "drift": drift_figure(data["drift"])}
    if data["loss"] is not None:
        out["loss"] = loss_figure(data["loss"], data["stages"], data["boundaries"], tl)
    if data.get("epochs") and data["epochs"]["rows"]:
        from .panels import epochs_figure

        out["epochs"] = epochs_figure(data["epochs"], data["stages"], data["boundaries"], tl)
    return out
