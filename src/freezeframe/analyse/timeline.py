"""The report's layer view (the network in forward order as parts, blocks and layers, each layer's
state in every stage) and the step scrubber's frames (each layer's update size and each group's lr
at every recorded step, binned beyond MAX_FRAMES); docs/report.md, "Layer view" and "Step scrubber".

Pure functions of a run's summary and stored tables. The tensor table is read in blocks of rows
and summed per (layer, frame) cell with bincount: linear in its rows, memory bounded by the block
and the layers x frames result, no Python loop over steps or tensors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .names import group_labels, is_fastai_layout, readable_name
from .layers import build_layers
from .timeaxis import step_context, time_marks
from .heatmap import StepIndex, aggregate

MAX_FRAMES = 2000        # the scrubber holds at most this many frames (then consecutive steps are binned)
MAX_CELLS = 250_000      # ... and at most this many layer x frame cells (a 1,000-layer model gets 250 frames)
MIN_FRAMES = 200         # ... but never fewer frames than this for that reason
COLLAPSE_BEYOND = 200    # a view of more layers than this starts with its blocks collapsed
STATES = ("frozen-unchanged", "trained", "bn-only", "changed-while-frozen", "frozen")


# ----------------------------------------------------------------------------- names
def readable(name: str, fastai: bool) -> str:
    """`layer1.0.conv1` → `layer1[0].conv1`; in fastai's layout `0.4.0.conv1` → `body[4][0].conv1`
    (the report's naming everywhere, docs/report.md)."""
    return readable_name(name, fastai=fastai)


def _detail(type_name: str, shapes: list[list[int]]) -> str:
    """What a layer is beyond its type, from its weight's shape: `3×3 8→16` (a convolution),
    `512→3` (Linear), `64` (a norm layer's channels), else the first tensor's shape."""
    if not shapes:
        return ""
    w = shapes[0]
    if type_name.startswith("Conv") and len(w) >= 3:
        k = "×".join(str(x) for x in w[2:])
        c_in, c_out = (w[0], w[1]) if "Transpose" in type_name else (w[1], w[0])
        return f"{k} {c_in}→{c_out}"
    if type_name == "Linear" and len(w) == 2:
        return f"{w[1]}→{w[0]}"
    if "Norm" in type_name and len(w) == 1:
        return str(w[0])
    return "×".join(str(x) for x in w) or "scalar"


# ----------------------------------------------------------------------------- layer view
def summary_layers(summary: dict) -> tuple[list[dict], dict]:
    """`layers[]` and `run.layer_counts`; for a summary without them (an older run), the same
    rules on `modules[]` in model order with `ran` null."""
    if summary.get("layers") is not None:
        return summary["layers"], summary["run"].get("layer_counts") or {}
    modules = [{"name": m["name"], "type": m["type"]} for m in summary["modules"]]
    if is_fastai_layout(summary) and not any(m["name"] == "" for m in modules):
        modules.insert(0, {"name": "", "type": "Sequential"})  # fastai's Learner model is a Sequential
    return build_layers({"modules": modules, "forward_order": None}, summary["params"], summary["stages"])


def _state(entries: list[dict], bn_only: bool) -> str | None:
    """One layer in one stage from its tensors' entries (params[].stages[k]); see STATES."""
    known = [e for e in entries if e.get("trainable") is not None]
    if not known:
        return None
    if any(e["trainable"] is False and e.get("changed") is True for e in known):
        return "changed-while-frozen"
    if any(e["trainable"] is True for e in known):
        return "bn-only" if bn_only else "trained"
    return "frozen-unchanged" if all(e.get("changed") is False for e in known) else "frozen"


def _flat(layer: dict, fastai: bool) -> bool:
    """A layer that sits in no block below its part: a top-level layer, fastai's body or head
    itself, the root's own tensors."""
    block, name = layer["block"], layer["module"]
    return block == "" or block == name or (fastai and block in ("0", "1"))


def _display_blocks(rows: list[dict], fastai: bool) -> list[dict]:
    """Consecutive layers of one part grouped into the blocks drawn: a summary block, or a run of
    flat layers (labelled "stem" when it opens the body before its blocks)."""
    out: list[dict] = []
    for pos, layer in enumerate(rows):
        part = layer.get("part") or ""
        flat = _flat(layer, fastai)
        key = (part, "" if flat else layer["block"], flat)
        if out and out[-1]["key"] == key:
            out[-1]["layers"].append(pos)
        else:
            out.append({"key": key, "part": part, "flat": flat, "block": layer["block"], "layers": [pos]})
    return out


def _block_label(b: dict, rows: list[dict], later_blocks: bool, fastai: bool) -> str:
    if not b["flat"]:
        return readable(b["block"], fastai)
    names = [rows[i]["module"] for i in b["layers"]]
    if b["part"] in ("body", "") and b["first_in_part"] and later_blocks:
        return "stem"
    blocks = {rows[i]["block"] for i in b["layers"]}
    if len(blocks) == 1 and (only := blocks.pop()) not in names and only:
        return readable(only, fastai)         # fastai's head: its layers sit in Sequential "1"
    labels = [readable(n, fastai) for n in names]
    return ", ".join(labels) if len(labels) <= 3 else f"{labels[0]} … {labels[-1]}"


def _composition(types: list[str]) -> str:
    counts = dict.fromkeys(types, 0)
    for t in types:
        counts[t] += 1
    return " · ".join(f"{n} {t}" if n > 1 else t for t, n in counts.items())


def _stage_group(tensors: list[dict], k: int) -> int | None:
    for p in tensors:
        st = p["stages"][k] if k < len(p["stages"]) else None
        if st and st.get("group") is not None:
            return st["group"]
    return None


def layer_view(summary: dict) -> dict:
    """The tree the layer view draws (docs/report.md, "Layer view"): parts (body / head / "")
    holding blocks in forward order, each block the positions of its layers in `layers`; every
    layer with its readable label, type, shape detail, branch, weight-layer number, layer group,
    parameter count and its state in each stage (STATES, or null where the stage does not know)."""
    rows, counts = summary_layers(summary)
    fastai = is_fastai_layout(summary)
    params = {}
    for p in summary["params"]:
        for n in [p["name"], *(p.get("aliases") or [])]:
            params[n] = p
    types = {m["name"]: m["type"] for m in summary["modules"]}
    labels = group_labels(summary)
    n_stages = len(summary["stages"])
    tensors = [[params[n] for n in r["params"] if n in params] for r in rows]
    norm = [bool(ts) and all(p.get("is_norm") for p in ts) for ts in tensors]
    trains = [[any(p["stages"][k].get("trainable") is True for p in ts) for k in range(n_stages)] for ts in tensors]

    blocks = _display_blocks(rows, fastai)
    part_of_block = [b["part"] for b in blocks]
    for j, b in enumerate(blocks):
        b["first_in_part"] = j == 0 or part_of_block[j - 1] != b["part"]
    # a norm layer trains "BN-only" when no other layer of its block trains (fastai's train_bn);
    # a block of norm layers only (a stem's bn1) is judged by the other layers of its part
    weights_train = {}
    for j, b in enumerate(blocks):
        others = [i for i in b["layers"] if not norm[i]]
        if not others:
            others = [i for bb in blocks if bb["part"] == b["part"] for i in bb["layers"] if not norm[i]]
        weights_train[j] = [any(trains[i][k] for i in others) if others else True for k in range(n_stages)]

    out_layers = []
    for j, b in enumerate(blocks):
        for i in b["layers"]:
            r, ts = rows[i], tensors[i]
            states = [_state([p["stages"][k] for p in ts], norm[i] and not weights_train[j][k]) for k in range(n_stages)]
            out_layers.append({
                "index": r["index"], "module": r["module"], "label": readable(r["module"], fastai) if r["module"] else "(root)",
                "type": r["type"], "detail": _detail(r["type"], [p["shape"] for p in ts]),
                "branch": r.get("branch", "main"), "weight_layer": r.get("weight_layer"), "part": r.get("part"),
                "block": r["block"], "group": r.get("group"),
                "group_label": labels.get(r["group"], f"pg{r['group']}") if r.get("group") is not None else None,
                "params_numel": int(sum(p["numel"] for p in ts)), "ran": r.get("ran"), "states": states,
                # the param group holding its (first) tensor in each stage: a rebuilt optimizer
                # renumbers the groups, so the lr shown at a step is that stage's group's
                "stage_groups": [_stage_group(ts, k) for k in range(n_stages)],
            })
    parts: list[dict] = []
    for j, b in enumerate(blocks):
        later = any(not bb["flat"] for bb in blocks[j + 1:] if bb["part"] == b["part"])
        label = _block_label(b, rows, later, fastai)
        parent = "" if b["flat"] else b["block"].rpartition(".")[0]
        entry = {"name": b["block"] if not b["flat"] else "", "label": label,
                 "type": types.get(b["block"]) if not b["flat"] else None,
                 "composition": _composition([rows[i]["type"] for i in b["layers"]]),
                 "parent": parent, "parent_label": readable(parent, fastai) if parent else "",
                 "layers": list(b["layers"])}  # positions in `layers` (blocks are runs of consecutive rows)
        if not parts or parts[-1]["name"] != b["part"]:
            parts.append({"name": b["part"], "label": b["part"] or "model", "blocks": []})
        parts[-1]["blocks"].append(entry)
    for part in parts:
        members = [out_layers[i] for b in part["blocks"] for i in b["layers"]]
        part["modules"] = len(members)
        part["weight_layers"] = sum(1 for x in members if x["weight_layer"] is not None)
    return {
        "parts": parts,
        "layers": out_layers,
        "stages": [{"index": s["index"], "label": f"{s['index']}: {s['name']}" + (" [trial]" if s["kind"] == "trial" else "")}
                   for s in summary["stages"]],
        "counts": counts,
        "collapsed": len(out_layers) > COLLAPSE_BEYOND,
        "forward_order": any(r.get("ran") is not None for r in rows),
    }


# ----------------------------------------------------------------------------- scrubber frames
def frame_budget(n_steps: int, n_layers: int) -> int:
    """How many frames a run of `n_steps` steps and `n_layers` layers gets: every step up to
    MAX_FRAMES, fewer for a model so large that layers x frames would pass MAX_CELLS."""
    cap = MAX_FRAMES if not n_layers else min(MAX_FRAMES, max(MIN_FRAMES, MAX_CELLS // n_layers))
    return min(n_steps, cap)


def _frame_starts(stage: np.ndarray, k: int) -> np.ndarray:
    """Positions (into the sorted steps) where each of at most `k` frames begins: one per step when
    they fit, else nearly equal bins of consecutive steps, never across a stage boundary (unless
    there are more stage segments than frames)."""
    n = len(stage)
    if n <= k:
        return np.arange(n, dtype=np.int64)
    seg = np.flatnonzero(np.r_[True, stage[1:] != stage[:-1]])
    if len(seg) > k:
        return np.unique(np.linspace(0, n, k + 1).round().astype(np.int64)[:-1])
    lens = np.diff(np.r_[seg, n])
    per = np.minimum(1 + (k - len(seg)) * lens // n, lens)      # at least 1 each; sum <= k
    return np.concatenate([a + np.linspace(0, m, b + 1).round().astype(np.int64)[:-1]
                           for a, m, b in zip(seg.tolist(), lens.tolist(), per.tolist())])


def _group_lrs(summary: dict, steps: pa.Table, rows: np.ndarray) -> tuple[list[int], list[str], np.ndarray]:
    """Global group indices, their names, and groups x frames: the lr each group had at the
    frame's first step (NaN where its optimizer did not step there)."""
    groups: dict[int, tuple[int, str]] = {}
    for s in summary["stages"]:
        for g in s["groups"]:
            groups.setdefault(g["index"], (g["optimizer"], g["name"]))
    gi = np.array(sorted(groups), dtype=np.int64)
    if not len(gi) or not len(rows):
        return gi.tolist(), [groups[g][1] for g in gi.tolist()], np.full((len(gi), len(rows)), np.nan, np.float32)
    take = pa.array(rows)
    lr = steps.column("lr").take(take)
    lengths = pc.list_value_length(lr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(lr).to_numpy(zero_copy_only=False).astype(np.float64)
    offsets = np.cumsum(lengths) - lengths
    opt = steps.column("optimizer").take(take).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    g_opt = np.array([groups[g][0] for g in gi.tolist()], dtype=np.int64)
    valid = (lengths[None, :] > gi[:, None]) & (opt[None, :] == g_opt[:, None])
    idx = np.clip(offsets[None, :] + gi[:, None], 0, max(len(flat) - 1, 0))
    out = np.where(valid, flat[idx] if len(flat) else np.nan, np.nan)
    return gi.tolist(), [groups[g][1] for g in gi.tolist()], out.astype(np.float32)


def _last_loss(scalars: pa.Table, frame_of_step, F: int, name: str = "loss") -> np.ndarray | None:
    if scalars is None or scalars.num_rows == 0:
        return None
    sel = scalars.filter(pc.equal(scalars.column("name"), name))
    if sel.num_rows == 0:
        return None
    step = sel.column("step").to_numpy(zero_copy_only=False).astype(np.int64)
    value = sel.column("value").to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.argsort(step, kind="stable")
    frame, value = frame_of_step(step[order]), value[order]
    ok = frame >= 0
    frame, value = frame[ok], value[ok]
    out = np.full(F, np.nan, dtype=np.float32)
    last = np.r_[frame[1:] != frame[:-1], True] if len(frame) else np.zeros(0, bool)
    out[frame[last]] = value[last]
    return out


def frames(summary: dict, steps: pa.Table) -> dict:
    """The scrubber's frames over the step table's distinct steps: `index` (a StepIndex), the
    layers, F, each frame's first and last position, and the frame of every position."""
    rows, _ = summary_layers(summary)
    index = StepIndex(steps)
    n = len(index)
    k = frame_budget(n, len(rows))
    lo = _frame_starts(index.stage if n else np.zeros(0, np.int64), k)
    F = len(lo)
    hi = np.r_[lo[1:], n] - 1
    frame_of_pos = np.repeat(np.arange(F), np.diff(np.r_[lo, n]))
    return {"rows": rows, "index": index, "F": F, "lo": lo, "hi": hi, "frame_of_pos": frame_of_pos}


def timeline(summary: dict, steps: pa.Table, tensors, scalars: pa.Table, *, update: np.ndarray | None = None,
             fr: dict | None = None) -> dict:
    """The step scrubber's data (docs/report.md, "Step scrubber"): frames (every step, or bins of
    consecutive steps of one stage beyond the frame budget) as parallel arrays, each layer's
    update size and each group's lr per frame, the last loss logged in each frame, epoch ticks and
    stage events. `tensors`: the tensors table or a stored run (read block by block); `update`
    and `fr`: the layers x frames cells of `heatmap.aggregate` and the `frames` they were summed
    over, when already computed."""
    fr = frames(summary, steps) if fr is None else fr
    rows, index, F, lo, hi = fr["rows"], fr["index"], fr["F"], fr["lo"], fr["hi"]
    s_sorted, stage = index.steps, index.stage
    if update is None:
        update = aggregate(summary, steps, tensors, layer_rows=rows, frame_of_pos=fr["frame_of_pos"],
                           F=F).get("timeline")
    if update is None:                                           # no layers or no frames
        update = np.full((len(rows), F), np.nan, dtype=np.float32)
    groups, names, lr = _group_lrs(summary, steps, index.order[lo])
    f_step = s_sorted[lo]
    epoch, batch = ([int(x) or None for x in a.tolist()] for a in step_context(summary, f_step))
    finite = update[np.isfinite(update)]
    binned = F < len(s_sorted)
    labels = group_labels(summary)
    f_at = np.r_[-1, fr["frame_of_pos"].astype(np.int32)]
    loss = _last_loss(scalars, lambda at: f_at[index(at).astype(np.int64) + 1], F)
    if binned:
        note = (f"{len(s_sorted):,} steps shown as {F:,} frames of about {len(s_sorted) / max(F, 1):.0f} consecutive "
                "steps of one stage each; a frame's update size pools the steps recorded in it")
    else:
        note = f"every one of the {F:,} steps"
    return {
        "frames": {"step": f_step.tolist(), "step_last": s_sorted[hi].tolist(), "stage": stage[lo].tolist(),
                   "epoch": epoch, "batch": batch},
        "update": update,
        "range": [float(finite.min()), float(finite.max())] if finite.size else None,
        "recorded": np.isfinite(update).any(axis=0) if len(rows) else np.zeros(F, bool),
        "lr": lr, "groups": groups, "group_names": names,
        "group_labels": [labels.get(g, n) for g, n in zip(groups, names)],
        "loss": loss,
        "binned": binned, "steps": int(len(s_sorted)), "note": note,
        **time_marks(summary),
    }
