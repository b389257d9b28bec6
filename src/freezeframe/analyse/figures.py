"""Figure data for the report: pure functions from a run's summary and stored tables to plain dicts
and numpy arrays (freeze map, update heatmap, learning rates, drift, loss); renderers only draw them."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .names import _row_group, group_labels, is_fastai_layout, readable_name
from .rollup import auto_depth, rollup
from .heatmap import MAX_POINTS, _bins, aggregate, binned_median, envelope  # noqa: F401 - binned_median: a public name here
from .timeaxis import step_context, time_marks  # noqa: F401 - the renderers take them from here

MAX_COLUMNS = 2000      # the update heatmap shows at most this many step columns (then it bins steps)
MAX_HEATMAP_CELLS = 100_000  # ... and at most this many row x column cells (docs/report.md, "How figures are downsampled")
MIN_COLUMNS = 500       # ... but never fewer columns than this for that reason
FREEZE_MAP_ROWS = 40    # default rows of the freeze map and the drift figure (as `freezeframe summary`)
HEATMAP_ROWS = 120      # default rows of the update heatmap
SHADE_DECADES = 4       # freeze-map shade: drift_rel from 10**-SHADE_DECADES (lightest) to 1 (darkest)


# ----------------------------------------------------------------------------- rows
def _rows(summary: dict, depth: int) -> list[dict]:
    """The rollup at `depth`, each row with its name, a readable label and its layer group."""
    labels = group_labels(summary)
    fastai = is_fastai_layout(summary)
    rows = rollup(summary, depth)
    for r in rows:
        r["group"] = _row_group(r["groups"], labels)
        r["readable"] = readable_name(r["name"], fastai=fastai)
        r["label"] = f"{r['group']} · {r['readable']}"
    return rows


def _group_breaks(rows: list[dict]) -> list[int]:
    """Row indices where the layer group changes (drawn as separators when groups are contiguous)."""
    breaks = [i for i in range(1, len(rows)) if rows[i]["group"] != rows[i - 1]["group"]]
    return breaks if len(breaks) < len({r["group"] for r in rows}) else []


# ----------------------------------------------------------------------------- stages
def stages(summary: dict) -> list[dict]:
    out = []
    for s in summary["stages"]:
        label = f"{s['index']}: {s['name']}" + (" [trial]" if s["kind"] == "trial" else "")
        out.append({"index": s["index"], "name": s["name"], "label": label, "kind": s["kind"],
                    "first_step": s["first_step"], "last_step": s["last_step"], "steps": s["steps"],
                    "starts_from_previous_end": s["starts_from_previous_end"], "continuity": s["continuity"],
                    "changed_since_previous_end": len(s["changed_since_previous_end"]),
                    "epoch_starts": s.get("epoch_starts")})
    return out


def boundaries(summary: dict) -> list[float]:
    """x positions (in steps) of the boundaries between consecutive stages."""
    return [s["first_step"] - 0.5 for s in summary["stages"][1:] if s["first_step"] is not None]


def continuity_note(summary: dict) -> str:
    parts = []
    for s in summary["stages"][1:]:
        if s["starts_from_previous_end"] is True:
            parts.append(f"stage {s['index']} started where the previous stage ended "
                         f"({'bitwise' if s['continuity'] == 'bitwise' else 'no tensor written in between'})")
        elif s["starts_from_previous_end"] is False:
            parts.append(f"stage {s['index']} did NOT start where the previous stage ended "
                         f"({len(s['changed_since_previous_end'])} tensors differ)")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- freeze map
def _pct(x: float | None) -> str:
    if x is None:
        return ""
    return f"{100 * x:.2g} %" if x < 0.1 else f"{100 * x:.0f} %"


def shade(drift_rel: float | None) -> float:
    """0 (no movement) .. 1 (moved by its own norm or more), on a log scale of SHADE_DECADES decades."""
    if drift_rel is None or drift_rel <= 0:
        return 0.0
    return float(min(max((math.log10(drift_rel) + SHADE_DECADES) / SHADE_DECADES, 0.0), 1.0))


def _state(trainable) -> str | None:
    return {True: "trainable", False: "frozen", "partial": "partial"}.get(trainable) if trainable is not None else None


def _cell_text(state: str | None, changed, drift_rel) -> str:
    """e.g. "trains, changed, 13 % from start": changed = its bytes differ from the stage's start;
    the % is the distance from W_ref (relative L2) at the stage's end; "unchanged" = bitwise."""
    word = {"trainable": "trains", "frozen": "frozen", "partial": "partly trains", None: "?"}[state]
    if changed is True:
        return f"{word}, changed, {_pct(drift_rel)} from start" if drift_rel is not None else f"{word}, changed"
    if changed is False:
        return f"{word}, unchanged"
    return word


