"""The report's HTML panels (no JavaScript needed): run facts, stages table, answers, findings,
"between the fits", BatchNorm running statistics, per-epoch values, glossary. Every name from the
model is escaped. docs/report.md says what each panel shows."""

from __future__ import annotations

import math
from html import escape as e

from .charts import GROUP_COLORS, STEP_AXIS, _layout, time_decor
from ..analyse.words import counted as _n


def _lr(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.3g} %"


def slice_note(lrs: list, framework: str | None = None) -> str | None:
    """When lrs (one per layer group, ≥ 2) are geometrically spaced from a to b, as fastai's
    `lr_max=slice(a, b)` spaces them: for a fastai run `slice(a, b) → group 0: a, …, group n: b`;
    for any other run the spacing only (`geometric, ×10 per group: group 0: a, …`), since no
    slice() was called there; else None."""
    if len(lrs) < 2 or any(x is None or not x > 0 for x in lrs) or lrs[0] == lrs[-1]:
        return None
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    if any(not math.isclose(r, ratios[0], rel_tol=1e-4) for r in ratios):
        return None
    groups = ", ".join(f"group {k}: {_lr(x)}" for k, x in enumerate(lrs))
    if framework == "fastai":
        return f"slice({_lr(lrs[0])}, {_lr(lrs[-1])}) → {groups}"
    return f"geometric, ×{ratios[0]:.3g} per group: {groups}"


SLICE_HOW = ("fastai's <code>lr_max=slice(a, b)</code> gives the layer groups learning rates spaced "
             "geometrically from a (first group, earliest layers) to b (last group, the head)")


def facts(summary: dict) -> str:
    r = summary["run"]
    state = "complete" if r["complete"] else f"INTERRUPTED — {r['recovered_steps']:,} steps recovered"
    out = (f"<div class=facts>{e(r['framework'])} · {r['tensors_total']:,} tensors · {r['params_total']:,} parameters"
           f" · {r['steps']:,} steps · {len(summary['stages'])} stages · {e(state)}</div>")
    if r.get("error"):
        out += f"<div class=warn>recording stopped early: {e(str(r['error']))}</div>"
    for w in r.get("warnings") or []:
        out += f"<div class=warn>warning: {e(str(w))}</div>"
    return out


def _epochs_cell(s: dict) -> str:
    starts = s.get("epoch_starts")
    if not starts:
        return "<span class=dim>—</span>"
    fp = (s.get("forward_passes") or {}).get("train")
    per = f"<br><span class=dim>{fp // len(starts):,} batches each</span>" if fp and fp % len(starts) == 0 else ""
    return f"{len(starts):,}{per}"


def stages_table(summary: dict) -> str:
    head = ("<tr><th>#</th><th>stage</th><th>epochs</th><th>steps</th><th>forward passes<br>train / eval</th>"
            "<th>trainable</th><th>lr_max per layer group</th><th>starts from previous end</th></tr>")
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
        note = slice_note([g["lr_max"] for g in s["groups"]], summary["run"].get("framework"))
        lrs += f"<br><span class=slice>{e(note)}</span>" if note else ""
        trial = " <span class=dim>[trial]</span>" if s["kind"] == "trial" else ""
        body.append(f"<tr><td>{s['index']}</td><td>{e(s['name'])}{trial}</td><td>{_epochs_cell(s)}</td>"
                    f"<td>{s['steps']:,}</td><td>{fp.get('train')} / {fp.get('eval')}</td>"
                    f"<td>{s['tensors_trainable']:,} / {summary['run']['tensors_total']:,} tensors<br>"
                    f"{s['params_trainable']:,} parameters</td><td>{lrs}</td><td>{cont}</td></tr>")
    how = (f"<p class=how>lr_max: the peak learning rate of each layer group (pg0, pg1… are the optimizer's "
           f"parameter groups). Where the lrs form a geometric series, {SLICE_HOW}.</p>")
    return f"<table class=stages>{head}{''.join(body)}</table>{how}"


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


# ----------------------------------------------------------------------------- between the fits
def _names(names: list[str], what: str) -> str:
    """A count, with the names themselves in a collapsed list."""
    if not names:
        return f"no {what}s"
    items = "".join(f"<li><code>{e(str(n))}</code></li>" for n in names)
    return f"<details><summary>{_n(len(names), what)}</summary><ul class=names>{items}</ul></details>"


def _pair_groups(groups: list[dict]) -> list[tuple[dict | None, dict | None]]:
    """(before, after) per layer-group position: the k-th group of the optimizer that stepped
    before with the k-th of the one that steps after (the same group when the optimizer is kept)."""
    before = [g for g in groups if g.get("tensors_before") is not None]
    after = [g for g in groups if g.get("tensors_after") is not None]
    n = max(len(before), len(after))
    return [(before[k] if k < len(before) else None, after[k] if k < len(after) else None) for k in range(n)]


