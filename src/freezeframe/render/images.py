"""Every report figure as a PNG, drawn with matplotlib's Agg canvas (no browser, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .charts import FROZEN_CELL, GROUP_COLORS, MARKED_CELLS, STAGE_COLORS, STATE_COLORS, STATE_LABELS, UNKNOWN_COLOR

DPI = 110
FILES = {"freeze_map": "freeze_map.png", "heatmap": "update_heatmap.png", "lr": "learning_rates.png",
         "drift": "drift.png", "loss": "loss.png"}


def _t(s: str) -> str:
    """Text shown as written: a `$` in a model's name must not start matplotlib mathtext."""
    return str(s).replace("$", r"\$")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    from ..store.outputs import replacing

    with replacing(path) as f:  # complete or not there at all
        fig.savefig(f, format="png", dpi=DPI, facecolor="white")
    return path


def _rgb(hex_color: str) -> np.ndarray:
    h = hex_color.lstrip("#")
    return np.array([int(h[i:i + 2], 16) / 255 for i in (0, 2, 4)])


def _cell_color(state, shade: float) -> np.ndarray:
    if state is None:
        return _rgb(UNKNOWN_COLOR)
    lo, hi = (_rgb(c) for c in STATE_COLORS[state])
    return lo + (hi - lo) * shade


def _row_axis(ax, rows: list[dict], breaks: list[int]) -> None:
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_t(r["label"]) for r in rows], fontsize=8)
    for b in breaks:
        ax.axhline(b - 0.5, color="#333", linewidth=0.9)


def _stage_decor(ax, stages: list[dict], boundaries: list[float], *, shade: bool) -> None:
    for k, s in enumerate(stages):
        if s["first_step"] is None:
            continue
        x0, x1 = s["first_step"] - 0.5, s["last_step"] + 0.5
        if shade:
            ax.axvspan(x0, x1, color=("#1f77b4" if k % 2 == 0 else "#ff7f0e"), alpha=0.07, linewidth=0)
        ax.text((x0 + x1) / 2, 1.01, _t(s["label"]), transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8, color="#444", clip_on=False)
    for b in boundaries:
        ax.axvline(b, color="#333", linestyle="--", linewidth=1)


# ----------------------------------------------------------------------------- the figures
def freeze_map_png(fm: dict, path: Path) -> Path:
    from matplotlib.patches import Patch

    rows, stages = fm["rows"], fm["stages"]
    R, S = len(rows), len(stages)
    img = np.ones((R, S, 3))
    for r in range(R):
        for k in range(S):
            img[r, k] = _cell_color(fm["state"][r][k], fm["shade"][r][k])
    fig = _figure(max(7.0, 3.5 + 2.2 * S), 2.2 + 0.26 * R)
    ax = fig.add_subplot()
    ax.imshow(img, aspect="auto", interpolation="nearest")
    for r in range(R):
        for k in range(S):
            dark = fm["state"][r][k] is not None and fm["shade"][r][k] > 0.55
            ax.text(k, r, _t(fm["text"][r][k]), ha="center", va="center", fontsize=7.5,
                    color="white" if dark else "#222")
    ax.set_xticks(range(S))
    ax.set_xticklabels([_t(s["label"]) for s in stages], fontsize=8)
    ax.xaxis.tick_top()
    _row_axis(ax, rows, fm["group_breaks"])
    ax.tick_params(length=0)
    # the title above the stage labels (constrained layout makes room for a suptitle, never cuts it)
    fig.suptitle(f"Freeze map (module tree to depth {fm['depth']})\nchanged = bytes differ from the stage's start; "
                 "unchanged = bitwise equal;\n% from start = distance from the weights watching began with "
                 "(relative L2), at the stage's end", fontsize=9, x=0.01, ha="left")
    handles = []
    for st in ("trainable", "partial", "frozen"):     # only states some cell has, in the cells' colour
        shades = [sh for srow, hrow in zip(fm["state"], fm["shade"]) for x, sh in zip(srow, hrow) if x == st]
        if shades:
            handles.append(Patch(facecolor=_cell_color(st, float(np.median(shades))), edgecolor="#888",
                                 label=STATE_LABELS[st]))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return _save(fig, path)