def freeze_map(summary: dict, depth: int | None = None, *, max_rows: int = FREEZE_MAP_ROWS) -> dict:
    """Modules (rolled up to `depth`) × stages: state (trainable / frozen / partial / None),
    bitwise changed, drift_rel at the stage's end, a 0..1 shade from drift, and the cell text."""
    depth = auto_depth(summary, max_rows) if depth is None else max(1, int(depth))
    rows = _rows(summary, depth)
    state = [[_state(e["trainable"]) for e in r["stages"]] for r in rows]
    changed = [[e["changed"] for e in r["stages"]] for r in rows]
    drift = [[e["drift_rel"] for e in r["stages"]] for r in rows]
    return {
        "depth": depth,
        "rows": [{"name": r["name"], "label": r["label"], "readable": r["readable"], "group": r["group"],
                  "types": r["types"], "numel": r["numel"], "tensors": len(r["params"])} for r in rows],
        "stages": stages(summary),
        "state": state,
        "changed": changed,
        "drift_rel": drift,
        "shade": [[shade(d) for d in row] for row in drift],
        "text": [[_cell_text(s, c, d) for s, c, d in zip(*cells)] for cells in zip(state, changed, drift)],
        "group_breaks": _group_breaks(rows),
    }


def drift(summary: dict, depth: int | None = None, *, max_rows: int = FREEZE_MAP_ROWS) -> dict:
    """Per module (rolled up to `depth`): drift_rel (distance from W_ref relative to ||W_ref||)
    at the end of each stage, with the continuity verdict of each stage."""
    fm = freeze_map(summary, depth, max_rows=max_rows)
    return {"depth": fm["depth"], "rows": fm["rows"], "stages": fm["stages"], "drift_rel": fm["drift_rel"],
            "state": fm["state"], "changed": fm["changed"], "group_breaks": fm["group_breaks"],
            "continuity": continuity_note(summary)}


# ----------------------------------------------------------------------------- update heatmap
def _np(table: pa.Table, name: str, dtype) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _points_note(shown: int, total: int, lines: int | None = None) -> str:
    what = f"{total:,} logged steps" if lines is None else f"{lines} lines of {total:,} steps in all"
    return (f"downsampled: {what} shown as {shown:,} points, each bin of consecutive steps by its "
            "lowest and highest value at their own steps")


def heatmap_rows(summary: dict, depth: int | None = None, *, max_rows: int = HEATMAP_ROWS) -> tuple[int, list[dict]]:
    """The update heatmap's depth and rows (the rollup at that depth)."""
    depth = auto_depth(summary, max_rows) if depth is None else max(1, int(depth))
    return depth, _rows(summary, depth)