OPTIMIZER_WORDS = {"same": "the same optimizer and parameter groups, its state (momentum…) carried on",
                   "groups changed": "the same optimizer, but its parameter groups changed",
                   "new": "a new optimizer"}


def _transition(t: dict, stages: dict[int, dict], framework: str | None = None) -> str:
    a, b = stages.get(t["from_stage"], {}), stages.get(t["stage"], {})
    kept = t.get("values_kept")
    changed = t.get("values_changed") or []
    if kept is True:
        values = "<span class=yes>kept: every tensor bitwise as the previous stage left it</span>"
    elif kept is False:
        values = f"<span class=no>NOT kept:</span> {_names(changed, 'tensor')} changed between the fits"
    else:
        values = "<span class=dim>unknown (a stage end was not captured)</span>"
    reset = {True: "; it started with empty state (momentum and Adam averages start again)", False: "", None: ""}
    opt = OPTIMIZER_WORDS.get(t.get("optimizer"), e(str(t.get("optimizer")))) + reset[t.get("optimizer_state_reset")]
    rows = []
    for k, (old, new) in enumerate(_pair_groups(t.get("groups") or [])):
        tb, ta = (old or {}).get("tensors_before"), (new or {}).get("tensors_after")
        names = " → ".join(dict.fromkeys(e(str(g["name"])) for g in (old, new) if g))
        rows.append(f"<tr><td>group {k} <span class=dim>({names})</span></td><td>{_lr((old or {}).get('lr_before'))}"
                    f" → {_lr((new or {}).get('lr_after'))}</td><td>{_lr((new or {}).get('lr_max_after'))}</td>"
                    f"<td>{'—' if tb is None else tb} → {'—' if ta is None else ta}</td></tr>")
    note = slice_note([g.get("lr_max_after") for g in t.get("groups") or [] if g.get("tensors_after")], framework)
    table = ("<table class=stages><tr><th>layer group</th><th>lr: last step before → first step after</th>"
             f"<th>lr_max after</th><th>tensors before → after</th></tr>{''.join(rows)}</table>" if rows else "")
    table += f"<p class=slice>{e(note)} ({SLICE_HOW})</p>" if note else ""
    return (f"<div class=transition><h3>Stage {t['from_stage']} ({e(str(a.get('name', '?')))}) → stage {t['stage']} "
            f"({e(str(b.get('name', '?')))}): <span class=event>{e(str(t['event']))}</span></h3><ul>"
            f"<li>became trainable: {_names(t.get('became_trainable') or [], 'tensor')}</li>"
            f"<li>became frozen: {_names(t.get('became_frozen') or [], 'tensor')}</li>"
            f"<li>values: {values}</li><li>optimizer: {opt}</li></ul>{table}</div>")


def initial_state_html(summary: dict) -> str:
    s = next((s for s in summary["stages"] if s.get("initial_state")), None)
    if s is None:
        return ""
    st = s["initial_state"]
    groups = st.get("frozen_groups")
    fg = f"; frozen layer groups: {', '.join(map(str, groups))}" if groups else ""
    note = f"<br>{e(st['note'])}" if st.get("note") else ""
    return (f"<div class=transition><h3>How stage {s['index']} ({e(s['name'])}) started</h3><ul>"
            f"<li>frozen: {_names(st.get('frozen') or [], 'tensor')}</li>"
            f"<li>trainable: {_names(st.get('trainable') or [], 'tensor')}{e(fg)}{note}</li></ul></div>")


def transitions_html(summary: dict) -> str:
    """The "Between the fits" panel: how the first stage started, then one block per transition."""
    stages = {s["index"]: s for s in summary["stages"]}
    parts = [initial_state_html(summary)] + [_transition(t, stages, summary["run"].get("framework")) for t in summary.get("transitions") or []]
    if not any(parts):
        return ""
    if not summary.get("transitions"):
        parts.append("<p class=how>A single training stage: nothing happened between fits.</p>")
    return ("<section id=\"between\"><h2>Between the fits</h2><p class=how>What changed from one stage (one "
            "<code>fit</code>) to the next: which tensors started or stopped training (unfreezing, by fastai's "
            "<code>unfreeze()</code> or by setting requires_grad yourself, flips requires_grad; it does not "
            "touch the values), whether the "
            "values were kept bitwise, whether the optimizer (and its state) was new, and each layer group's "
            f"learning rate before and after.</p>{''.join(parts)}</section>")


