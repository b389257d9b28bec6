"""The three questions of transfer learning, answered in plain words from a run's own numbers
(docs/summary-format.md, "answers"). Every sentence states a fact the run holds; where it holds
none, the sentence says so and why."""

from __future__ import annotations

from .answers_epochs import bn_statistics, ran, trained_layers
from .words import number as _n, pct as _pct, plural as _plural


def _label(s: dict) -> str:
    plain = f"stage {s['index']}"
    return plain if s["name"] == plain else f"{plain} ({s['name']})"


def answers(summary: dict) -> list[dict]:
    """[{question, answer}], about the training stages; trial stages (lr_find) are left out and
    each answer about stages says so."""
    stages = [s for s in summary["stages"] if s["kind"] != "trial"]
    trial = _trial_note(summary)
    return [
        {"question": "Does each fit run my data through all the layers and update every weight?",
         "answer": _join([_updates(summary, s) for s in stages] or ["No training step was recorded."], trial)},
        {"question": "Does unfreezing eliminate the pretrained weights?",
         "answer": _join(_unfreezing(summary, stages) + _adapters(summary, stages), trial)},
        {"question": "Does the next fit build on the previous one or start over?",
         "answer": " ".join(_continuity(summary, stages))},
    ]


def _join(lines: list[str], note: str) -> str:
    return " ".join([*lines, note] if note else lines)


def _k(summary: dict, s: dict) -> int:
    return summary["stages"].index(s)


def _trial_note(summary: dict) -> str:
    """How the trial stages were treated, and what their end shows of the weights."""
    notes = []
    for s in summary["stages"]:
        if s["kind"] != "trial":
            continue
        k = _k(summary, s)
        ch = [p["stages"][k]["changed"] for p in summary["params"]] + [b["stages"][k]["changed"]
                                                                       for b in summary["buffers"]]
        who = ((s.get("meta") or {}).get("reload_at_end") or {}).get("by")
        if ch and all(c is False for c in ch):
            end = ("its weights were restored" + (f" by {who}" if who else "")
                   + ": every tensor's bytes at its end equal those at its start")
        elif any(c is True for c in ch):
            end = (f"it left {sum(c is True for c in ch)} tensors changed, and the next stage starts from "
                   "them")
        else:
            end = "its end was not captured, so whether it restored the weights is unknown"
        notes.append(f"The trial {_label(s)}, {ran(s)}, is left out of these answers; {end}.")
    return " ".join(notes)