def heatmap_columns(n_rows: int) -> int:
    """The most step columns the update heatmap of `n_rows` rows shows: MAX_COLUMNS, fewer when
    rows x columns would pass MAX_HEATMAP_CELLS (never fewer than MIN_COLUMNS), so that the
    report's size stays bounded whatever the model and the step count."""
    return min(MAX_COLUMNS, max(MIN_COLUMNS, MAX_HEATMAP_CELLS // max(n_rows, 1)))


def update_heatmap(summary: dict, steps: pa.Table, tensors, depth: int | None = None, *,
                   max_rows: int = HEATMAP_ROWS, max_columns: int | None = None, cells: dict | None = None) -> dict:
    """Modules (rolled up to `depth`) × recorded steps, colour = log10 of the update-to-weight ratio.

    More recorded steps than `max_columns` (default: `heatmap_columns` of the rows): consecutive
    steps of one stage are binned and each
    column holds the median of its steps (the note says so). Cells of a module frozen for the
    whole stage are marked in `frozen` (rows × stages), updates of exactly 0 and non-finite
    measurements in `zero` / `nonfinite` (rows × columns), so none is confused with a small value.
    `tensors`: the tensors table or a stored run (read block by block); `cells`: the heatmap part
    of `heatmap.aggregate` for these rows when already computed."""
    depth, rows = heatmap_rows(summary, depth, max_rows=max_rows)
    max_columns = heatmap_columns(len(rows)) if max_columns is None else max_columns
    m = aggregate(summary, steps, tensors, heat_rows=rows)["heatmap"] if cells is None else cells
    values, nonfinite, col_steps, col_stage = m["values"], m["nonfinite"], m["steps"], m["stage"]
    recorded = len(col_steps)
    stage_pos = {s["index"]: k for k, s in enumerate(summary["stages"])}
    downsampled = recorded > max_columns
    x, x_first, x_last, stage_col, bin_size = col_steps.astype(np.float64), col_steps, col_steps, col_stage, None
    if downsampled:
        edges = []
        seg_starts = np.flatnonzero(np.r_[True, col_stage[1:] != col_stage[:-1]])
        for a, b in zip(seg_starts, np.r_[seg_starts[1:], recorded]):
            k = min(b - a, max(1, int(max_columns * (b - a) / recorded)))
            edges.append(a + _bins(b - a, k)[:-1])
        lo = np.concatenate(edges)
        hi = np.r_[lo[1:], recorded]
        values = binned_median(values, lo, hi)
        nonfinite = np.add.reduceat(nonfinite, lo, axis=1)
        x_first, x_last, stage_col = col_steps[lo], col_steps[hi - 1], col_stage[lo]
        x = (x_first + x_last) / 2
        bin_size = recorded / len(lo)
    shown = np.where(np.isfinite(values), values, np.nan).astype(np.float32)
    frozen = np.array([[e["trainable"] is False for e in r["stages"]] for r in rows], dtype=bool).reshape(
        len(rows), len(summary["stages"]))
    n_steps = summary["run"]["steps"]
    if downsampled:
        note = (f"downsampled: {recorded:,} recorded steps shown as {values.shape[1]:,} columns, each the median "
                f"of about {bin_size:.0f} consecutive steps of one stage")
    elif recorded < n_steps:
        note = f"{recorded:,} of {n_steps:,} steps recorded (every N-th step; the first of every stage)"
    else:
        note = f"every one of the {n_steps:,} steps"
    finite_vals = shown[np.isfinite(shown)]
    col_epoch, col_batch = step_context(summary, np.asarray(x_first))
    return {
        "epoch": col_epoch, "batch": col_batch,  # of each column's (first) step: 0 = no epochs announced
        "depth": depth,
        "rows": [{"name": r["name"], "label": r["label"], "readable": r["readable"], "group": r["group"],
                  "types": r["types"], "numel": r["numel"], "tensors": len(r["params"])} for r in rows],
        "stages": stages(summary),
        "x": x, "x_first": np.asarray(x_first), "x_last": np.asarray(x_last),
        "stage_of_column": np.asarray([stage_pos.get(int(s), -1) for s in stage_col], dtype=np.int64),
        "values": shown,
        "zero": np.isneginf(values),
        "nonfinite": nonfinite > 0,
        "frozen": frozen,
        "range": (float(finite_vals.min()), float(finite_vals.max())) if finite_vals.size else None,
        "recorded_steps": recorded, "downsampled": downsampled, "aggregate": "median" if downsampled else None,
        "bin_size": bin_size, "note": note, "group_breaks": _group_breaks(rows),
        "boundaries": boundaries(summary),
    }


# ----------------------------------------------------------------------------- learning rates
def learning_rates(summary: dict, steps: pa.Table) -> dict:
    """Per param group and stage: the lr applied at each step its optimizer took."""
    step = _np(steps, "step", np.int64)
    stage = _np(steps, "stage", np.int64)
    opt = steps.column("optimizer").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    lr_col = steps.column("lr")
    if isinstance(lr_col, pa.ChunkedArray):
        lr_col = lr_col.combine_chunks() if lr_col.num_chunks else pa.array([], lr_col.type)
    lengths = pc.list_value_length(lr_col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = lr_col.offsets.to_numpy().astype(np.int64)[:-1] if len(lr_col) else np.zeros(0, np.int64)
    flat = lr_col.values.to_numpy(zero_copy_only=False).astype(np.float64) if len(lr_col) else np.zeros(0)
    labels = group_labels(summary)
    series = []
    for s in summary["stages"]:
        for g in s["groups"]:
            gi = g["index"]
            sel = np.flatnonzero((stage == s["index"]) & (opt == g["optimizer"]) & (lengths > gi))
            lr = flat[offsets[sel] + gi]
            keep, edges = envelope(lr)   # a long stage: each bin's lowest and highest lr (docs/report.md)
            ep, bt = step_context(summary, step[sel[keep]])
            series.append({"group": gi, "name": g["name"], "layer_group": labels.get(gi, g["name"]),
                           "stage": s["index"], "stage_name": s["name"], "lr_max": g["lr_max"],
                           "steps": step[sel[keep]], "lr": lr[keep], "epoch": ep, "batch": bt})
            if edges is not None:
                series[-1].update(steps_total=len(sel), bin_first=step[sel[edges[:-1]]],
                                  bin_last=step[sel[edges[1:] - 1]])
    out = {"series": series, "stages": stages(summary), "boundaries": boundaries(summary),
           "layer_groups": list(dict.fromkeys(labels[g] for g in sorted(labels)))}
    cut = [x for x in series if "steps_total" in x]
    if cut:
        out["note"] = _points_note(sum(len(x["steps"]) for x in cut), sum(x["steps_total"] for x in cut), len(cut))
    return out


def epoch_values(summary: dict) -> dict:
    """Per-epoch values of every stage (`stages[].epoch_metrics`): one row per epoch with its
    stage, epoch (1-based), first and last step, values by name; `names` in first-seen order."""
    rows, names = [], {}
    for s in summary["stages"]:
        em = s.get("epoch_metrics") or []
        for k, e in enumerate(em):
            last = em[k + 1]["first_step"] - 1 if k + 1 < len(em) else s["last_step"]
            values = (e or {}).get("values") or {}
            names.update(dict.fromkeys(values))
            rows.append({"stage": s["index"], "stage_label": f"{s['index']}: {s['name']}", "epoch": k + 1,
                         "first_step": e["first_step"], "last_step": last, "values": values})
    return {"rows": rows, "names": list(names)}


# ----------------------------------------------------------------------------- loss
def loss(scalars: pa.Table, name: str = "loss", summary: dict | None = None) -> dict | None:
    """The last `name` value logged at each step (None when the run logged none), with each
    step's stage, epoch and batch when `summary` is given (stage -1: outside every stage)."""
    if scalars.num_rows == 0:
        return None
    sel = scalars.filter(pc.equal(scalars.column("name"), name))
    if sel.num_rows == 0:
        return None
    step = _np(sel, "step", np.int64)
    value = _np(sel, "value", np.float64)
    order = np.argsort(step, kind="stable")
    step, value = step[order], value[order]
    last = np.r_[step[1:] != step[:-1], True]
    out = {"name": name, "steps": step[last], "values": value[last]}
    stage = np.full(len(out["steps"]), -1, np.int64)
    for s in (s for s in (summary or {}).get("stages", []) if s["first_step"] is not None):
        stage[(out["steps"] >= s["first_step"]) & (out["steps"] <= s["last_step"])] = s["index"]
    keep, first, lastb = [], [], []
    for idx in dict.fromkeys(stage.tolist()):   # each stage's line on its own (one trace each)
        sel = np.flatnonzero(stage == idx)
        k, edges = envelope(out["values"][sel])
        keep.append(sel[k])
        if edges is not None:
            first.append(out["steps"][sel[edges[:-1]]])
            lastb.append(out["steps"][sel[edges[1:] - 1]])
    if first:                      # downsampled: each bin's lowest and highest value (docs/report.md)
        total, keep = len(stage), np.sort(np.concatenate(keep))
        out = {"name": name, "steps": out["steps"][keep], "values": out["values"][keep]}
        stage = stage[keep]
        out.update(steps_total=total, bin_first=np.concatenate(first), bin_last=np.concatenate(lastb),
                   note=_points_note(len(keep), total))
    if summary is not None:
        out["stage"] = stage
        out["epoch"], out["batch"] = step_context(summary, out["steps"])
    return out


# ----------------------------------------------------------------------------- everything
def figure_data(summary: dict, steps: pa.Table, tensors, scalars: pa.Table, *,
                depth: int | None = None, heatmap_depth: int | None = None,
                max_columns: int | None = None) -> dict:
    """Everything the report draws. `depth`: module-tree depth of the freeze map and the drift
    figure (default: fits ~40 rows); `heatmap_depth`: of the update heatmap (default: ~120 rows).
    `tensors`: the tensors table or a stored run, read once, block by block, for both the heatmap
    and the scrubber (analyse/heatmap.py)."""
    from .timeline import frames, layer_view, timeline   # the layer view and the scrubber (docs/report.md)

    hm_depth, hm_rows = heatmap_rows(summary, heatmap_depth)
    fr = frames(summary, steps)
    cells = aggregate(summary, steps, tensors, heat_rows=hm_rows, layer_rows=fr["rows"],
                      frame_of_pos=fr["frame_of_pos"], F=fr["F"])       # one pass over the tensor rows
    out = {
        "stages": stages(summary),
        "boundaries": boundaries(summary),
        "freeze_map": freeze_map(summary, depth),
        "heatmap": update_heatmap(summary, steps, tensors, hm_depth, max_columns=max_columns, cells=cells["heatmap"]),
        "lr": learning_rates(summary, steps),
        "drift": drift(summary, depth),
        "loss": loss(scalars, summary=summary),
        "epochs": epoch_values(summary),
    }
    out["layer_view"] = layer_view(summary)
    out["timeline"] = timeline(summary, steps, tensors, scalars, update=cells.get("timeline"), fr=fr)
    return out


FIGURES = ("freeze_map", "heatmap", "lr", "drift", "loss")


def one_figure(run, name: str, *, depth: int | None = None) -> dict | None:
    """The data of one figure of a `Run` (None for "loss" when the run logged none)."""
    summary, stored = run.summary(), run._stored
    make = {"freeze_map": lambda: freeze_map(summary, depth),
            "heatmap": lambda: update_heatmap(summary, stored.steps, stored, depth),
            "lr": lambda: learning_rates(summary, stored.steps), "drift": lambda: drift(summary, depth),
            "loss": lambda: loss(stored.scalars, summary=summary)}
    if name not in make:
        raise ValueError(f"unknown figure {name!r}; the figures are {', '.join(map(repr, FIGURES))}")
    return make[name]()


def from_run(run, **options) -> dict:
    """`figure_data` of a `Run`. Reads the stored tables as written: `Run.steps()` joins the loss
    and `Run.tensors()` adds names, neither needed here; the tensors table is streamed from its
    files, never loaded whole."""
    stored = run._stored
    return figure_data(run.summary(), stored.steps, stored, stored.scalars, **options)
