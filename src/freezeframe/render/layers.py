"""The report's layer view and step scrubber as HTML (docs/report.md, "Layer view" and "Step
scrubber"), drawn from `analyse.timeline` data: nested `<details>` per part, block and layer,
readable with no JavaScript (a notebook's inline display); the scrubber's script is
render/static/layers.js. Every name from the model is escaped."""

from __future__ import annotations

from functools import lru_cache
from html import escape
from importlib import resources

from ..analyse.words import counted as _n

# state -> (CSS class, letter shown in the cell, colour, legend text). The legend's swatches and
# the cells share the class, so they are the same colour by construction.
STATE_STYLE = {
    "trained": ("st-tr", "T", "#2e9e4a", "trains (trainable in this stage)"),
    "bn-only": ("st-bn", "B", "#e3a21a", "only the norm layer trains, the rest of its block is frozen (as fastai's train_bn does)"),
    "frozen-unchanged": ("st-fu", "F", "#5f87b8", "frozen, bitwise unchanged at the stage's end"),
    "frozen": ("st-fr", "f", "#c4d3e6", "frozen (the stage's end was not captured: unchanged not proved)"),
    "changed-while-frozen": ("st-cf", "!", "#d62728", "frozen, yet its bytes changed (a finding)"),
    None: ("st-na", "·", "#eeeeee", "not in the model in this stage"),
}
_DARK = {"trained", "frozen-unchanged", "changed-while-frozen"}   # white letters on these


def e(x) -> str:
    return escape(str(x), quote=True)


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def layers_css() -> str:
    rules = [f"#layers .{cls}{{background:{color};color:{'#fff' if st in _DARK else '#222'}}}"
             for st, (cls, _, color, _) in STATE_STYLE.items()]
    return _read("layers.css") + "\n".join(rules)


@lru_cache(maxsize=1)
def layers_script() -> str:
    """The scrubber's JavaScript (render/static/layers.js): reads `window.FF_TIMELINE`."""
    return _read("layers.js")


# ----------------------------------------------------------------------------- pieces
def frame_label(tl: dict, f: int) -> str:
    """"stage 1 · epoch 2 · batch 7 · step 37" of frame `f` (layers.js writes the same)."""
    fr = tl["frames"]
    parts = [f"stage {fr['stage'][f]}"]
    binned = fr["step_last"][f] != fr["step"][f]
    if fr["epoch"][f] is not None:
        parts.append(f"epoch {fr['epoch'][f]}")
        if fr["batch"][f] is not None and not binned:
            parts.append(f"batch {fr['batch'][f]}")
    parts.append(f"steps {fr['step'][f]}–{fr['step_last'][f]}" if binned else f"step {fr['step'][f]}")
    return " · ".join(parts)


def _cells(states: list) -> str:
    return "".join(f"<i class={STATE_STYLE[s][0]}>{STATE_STYLE[s][1]}</i>" for s in states)


def _row(i: int, layer: dict, lr_row: dict, within: str = "") -> str:
    g = lr_row.get(layer["group"], "")
    per_stage = ",".join(str(lr_row.get(x, "")) for x in layer.get("stage_groups") or [])
    name = layer["label"]
    if within and name.startswith(within) and name[len(within):][:1] in (".", "["):
        name = name[len(within):].lstrip(".")      # a shortcut row names its module within the block
    num = f"#{layer['weight_layer']}" if layer["weight_layer"] is not None else ""
    title = f"{layer['module'] or '(root)'} · {layer['params_numel']:,} parameters"
    if layer["ran"] is False:
        title += " · did not run in the first training forward pass"
    cls = "r nr" if layer["ran"] is False else "r"
    return (f'<div class="{cls}" data-i={i} data-g="{g}" data-gs="{per_stage}" title="{e(title)}"><span class=n>{num}</span>'
            f'<span class=t>{e(layer["type"])}</span><span class=d>{e(layer["detail"])}</span>'
            f'<span class=nm>{e(name)}</span><span class=g>{e(layer["group_label"] or "")}</span>'
            f'<span class=s>{_cells(layer["states"])}</span><span class=u><span></span><em></em></span>'
            f'<span class=l></span></div>')


def _summary_bars(layers: list[dict], n_stages: int) -> str:
    """Per stage, a bar split by how many of the block's layers are in each state (what a
    collapsed block still shows)."""
    out = []
    for k in range(n_stages):
        counts: dict = {}
        for x in layers:
            counts[x["states"][k]] = counts.get(x["states"][k], 0) + 1
        segs = "".join(f'<i class={STATE_STYLE[s][0]} style="flex:{n}"></i>'
                       for s in STATE_STYLE if (n := counts.get(s)))
        out.append(f"<span>{segs}</span>")
    return f"<span class=bs>{''.join(out)}</span>"


def _block(block: dict, lv: dict, lr_row: dict, is_open: bool) -> str:
    layers = lv["layers"]
    n_stages = len(lv["stages"])
    members = [layers[i] for i in block["layers"]]
    main = "".join(_row(i, layers[i], lr_row) for i in block["layers"] if layers[i]["branch"] != "shortcut")
    short = "".join(_row(i, layers[i], lr_row, block["label"]) for i in block["layers"] if layers[i]["branch"] == "shortcut")
    side = f"<div class=sc><div class=sch>shortcut branch</div>{short}</div>" if short else ""
    kind = e(" · ".join(x for x in (block.get("type"), block["composition"]) if x))
    return (f"<details class=b{' open' if is_open else ''}><summary>{e(block['label'])}<span class=c>{kind}</span>"
            f"{_summary_bars(members, n_stages)}</summary><div class=bb><div class=mn>{main}</div>{side}</div></details>")