def _updates(summary: dict, s: dict) -> str:
    """Answer 1 for one stage: the forward passes, and what the optimizer steps changed."""
    run, k = summary["run"], _k(summary, s)
    e = [(p, p["stages"][k]) for p in summary["params"]]
    fp = (s.get("forward_passes") or {}).get("train")
    if fp is None:
        passes = "its training forward passes are not in the record"
    elif fp == 0 and s["steps"]:
        passes = ("no training call of the model itself was seen (a training step that calls its submodules "
                  "directly, not model(x), is not counted)")
    else:
        passes = (f"{_plural(fp, 'training forward pass')} went through the whole model "
                  f"({len(summary['modules'])} modules with parameters)")
    out = [f"{_label(s)[0].upper()}{_label(s)[1:]} ran {ran(s)}: {passes}."]
    updated = [p for p, x in e if x["in_optimizer"] and x["changed"] is True]
    unknown = [p for p, x in e if x["changed"] is None]
    held_params = sum(p["numel"] for p, x in e if x["in_optimizer"])
    steps = "The steps" if s["steps"] != 1 else "The step"
    if unknown and not updated:
        why = ("the stage has not ended yet (training in progress)" if run.get("in_progress")
               else "the stage's end was not captured (the run was interrupted)")
        if s["groups"]:
            out.append(f"{steps} were taken by optimizers holding "
                       f"{_plural(sum(x['in_optimizer'] for _, x in e), 'tensor')} ({_n(held_params)} parameters); "
                       f"which of them changed is unknown: {why}.")
        else:
            out.append(f"Which tensors {steps.lower()} updated is unknown: {why}.")
    else:
        out.append(f"{steps} updated {_n(len(updated))} of {_n(run['tensors_total'])} tensors "
                   f"({_n(sum(p['numel'] for p in updated))} of {_n(run['params_total'])} parameters): the tensors "
                   "an optimizer held and whose bytes changed.")
    findings = {f["code"] for f in summary.get("findings") or [] if f["stage"] == s["index"]}

    def see(code: str) -> str:
        return f" (see the {code} finding)" if code in findings else ""

    frozen_moved = [p for p, x in e if x["trainable"] is False and x["changed"] is True]
    if frozen_moved:
        # not "of them": the updated count is of tensors an optimizer held; these need not be
        out.append(f"{_plural(len(frozen_moved), 'frozen tensor')} (requires_grad False) changed anyway"
                   f"{see('frozen-param-changed')}.")
    idle = [p for p, x in e if x["trainable"] and x["in_optimizer"] and x["changed"] is False]
    if idle:
        out.append(f"{_plural(len(idle), 'trainable tensor')} an optimizer held did not change"
                   f"{see('trainable-never-gets-grad')}.")
    stuck = [p for p, x in e if x["trainable"] and not x["in_optimizer"]]
    if stuck:
        out.append(f"{_plural(len(stuck), 'tensor')} ({_n(sum(p['numel'] for p in stuck))} parameters) required "
                   "grad but no optimizer that stepped held them, so no step could update them"
                   f"{see('trainable-not-in-optimizer')}.")
    frozen = [p for p, x in e if x["trainable"] is False]
    frozen_same = [p for p in frozen if p["stages"][k]["changed"] is False]
    if frozen and len(frozen_same) == len(frozen):
        out.append(f"The {_plural(len(frozen), 'frozen tensor')} ({_n(sum(p['numel'] for p in frozen))} parameters) "
                   "were not updated: their bytes are unchanged.")
    elif frozen_same:
        out.append(f"{_plural(len(frozen_same), 'other frozen tensor')} "
                   f"({_n(sum(p['numel'] for p in frozen_same))} parameters) have unchanged bytes.")
    out.extend(x for x in (trained_layers(summary, s, k), bn_statistics(summary, s, k)) if x)
    out.extend(_outside_writes(s, see("changed-outside-optimizer")))
    return " ".join(out)


def _outside_writes(s: dict, see: str) -> list[str]:
    out = []
    for w in s.get("outside_writes") or []:
        params, buffers = list(w.get("params") or []), list(w.get("buffers") or [])
        n = len(params) + len(buffers)
        if not n:
            continue
        parts = [_plural(len(params), "parameter tensor")] if params else []  # tensors, not elements
        parts += [_plural(len(buffers), "buffer")] if buffers else []
        where = (f"after the last step of {_label(s)}" if w.get("when") != "between_steps"
                 else f"after step {w.get('step')} of {_label(s)}, before the next step")
        out.append(f"{where[0].upper()}{where[1:]}, {_plural(n, 'tensor')} ({' and '.join(parts)}) were replaced "
                   "outside an optimizer step (e.g. load_state_dict); the stage's end facts are those of the "
                   f"weights after that write{see}.")
    return out


def _unfreezing(summary: dict, stages: list[dict]) -> list[str]:
    """Answer 2: what unfreezing changed, and how far the first training stage's frozen tensors are
    from the weights watching began with at the end of the last training stage."""
    params = summary["params"]
    lines = []
    for a, b in zip(stages, stages[1:]):
        ka, kb = _k(summary, a), _k(summary, b)
        newly = [p["name"] for p in params if p["stages"][ka]["trainable"] is False and p["stages"][kb]["trainable"]]
        if not newly:
            continue
        wiped = [n for n in newly if n in set(b["changed_since_previous_end"])]
        if not wiped and b["starts_from_previous_end"] is not None:
            how = "bitwise identical to" if b["continuity"] == "bitwise" else "unwritten since"
            lines.append(f"Before {_label(b)}, {_plural(len(newly), 'tensor')} were unfrozen; their values at the "
                         f"start of the stage are {how} the end of the previous stage: unfreezing changed what may "
                         "be updated, not any value.")
        elif wiped:
            lines.append(f"Before {_label(b)}, {_plural(len(newly), 'tensor')} were unfrozen and {len(wiped)} of "
                         "them had different values at the start of the stage — something other than unfreezing "
                         "(a reload or a re-created model) replaced them.")
    if not stages:
        return lines or ["No training stage was recorded."]
    first, last = stages[0], stages[-1]
    k0, k = _k(summary, first), _k(summary, last)
    body = [p for p in params if p["stages"][k0]["trainable"] is False]
    if params and all(p["stages"][k0]["trainable"] is None for p in params):
        return lines or [f"Which tensors were frozen in the first training stage, {_label(first)}, is unknown: the "
                         "run holds no record of its trainable tensors (the run was interrupted)."]
    if not body:
        return lines or [f"No tensor was frozen in the first training stage, {_label(first)}, so none was "
                         "unfrozen."]
    if not lines:
        lines.append("No tensor frozen in the first training stage was unfrozen later." if len(stages) > 1
                     else "The run has one training stage, so nothing was unfrozen between stages.")
    lines.append(_distance(summary, body, first, last))
    return lines