# ----------------------------------------------------------------------------- BatchNorm statistics
def _layer_trainable(summary: dict) -> dict[str, list]:
    """module name → per stage: True when any of its parameters trains, False when none does."""
    out: dict[str, list] = {}
    for p in summary["params"]:
        flags = [x["trainable"] for x in p["stages"]]
        prev = out.get(p["module"])
        out[p["module"]] = flags if prev is None else [bool(a) or bool(b) if a is not None else b
                                                       for a, b in zip(prev, flags)]
    return out


def _frozen_groups(summary: dict, k: int) -> tuple[set, dict]:
    """Stage k: the layer groups holding a frozen tensor, and module → its parameters' groups."""
    frozen, groups = set(), {}
    for p in summary["params"]:
        st = p["stages"][k]
        groups.setdefault(p["module"], set()).add(st.get("group"))
        if st["trainable"] is False:
            frozen.add(st.get("group"))
    return frozen, groups


def bn_stats(summary: dict) -> list[dict]:
    """Per stage: buffers whose bytes changed (in layers that train / that are frozen / in a layer
    group with frozen tensors, as fastai's train_bn leaves BatchNorm) and the largest relative
    change from the start (drift_rel)."""
    trains = _layer_trainable(summary)
    out = []
    for k, s in enumerate(summary["stages"]):
        frozen_groups, groups_of = _frozen_groups(summary, k)
        row = {"stage": s["index"], "name": s["name"], "buffers": 0, "changed": 0, "in_frozen": 0,
               "in_trainable": 0, "in_frozen_group": 0, "layers": set(), "frozen_layers": set(), "largest": None}
        for b in summary.get("buffers") or []:
            entry = b["stages"][k]
            row["buffers"] += 1
            if entry["changed"]:
                row["changed"] += 1
                row["layers"].add(b["module"])
                frozen = (trains.get(b["module"]) or [None] * (k + 1))[k] is False
                row["in_frozen" if frozen else "in_trainable"] += 1
                row["in_frozen_group"] += bool(groups_of.get(b["module"], set()) & frozen_groups)
                if frozen:
                    row["frozen_layers"].add(b["module"])
            d = entry.get("drift_rel")
            if d is not None and (row["largest"] is None or d > row["largest"][1]):
                row["largest"] = (b["name"], d)
        out.append(row)
    return out


def bn_html(summary: dict) -> str:
    if not summary.get("buffers"):
        return ""
    body = []
    for r in bn_stats(summary):
        top = f"<code>{e(r['largest'][0])}</code> {_pct(r['largest'][1])}" if r["largest"] else "—"
        body.append(f"<tr><td>{r['stage']}: {e(r['name'])}</td><td>{r['changed']:,} / {r['buffers']:,}</td>"
                    f"<td>{len(r['layers']):,}</td><td>{r['in_trainable']:,}</td>"
                    f"<td>{r['in_frozen']:,} ({_n(len(r['frozen_layers']), 'frozen layer')})</td>"
                    f"<td>{r['in_frozen_group']:,}</td><td>{top}</td></tr>")
    return ("<section id=\"bn\"><h2>BatchNorm running statistics</h2><p class=how>BatchNorm layers keep a "
            "running mean and variance (buffers, not parameters: no optimizer touches them). In train mode every "
            "forward pass updates them, also in layers whose weights are frozen; only eval mode "
            "(<code>model.eval()</code>) leaves them as they are. A frozen layer group may still hold trainable "
            "BatchNorm layers (fastai's train_bn). Largest: the buffer furthest from its value when watching "
            "began, as a relative L2 distance, at the stage's end.</p>"
            "<table class=stages><tr><th>stage</th><th>buffers changed</th><th>their layers</th>"
            "<th>changed, in layers that train</th><th>changed, in frozen layers</th>"
            "<th>changed, in layer groups with frozen tensors</th><th>largest change from start</th></tr>"
            f"{''.join(body)}</table></section>")


# ----------------------------------------------------------------------------- per-epoch values
def epochs_figure(ep: dict, stages: list[dict], boundaries: list[float], timeline: dict | None = None) -> dict:
    """The per-epoch plot: every value (train_loss, valid_loss, metrics) at the last step of its epoch."""
    traces = []
    for k, name in enumerate(ep["names"]):
        pts = [r for r in ep["rows"] if r["values"].get(name) is not None]
        if not pts:
            continue
        traces.append({"type": "scatter", "mode": "lines+markers", "name": e(name),
                       "x": [r["last_step"] for r in pts], "y": [r["values"][name] for r in pts],
                       "customdata": [[r["stage"], r["epoch"], r["first_step"]] for r in pts],
                       "line": {"color": GROUP_COLORS[k % len(GROUP_COLORS)], "width": 2},
                       "yaxis": "y" if "loss" in name else "y2",
                       "hovertemplate": f"<b>{e(name)}</b> %{{y:.4g}}<br>stage %{{customdata[0]}} · epoch "
                                        "%{customdata[1]} (steps %{customdata[2]}–%{x})<extra></extra>"})
    shapes, notes = time_decor(stages, boundaries, timeline, shade=True)
    return {"data": traces,
            "layout": _layout("Per-epoch values, at the last step of each epoch", 380, shapes=shapes,
                              annotations=notes, xaxis=dict(STEP_AXIS),
                              yaxis={"title": {"text": "loss"}},
                              yaxis2={"title": {"text": "metric"}, "overlaying": "y", "side": "right",
                                      "showgrid": False, "tickformat": ".3~g", "nticks": 6},
                              legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom"},
                              margin={"l": 70, "r": 70, "t": 120, "b": 80})}