def _part(part: dict, lv: dict, lr_row: dict) -> str:
    is_open = not lv.get("collapsed")
    out, k, blocks = [], 0, part["blocks"]
    while k < len(blocks):
        parent = blocks[k]["parent"]
        j = k
        while j < len(blocks) and parent and blocks[j]["parent"] == parent:
            j += 1
        if parent and j - k > 1:     # consecutive blocks of one parent (layer1's residual blocks)
            inner = "".join(_block(b, lv, lr_row, is_open) for b in blocks[k:j])
            members = [lv["layers"][i] for b in blocks[k:j] for i in b["layers"]]
            out.append(f"<details class=q open><summary>{e(blocks[k]['parent_label'])}<span class=c>{j - k} blocks"
                       f"</span>{_summary_bars(members, len(lv['stages']))}</summary>{inner}</details>")
            k = j
        else:
            out.append(_block(blocks[k], lv, lr_row, is_open))
            k += 1
    n_weight = part.get("weight_layers", 0)
    facts = _n(part.get("modules", 0), "module") + " with parameters"
    facts += f", {_n(n_weight, 'weight layer')}" if n_weight else ""
    return (f"<details class=p open><summary>{e(part['label'])}<span class=c>{e(facts)}</span></summary>"
            f"{''.join(out)}</details>")


def _counts_line(lv: dict) -> str:
    c = lv.get("counts") or {}
    if not c:
        return ""
    head = f"; {c['head_weight_layers']} of them in the head" if c.get("head_weight_layers") else ""
    text = (f"{_n(c.get('weight_layers', 0), 'weight layer')} (convolutions and Linear layers on the main path, "
            f"numbered #1… in forward order{head})")
    if c.get("shortcut_weight_layers"):
        text += f", plus {_n(c['shortcut_weight_layers'], 'convolution')} on shortcut branches (not numbered)"
    return e(f"{text}; {c.get('modules', len(lv['layers']))} modules own parameters.")


def _legend(lv: dict) -> str:
    used = {s for x in lv["layers"] for s in x["states"]}
    items = "".join(f"<li><i class={cls}>{letter}</i>{e(text)}</li>"
                    for st, (cls, letter, _, text) in STATE_STYLE.items() if st in used)
    return f"<ul class=ffl-legend>{items}</ul>"


def _controls(tl: dict | None) -> str:
    frames = (tl or {}).get("frames") or {}
    n = len(frames.get("step") or [])
    if not n:
        return ('<div class=ffl-ctl><button id=play type=button disabled>▶ play</button><input type=range id=step '
                'min=0 max=0 value=0 disabled aria-label="optimizer step"><span id=step-label>no steps recorded</span>'
                '</div>')
    steps = frames["step"]
    ticks = "".join(f"<option value={_frame_at(steps, t['step'])}></option>" for t in tl.get("epoch_ticks") or [])
    return (f'<div class=ffl-ctl><button id=play type=button aria-pressed=false>▶ play</button>'
            f'<input type=range id=step min=0 max={n - 1} value=0 step=1 list=ffl-ticks aria-label="optimizer step">'
            f'<datalist id=ffl-ticks>{ticks}</datalist><span id=step-label>{e(frame_label(tl, 0))}</span>'
            f'<span id=step-note><span class=ffl-nojs>(the slider needs JavaScript)</span></span></div>')


def _frame_at(steps: list[int], step: int) -> int:
    from bisect import bisect_right

    return max(0, bisect_right(steps, step) - 1)


def _header(lv: dict) -> str:
    cols = "".join(f'<span class=sh title="{e("stage " + s["label"])}">{e(s["index"])}</span>' for s in lv["stages"])
    return (f'<div class="r hd"><span class=n>#</span><span class=t>type</span><span class=d>shape</span>'
            f'<span class=nm>module</span><span class=g>group</span><span class=s>{cols}</span>'
            f'<span class=u><em>update ‖ΔW‖/‖W‖</em></span><span class=l>lr</span></div>')


HOW = ("The network in forward order (the order its layers first ran in the first training step), as nested blocks; "
       "shortcut branches sit beside their block's main path. Each layer row: its weight-layer number, type, shape "
       "(kernel and channels in→out), name and layer group, then one cell per stage (columns numbered as the "
       "stages) saying what happened to it in that stage. Move the slider (or press play) to see, at each step, the "
       "size of each layer's update (‖ΔW‖/‖W‖, the bar on a log scale) and its group's learning rate; a line marks "
       "the step on every chart over steps.")


def layers_section(data: dict) -> str:
    """`<section id="layers">`: the layer view of `data["layer_view"]` and the scrubber controls for
    `data["timeline"]` (docs/report.md); "" when the data has no layer view."""
    lv = data.get("layer_view")
    if not lv:
        return ""
    tl = data.get("timeline") or {}
    lr_row = {g: k for k, g in enumerate(tl.get("groups") or [])}
    stages = "".join(f"<button type=button class=stg data-s={e(s['index'])}>{e(s['label'])}</button>"
                     for s in lv["stages"])
    order = "" if lv.get("forward_order") else (" This run did not record the forward order (an older run): "
                                                "layers are in model order.")
    note = e(tl.get("note") or "")
    return "".join([
        f'<section id="layers" data-stages="{",".join(str(s["index"]) for s in lv["stages"])}">',
        f"<style>{layers_css()}</style><h2>Layers</h2><p class=how>{e(HOW + order)}</p>",
        f"<p class=how>{_counts_line(lv)}</p>",
        _controls(tl), f"<div class=ffl-stages>stages: {stages} <span class=dim>{note}</span></div>",
        _legend(lv), f"<div class=ffl-tree>{_header(lv)}{''.join(_part(p, lv, lr_row) for p in lv['parts'])}</div>",
        "</section>",
    ])