def _distance(summary: dict, body: list[dict], first: dict, last: dict) -> str:
    k = _k(summary, last)
    what = (f"the {_plural(len(body), 'tensor')} ({_n(sum(p['numel'] for p in body))} parameters) frozen in "
            f"{'the first training stage, ' if first is not last else ''}{_label(first)}")
    end = f"at the end of {'the last training stage, ' if first is not last else ''}{_label(last)}"
    same = [p for p in body if p["stages"][k].get("same_as_start") is True]
    if len(same) == len(body):
        return (f"{what[0].upper()}{what[1:]} are bitwise unchanged {end}: distance 0 from the weights watching "
                "began with (their content hashes equal those taken when recording began).")
    num = den = 0.0
    missing = []
    for p in body:
        e = p["stages"][k]
        drift = 0.0 if e.get("same_as_start") is True else e["drift_abs"]
        if drift is None or p.get("ref_norm") is None:
            missing.append(p)
            continue
        num += drift ** 2
        den += p["ref_norm"] ** 2
    kept = f" {_plural(len(same), 'tensor')} of them are bitwise unchanged." if same else ""
    if missing or den == 0:
        return f"How far {what} moved {end} is unknown: {_why_unknown(summary, last, missing, den)}.{kept}"
    return (f"{end[0].upper()}{end[1:]}, {what} are {_pct((num / den) ** 0.5)} away from the weights watching began "
            f"with (relative L2 distance).{kept}")


def _why_unknown(summary: dict, last: dict, missing: list[dict], den: float) -> str:
    k = _k(summary, last)
    if not summary["run"].get("reference", True):
        return ("the run was recorded with reference=False, so the weights watching began with were not kept "
                "and drift was not measured")
    if any(p["stages"][k]["changed"] is None for p in missing):
        return "the stage's end was not captured (the run was interrupted)"
    if not missing and den == 0:
        return "their starting weights are all zero, so a relative distance is undefined"
    refused = [p for p in missing if p.get("reference_refused")]
    if refused:
        return (f"no W_ref was kept for {_plural(len(refused), 'tensor')} of them ({refused[0]['name']}: "
                f"{refused[0]['reference_refused']})")
    never = [p for p in missing if not any(e.get("trainable") for e in p["stages"])]
    if never:  # no copy is kept of a tensor that never trains: only its hashes, which differ
        return (f"{_plural(len(never), 'tensor')} of them never trained, and their bytes are not those watching "
                "began with (written or replaced while frozen); no copy of a tensor that never trains is kept, so only "
                "that they differ is known")
    return f"no drift was measured for {_plural(len(missing), 'tensor')} of them"