def _value(x) -> str:
    return "—" if x is None else f"{x:.4g}"


def epochs_html(ep: dict, has_plot: bool) -> str:
    if not ep or not ep["rows"]:
        return ("<section id=\"epochs\"><h2>Per-epoch values</h2><p class=how>This run recorded no per-epoch "
                "values (fastai and Lightning record them; plain PyTorch: <code>rec.log_epoch(...)</code>).</p>"
                "</section>")
    head = "".join(f"<th>{e(n)}</th>" for n in ep["names"])
    body = []
    for r in ep["rows"]:
        vals = "".join(f"<td>{_value(r['values'].get(n))}</td>" for n in ep["names"])
        body.append(f"<tr><td>{e(r['stage_label'])}</td><td>{r['epoch']}</td>"
                    f"<td>{r['first_step']:,}–{r['last_step']:,}</td>{vals}</tr>")
    plot = '<div class="fig ff-timechart" id="fig-epochs"></div>' if has_plot else ""
    return ("<section id=\"epochs\"><h2>Per-epoch values</h2><p class=how>The values logged at the end of "
            "each epoch: by the training loop (<code>rec.log_epoch(...)</code>) or, with an integration, taken "
            "from the framework (the table fastai prints, Lightning's epoch metrics): epochs count from 1 within each stage; steps are the "
            f"optimizer steps of the epoch.</p><table class=stages><tr><th>stage</th><th>epoch</th><th>steps</th>"
            f"{head}</tr>{''.join(body)}</table>{plot}</section>")


# ----------------------------------------------------------------------------- glossary
GLOSSARY = (
    ("tensor", "one parameter array, named as <code>model.named_parameters()</code> names it, e.g. "
               "<code>0.4.0.conv1.weight</code>; freezing and training happen per tensor."),
    ("module", "a <code>torch.nn.Module</code> of the model tree (a block, a Sequential, a layer); the freeze map "
               "and heatmap roll tensors up to modules."),
    ("layer", "a module that owns parameters itself (a Conv2d, a BatchNorm2d, a Linear); a resnet34's "
              "34 layers are its convolutions and fc on the main path."),
    ("layer group, pg0", "the optimizer's parameter groups (pg0, pg1… in order), each with its own learning "
                         "rate; fastai splits a model into layer groups (body parts, head) and freezes by group."),
    ("frozen / trainable", "a frozen tensor has requires_grad off or is in no optimizer group: no step "
                           "should change it (one whose bytes change anyway is reported as changed while frozen)."),
    ("bitwise unchanged", "every byte of the tensor is what it was: checked with a hash, not by a tolerance."),
    ("W_ref, the weights watching began with", "the values when recording started (for a fine-tune, the "
                                                "pretrained weights): every drift is measured from them."),
    ("relative L2 distance", "‖W − W_ref‖ / ‖W_ref‖, the Euclidean (L2) size of the change relative to the "
                             "starting weights: 13 % means the change is 13 % as large as the weights."),
    ("‖ΔW‖/‖W‖", "the update ratio of one optimizer step: how far that step moved the tensor, relative to "
                 "its size (log10 −3 = 0.1 %)."),
    ("train_bn", "fastai keeps BatchNorm weights and biases trainable even in frozen layer groups "
                 "(<code>train_bn=True</code>, the default); a plain loop can do the same by hand. Such a norm "
                 "layer shows as B (BN-only) in the layer view, its frozen block as partly training in the freeze map."),
    ("one-cycle", "fastai's <code>fit_one_cycle</code> (PyTorch: <code>OneCycleLR</code>): the lr rises to lr_max and anneals to near zero within each "
                  "fit, momentum moving the other way."),
    ("epoch, batch, step", "an epoch is one pass over the training data, a batch one slice of it, a step one "
                           "optimizer update (one per batch unless gradients are accumulated)."),
    ("stage", "a run of steps with one trainable set and optimizer layout: one per fit."),
)


def glossary_html() -> str:
    items = "".join(f"<dt>{term}</dt><dd>{text}</dd>" for term, text in GLOSSARY)
    return f'<section id="glossary"><h2>Glossary</h2><dl class=glossary>{items}</dl></section>'
