"""Terminal rendering (rich renderables; this module never prints)."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..analyse.rollup import auto_depth, rollup

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}

# Names come from the user's model, run directory or checkpoint: untrusted. Every C0 and C1
# control character, DEL and the bidirectional overrides and isolates are shown escaped (`\x1b`,
# `\u202e`), so no escape sequence, title change, hyperlink or reordering reaches the terminal
# (docs/run-format.md, "Reading a run").
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]}
_ESCAPES.update({c: f"\\u{c:04x}" for c in _BIDI})
_PROSE = {k: v for k, v in _ESCAPES.items() if k not in (0x0A,)}  # our own sentences keep their line breaks


def safe(value) -> str:
    """`value` as text with every control and bidi-control character escaped."""
    return str(value).translate(_ESCAPES)


def safe_prose(value) -> str:
    """A message of ours that quotes names: escaped like `safe`, line breaks kept."""
    return str(value).translate(_PROSE)


def _t(value, style: str = "") -> Text:
    return Text(safe(value), style=style)


def _lr(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def _pct(x) -> str:
    if x is None:
        return "?"
    return f"{100 * x:.2g}%" if x < 0.1 else f"{100 * x:.0f}%"


def _state(r: dict) -> tuple[str, str]:
    """(steps words, state words) of the run line: a live, damaged or interrupted run is never
    called complete."""
    steps, expected = r["steps"], r.get("steps_expected")
    unreadable = r.get("unreadable") or []
    short = expected is not None and steps < expected
    steps_words = f"{steps} of {expected} steps read" if short else f"{steps} steps"
    parts = []
    if r.get("in_progress"):
        parts.append(f"in progress ({steps} steps so far)")
    elif not (unreadable or short):
        parts.append("complete" if r["complete"] else f"INTERRUPTED — {r['recovered_steps']} steps recovered")
    if unreadable or short:
        what = [f"{len(unreadable)} chunk{'s' if len(unreadable) != 1 else ''} could not be read"] if unreadable else []
        if short:
            what.append(f"the manifest expects {expected} steps, {steps} could be read")
        parts.append("DAMAGED — " + ", ".join(what))
    return steps_words, " · ".join(parts)


def header(summary: dict) -> Text:
    r = summary["run"]
    steps_words, state = _state(r)
    t = Text()
    t.append("freezeframe run ", style="bold")
    t.append(safe(r["path"]), style="bold cyan")
    t.append(f"  {safe(r['framework'])} · {r['tensors_total']} tensors · {r['params_total']:,} parameters · "
             f"{steps_words} · {len(summary['stages'])} stages · ")
    t.append(state, style="" if state == "complete" else "bold yellow" if r.get("in_progress") else "bold red")
    if r.get("error"):
        t.append(f"\nrecording stopped early: {safe(r['error'])}", style="red")
    for w in r.get("warnings") or []:
        t.append(f"\nwarning: {safe(w)}", style="yellow")
    return t


def run_status(summary: dict) -> Text | None:
    """One line for `check`: None for a complete run, else what the findings cover."""
    r = summary["run"]
    steps_words, state = _state(r)
    if state == "complete":
        return None
    return Text(f"Run {safe(r['path'])}: {state}; the findings cover the steps read so far.", style="yellow")


def stages_table(summary: dict) -> Table:
    table = Table(title="Stages", title_justify="left", expand=False)
    for col in ("#", "stage", "steps", "fwd train/eval", "trainable", "lr_max per group", "starts from previous end"):
        table.add_column(col, overflow="fold")
    for s in summary["stages"]:
        fp = s["forward_passes"] or {}
        if s["starts_from_previous_end"] is None:
            cont = Text("— (first)", style="dim")
        elif s["starts_from_previous_end"]:
            cont = Text(f"yes ({s['continuity']})", style="green")
        else:
            cont = Text(f"NO: {len(s['changed_since_previous_end'])} tensors differ ({s['continuity']})", style="bold red")
        name = _t(s["name"]) + (Text(" [trial]", style="dim") if s["kind"] == "trial" else Text(""))
        lrs = _t(" / ".join(f"{g['name']} {_lr(g['lr_max'])}" for g in s["groups"]) or "—")
        steps = f"{s['steps']}" + (f"\n{s['epochs']} epoch{'' if s['epochs'] == 1 else 's'}" if s.get("epochs") else "")
        table.add_row(str(s["index"]), name, steps, f"{fp.get('train')}/{fp.get('eval')}",
                      f"{s['tensors_trainable']}/{summary['run']['tensors_total']} tensors\n{s['params_trainable']:,} params",
                      lrs, cont)
    return table


def between_fits(summary: dict) -> Text | None:
    """One line per transition (docs/summary-format.md, "transitions[]"), after how the first
    training stage started; None when the run has neither."""
    lines = []
    first = next((s for s in summary["stages"] if s.get("initial_state")), None)
    if first is not None:
        init = first["initial_state"]
        line = (f"Stage {first['index']} starts with {len(init['frozen'])} tensors frozen, "
                f"{len(init['trainable'])} trainable")
        lines.append(line + (f": {init['note']}" if init.get("note") else ""))
    for t in summary.get("transitions") or []:
        kept = {True: "values kept bitwise", False: f"{len(t['values_changed'])} tensors' values differ",
                None: "values unknown"}[t["values_kept"]]
        reset = ", its state reset" if t.get("optimizer_state_reset") else ""
        lrs = ", ".join(f"{g['name']} {_lr(g['lr_before'])}→{_lr(g['lr_after'])}" for g in t["groups"])
        what = t["event"] if t.get("event") is not None else "what trains is not known"  # a recovered stage
        lines.append(f"Before stage {t['stage']} (after stage {t['from_stage']}): {what}; "
                     f"{len(t['became_trainable'])} tensors became trainable, {len(t['became_frozen'])} frozen; "
                     f"{kept}; optimizer {t['optimizer']}{reset}" + (f"; lr {lrs}" if lrs else ""))
    if not lines:
        return None
    return Text("Between the fits:\n" + "\n".join(f"  {safe(x)}" for x in lines) + "\n")


def _cell(entry: dict) -> Text:
    tr = entry["trainable"]
    moved = _pct(entry["drift_rel"]) if entry["drift_rel"] is not None else ""
    if tr is True:
        t = Text("trains", style="green")
    elif tr == "partial":
        t = Text("partial", style="yellow")
    elif tr is False:
        t = Text("frozen", style="blue")
    else:
        t = Text("?", style="dim")
    if entry["changed"] is True:
        t.append(f" Δ{moved}" if moved else " Δ")
    elif entry["changed"] is False:
        t.append(" =", style="dim")
    return t


def freeze_map(summary: dict, *, depth: int | None = None, max_rows: int = 40) -> Table:
    depth = auto_depth(summary, max_rows) if depth is None else depth
    rows = rollup(summary, depth)
    table = Table(title=f"Freeze map (module tree to depth {depth}; Δ = bytes changed, % = distance from the "
                        "starting weights at stage end, = = bitwise unchanged)", title_justify="left")
    table.add_column("module", overflow="fold")
    table.add_column("params", justify="right")
    for s in summary["stages"]:
        table.add_column(_t(f"{s['index']}: {s['name']}"), overflow="fold")
    for row in rows:
        table.add_row(_t(row["name"]) + _t(f" ({', '.join(row['types'][:2])})", style="dim"),
                      f"{row['numel']:,}", *[_cell(e) for e in row["stages"]])
    return table


def answers_panel(summary: dict) -> Panel:
    parts = []
    for a in summary["answers"]:
        parts.append(Text(safe_prose(a["question"]), style="bold"))
        parts.append(Text(safe_prose(a["answer"]) + "\n"))
    return Panel(Group(*parts), title="The three questions, answered from this run", title_align="left")


def findings_renderable(findings: list[dict]):
    if not findings:
        return Text("Findings: none — no known fine-tuning mistake in this run.", style="green")
    t = Text("Findings:\n", style="bold")
    for f in findings:
        t.append(f"  {f['severity'].upper():7} ", style=SEVERITY_STYLE[f["severity"]])
        t.append(safe(f["code"]), style="bold")
        if f["stage"] is not None:
            t.append(f" (stage {f['stage']})")
        t.append(f": {safe_prose(f['message'])}\n")
    return t


def run_renderable(summary: dict, *, depth: int | None = None) -> Group:
    between = between_fits(summary)
    return Group(header(summary), stages_table(summary), *([between] if between else []),
                 freeze_map(summary, depth=depth), answers_panel(summary), findings_renderable(summary["findings"]))


def diff_renderable(diff: dict, a: str, b: str) -> Group:
    t = diff["totals"]
    head = Text()
    head.append("freezeframe diff ", style="bold")
    head.append(f"{safe(a)} → {safe(b)}: ", style="cyan")
    head.append(f"{t['compared']} tensors compared, {t['changed']} changed, {t['identical']} bitwise identical")
    table = Table(title="By module (= bitwise identical, Δ changed; % = ‖B − A‖ / ‖A‖)", title_justify="left")
    table.add_column("module", overflow="fold")
    table.add_column("tensors", justify="right")
    table.add_column("state")
    table.add_column("distance", justify="right")
    style = {"identical": "blue", "changed": "green", "partial": "yellow"}
    for m in diff["modules"]:
        table.add_row(_t(m["name"]), str(m["tensors"]),
                      Text("=" if m["state"] == "identical" else f"Δ {m['changed']}/{m['tensors']}", style=style[m["state"]]),
                      _pct(m["drift_rel"]) if m["drift_rel"] is not None else "—")
    parts = [head, table]
    reshaped = [p for p in diff["params"] if p["shape_a"] != p["shape_b"]]
    if reshaped:
        parts.append(_t("Shape changed: " + ", ".join(f"{p['name']} {p['shape_a']}→{p['shape_b']}" for p in reshaped),
                          style="yellow"))
    for key, label in (("only_in_a", a), ("only_in_b", b)):
        if diff[key]:
            parts.append(_t(f"Only in {label}: " + ", ".join(diff[key][:20]) +
                              (f" and {len(diff[key]) - 20} more" if len(diff[key]) > 20 else "")))
    return Group(*parts)