def _continuity(summary: dict, stages: list[dict]) -> list[str]:
    """Answer 3: does each training stage start where the previous training stage ended?"""
    lines = []
    for a, s in zip(stages, stages[1:]):
        between = [t for t in summary["stages"] if a["index"] < t["index"] < s["index"]]
        against = f" (compared with {_label(a)}; the trial stage between them is left out)" if between else ""
        ch = s.get("model_changes") or {}
        model = []
        for key, verb in (("replaced", "replaced by new tensors under the same name"), ("added", "added"),
                          ("removed", "removed")):
            if ch.get(key):
                model.append(f"{_plural(len(ch[key]), 'tensor')} {verb}")
        if s["starts_from_previous_end"] is True:
            how = ("bitwise, every tensor's bytes compared" if s["continuity"] == "bitwise"
                   else "proved by version counters: no tensor was written in between")
            lines.append(f"{_label(s)[0].upper()}{_label(s)[1:]} started exactly where the previous stage ended "
                         f"({how}){against}."
                         + (f" The model's tensors changed before it: {', '.join(model)} (an added tensor has no "
                            "previous end to compare)." if model else ""))
        elif s["starts_from_previous_end"] is False:
            diff = s["changed_since_previous_end"]
            cause = f" The model's tensors changed before it: {', '.join(model)}." if model else ""
            lines.append(f"{_label(s)[0].upper()}{_label(s)[1:]} did NOT start where the previous stage ended"
                         f"{against}: {_plural(len(diff), 'tensor')} differ ({', '.join(diff[:3])}"
                         f"{' ...' if len(diff) > 3 else ''}).{cause}")
        else:
            lines.append(f"Whether {_label(s)} started where the previous stage ended is unknown: the previous "
                         "stage's end was not captured.")
    return lines or ["The run has a single training stage."]


def _adapters(summary: dict, stages: list[dict]) -> list[str]:
    """For a PEFT run (docs/peft.md): are the base tensors unchanged at the end of the last
    training stage, did the adapter tensors train, and where is the adapter's update ΔW = scale·B·A
    largest relative to its base weight (the effective update for LoRA, the low-rank update for DoRA)."""
    if not summary["run"].get("peft") or not stages:
        return []
    last = stages[-1]
    k = _k(summary, last)
    base = [p for p in summary["params"] if p.get("adapter") is None]
    adapters = [p for p in summary["params"] if p.get("adapter")]
    same = [p for p in base if p["stages"][k].get("same_as_start") is True]
    moved = [p for p in base if p["stages"][k].get("same_as_start") is False]
    if base and len(same) == len(base):
        out = [f"At the end of {_label(last)}, the {_plural(len(base), 'base tensor')} "
               f"({_n(sum(p['numel'] for p in base))} parameters) are bitwise unchanged"]
    elif moved:
        out = [f"At the end of {_label(last)}, {_n(len(moved))} of the {_plural(len(base), 'base tensor')} differ "
               "from the weights watching began with (see the base-changed and adapter-merged findings)"]
    else:
        out = [f"Whether the {_plural(len(base), 'base tensor')} are unchanged at the end of {_label(last)} is "
               "unknown (an end not captured)"]
    ks = [_k(summary, s) for s in stages]
    trained = [p for p in adapters if any(p["stages"][j]["changed"] is True for j in ks)]
    if adapters:
        out.append(f"the {_plural(len(adapters), 'adapter tensor')} trained" if len(trained) == len(adapters)
                   else f"{_n(len(trained))} of the {_plural(len(adapters), 'adapter tensor')} trained")
    lora_stage = next((s for s in reversed(stages) if s.get("lora")), None)
    if lora_stage is not None:
        rel = {m: e["delta_rel"] for m, e in lora_stage["lora"].items() if e.get("delta_rel") is not None}
        if rel and any(rel.values()):
            top = max(rel, key=rel.get)
            if summary["run"]["peft"].get("use_dora"):  # m·(W+ΔW)/‖W+ΔW‖: ΔW is only the direction's part
                out.append(f"the low-rank update scale·B·A is largest in {top}, {_pct(rel[top])} of W "
                           f"(‖scale·B·A‖/‖W‖ at the end of {_label(lora_stage)}; with DoRA the magnitude vector "
                           "also scales the weight, see its tensor's facts)")
            else:
                out.append(f"the effective update ΔW = scale·B·A is largest in {top}, {_pct(rel[top])} of W "
                           f"(‖ΔW‖/‖W‖ at the end of {_label(lora_stage)})")
        elif all(e.get("b_zero") is True or e.get("a_zero") is True for e in lora_stage["lora"].values()):
            out.append(f"every adapter has a factor (lora_B, or an embedding's lora_embedding_A) still exactly zero "
                       f"at the end of {_label(lora_stage)}, so ΔW = 0: the adapters change nothing (see the "
                       "lora-b-still-zero finding)")
    return ["; ".join(out) + "."]