def heatmap_png(hm: dict, path: Path) -> Path:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    rows, stages = hm["rows"], hm["stages"]
    R = len(rows)
    x = np.asarray(hm["x"], dtype=np.float64)
    fig = _figure(12, 2.0 + 0.2 * R)
    ax = fig.add_subplot()
    for k, s in enumerate(stages):
        if s["first_step"] is None:
            continue
        for r in np.flatnonzero(hm["frozen"][:, k]):
            ax.add_patch(Rectangle((s["first_step"] - 0.5, r - 0.5), s["last_step"] - s["first_step"] + 1, 1,
                                   color=FROZEN_CELL, linewidth=0, zorder=0))
    mesh = None
    if len(x):
        mid = (x[1:] + x[:-1]) / 2
        first = x[0] - (mid[0] - x[0] if len(mid) else 0.5)
        last = x[-1] + (x[-1] - mid[-1] if len(mid) else 0.5)
        edges = np.r_[first, mid, last]
        lo, hi = hm["range"] or (-6.0, 0.0)
        mesh = ax.pcolormesh(edges, np.arange(R + 1) - 0.5, np.ma.masked_invalid(hm["values"]), cmap="viridis",
                             vmin=lo, vmax=hi, shading="flat", zorder=1)
        for key, _, color in MARKED_CELLS:
            mask = np.asarray(hm[key])
            if mask.any():
                ax.pcolormesh(edges, np.arange(R + 1) - 0.5, np.ma.masked_where(~mask, np.ones(mask.shape)),
                              cmap=ListedColormap([color]), shading="flat", zorder=2)
        fig.colorbar(mesh, ax=ax, label="log10(|ΔW| / |W|)", fraction=0.03, pad=0.01)
    known = [s for s in stages if s["first_step"] is not None]
    if known:
        ax.set_xlim(known[0]["first_step"] - 0.5, known[-1]["last_step"] + 0.5)
    ax.set_ylim(R - 0.5, -0.5)
    _stage_decor(ax, stages, hm["boundaries"], shade=False)
    _row_axis(ax, rows, hm["group_breaks"])
    ax.set_xlabel("optimizer step")
    ax.set_title(f"Update size per module and step, log10(|ΔW| / |W|), depth {hm['depth']}\n{_t(hm['note'])}",
                 fontsize=9, loc="left", pad=16)
    handles = [Patch(color=FROZEN_CELL, label="frozen in the stage")]
    handles += [Patch(color=color, label=label) for key, label, color in MARKED_CELLS if np.asarray(hm[key]).any()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return _save(fig, path)


def lr_png(lr: dict, path: Path) -> Path:
    fig = _figure(11, 4.2)
    ax = fig.add_subplot()
    order = lr["layer_groups"]
    seen = set()
    for s in lr["series"]:
        if not len(s["steps"]):
            continue
        lg = s["layer_group"]
        color = GROUP_COLORS[order.index(lg) % len(GROUP_COLORS)] if lg in order else "#555"
        ax.plot(s["steps"], s["lr"], color=color, linewidth=1.6, label=None if lg in seen else _t(lg),
                marker="o" if len(s["steps"]) < 3 else None)
        seen.add(lg)
    ax.set_yscale("log")
    _stage_decor(ax, lr["stages"], lr["boundaries"], shade=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate of every layer group at every step (log scale)", fontsize=10, loc="left", pad=16)
    if seen:
        ax.legend(title="layer group", fontsize=8, title_fontsize=8, loc="best")
    return _save(fig, path)


def drift_png(dr: dict, path: Path) -> Path:
    rows, stages = dr["rows"], dr["stages"]
    R = len(rows)
    fig = _figure(10, 1.8 + 0.26 * R)
    ax = fig.add_subplot()
    d = np.array([[np.nan if v is None else v for v in row] for row in dr["drift_rel"]], dtype=float).reshape(
        R, len(stages))
    for r in range(R):
        pts = d[r][np.isfinite(d[r])]
        if len(pts) > 1:
            ax.plot(pts, [r] * len(pts), color="#9aa4ae", linewidth=2, zorder=1)
    for k, s in enumerate(stages):   # earlier stages as rings, the last as a dot: neither hides the other
        color, ring = STAGE_COLORS[k % len(STAGE_COLORS)], k < len(stages) - 1
        ax.scatter(d[:, k], np.arange(R), s=90 if ring else 28, facecolors="none" if ring else color,
                   edgecolors=color if ring else "white", linewidths=1.8 if ring else 0.8, zorder=2 + k,
                   label=_t(f"end of stage {s['label']}"))
    from matplotlib.ticker import PercentFormatter

    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlim(left=0)
    ax.set_ylim(R - 0.5, -0.5)
    _row_axis(ax, rows, dr["group_breaks"])
    ax.grid(axis="x", color="#eee")
    ax.set_xlabel("relative L2 distance from the reference weights, |W − W_ref| / |W_ref|")
    ax.set_title(_t("Distance from the reference (pretrained) weights at the end of each stage"
                    + (f"\n{dr['continuity']}" if dr["continuity"] else "")), fontsize=9, loc="left")
    fig.legend(loc="outside lower center", ncols=min(4, max(1, len(stages))), fontsize=8, frameon=False)
    return _save(fig, path)


def loss_png(ls: dict, stages: list[dict], boundaries: list[float], path: Path) -> Path:
    fig = _figure(11, 3.8)
    ax = fig.add_subplot()
    ax.plot(ls["steps"], ls["values"], color="#333", linewidth=1)
    _stage_decor(ax, stages, boundaries, shade=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(_t(ls["name"]))
    ax.set_title(_t(f"{ls['name']} per step, as logged (stages shaded)"), fontsize=10, loc="left", pad=16)
    return _save(fig, path)


def write_pngs(run, out_dir, *, data: dict | None = None, depth: int | None = None) -> list[Path]:
    """Write every figure of `run` as a PNG into `out_dir` (loss.png only when a loss was logged)."""
    from ..analyse.figures import from_run

    from ..store.outputs import check_png_dir, make_dir

    out = check_png_dir(out_dir, runs=(run.path,) if getattr(run, "path", None) else ())
    data = from_run(run, depth=depth) if data is None else data
    make_dir(out)
    paths = [freeze_map_png(data["freeze_map"], out / FILES["freeze_map"]),
             heatmap_png(data["heatmap"], out / FILES["heatmap"]),
             lr_png(data["lr"], out / FILES["lr"]),
             drift_png(data["drift"], out / FILES["drift"])]
    if data["loss"] is not None:
        paths.append(loss_png(data["loss"], data["stages"], data["boundaries"], out / FILES["loss"]))
    return paths
