"""Findings on what the recorder saw happen to the model outside the optimizers' steps: tensors
rewritten (load_state_dict, in-place copies, EMA swaps, merges), the model's tensor set changed,
a tensor stepped by two optimizers. Each is a pure function of the summary (docs/recording.md)."""

from __future__ import annotations


def _finding(code, severity, message, stage=None, params=()):
    return {"code": code, "severity": severity, "message": message, "stage": stage, "params": list(params)}


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _count(params: list, buffers: list) -> str:
    parts = []
    if params:
        parts.append(f"{len(params)} parameter tensor(s) ({_names(params)})")
    if buffers:
        parts.append(f"{len(buffers)} buffer(s) ({_names(buffers)})")
    return " and ".join(parts)


def changed_outside_optimizer(summary, view) -> list[dict]:
    """`outside_writes` of training stages (a trial stage's restore, fastai's lr_find, is its own)."""
    out = []
    stages = summary["stages"]
    for k, s in enumerate(stages):
        if s.get("kind") == "trial":
            continue
        for w in s.get("outside_writes") or []:
            params, buffers = list(w.get("params") or []), list(w.get("buffers") or [])
            if not params and not buffers:
                continue
            what = _count(params, buffers)
            how = ("outside an optimizer step (load_state_dict, a copy_() under torch.no_grad(), an EMA swap "
                   "or a merge)")
            if w.get("when") == "between_steps":
                nxt = next((t for t in stages[k + 1:]), None)
                where = f"the next stage {nxt['name']!r}" if nxt is not None else "the next stage"
                message = (f"After the last step of stage {s['name']!r} (step {w.get('step')}) and before the first "
                           f"step of {where}, {what} were rewritten {how}: the next stage does not start where "
                           f"this one's steps left them. If that write is not intended, look for what loads or "
                           f"copies weights between the two loops.")
            elif (s.get("meta") or {}).get("reload_at_end") and w.get("detected") == "stage_end":
                # the framework said, as the stage began, that a callback would reload weights at
                # its end (fastai's SaveModelCallback): intended, so stated as information
                by = s["meta"]["reload_at_end"]
                message = (f"At the end of stage {s['name']!r}, {by.get('by', 'a callback')} loaded "
                           f"{by.get('what', 'other weights')}: {what} differ from the last step's (step "
                           f"{w.get('step')}). The stage's end facts describe the weights as the fit returned "
                           f"them, after that reload.")
                out.append(_finding("changed-outside-optimizer", "info", message, s["index"], params + buffers))
                continue
            else:
                found = {"stage_end": "at the stage's end", "close": "when recording closed",
                         "next_stage": "when the model's tensors changed, before the next step"}.get(
                             w.get("detected"), "at the next stage boundary")
                message = (f"After the last step of stage {s['name']!r} (step {w.get('step')}), {what} were "
                           f"rewritten {how}; found {found}. The stage's end facts (changed, drift, hashes, "
                           f"continuity) are those of the weights after that write, not of the last step's. "
                           f"Restoring the best epoch's weights does this on purpose; otherwise find what writes "
                           f"the weights after training.")
            out.append(_finding("changed-outside-optimizer", "warning", message, s["index"], params + buffers))
    return out


def model_changed(summary, view) -> list[dict]:
    out = []
    for s in summary["stages"]:
        ch = s.get("model_changes")
        if not ch:
            continue
        replaced, added, removed = (list(ch.get(key) or []) for key in ("replaced", "added", "removed"))
        if not (replaced or added or removed):
            continue
        parts = []
        if replaced:
            parts.append(f"{len(replaced)} tensor(s) replaced by new ones under the same name ({_names(replaced)}): "
                         "not a continuation of the old tensors")
        known = {n for p in summary["params"] for n in [p["name"], *p["aliases"]]}
        kept = [n for n in added if n in known]
        lost = [n for n in added if n not in known]  # under torch.distributed (docs/recording.md)
        if kept:
            parts.append(f"{len(kept)} tensor(s) added ({_names(kept)}), recorded from this stage on")
        if lost:
            parts.append(f"{len(lost)} tensor(s) added ({_names(lost)}), not recorded")
        if removed:
            parts.append(f"{len(removed)} tensor(s) removed ({_names(removed)}), whose record ends")
        out.append(_finding(
            "model-changed", "warning",
            f"Before stage {s['name']!r} the model's tensors changed: {'; '.join(parts)}. This stage starts from "
            "the new tensors, so it does not continue the previous stage for them. If a layer was replaced "
            "by mistake (e.g. re-created after loading weights), reload its weights; to record a different "
            "model, start a new run.",
            s["index"], replaced + added + removed))
    return out


def tensor_in_two_optimizers(summary, view) -> list[dict]:
    out = []
    for s in summary["stages"]:
        shared = list(s.get("shared_between_optimizers") or [])
        if shared:
            out.append(_finding(
                "tensor-in-two-optimizers", "warning",
                f"In stage {s['name']!r}, {len(shared)} tensor(s) are held by more than one watched optimizer that "
                f"stepped ({_names(shared)}): each iteration updates them twice, with both optimizers' learning "
                "rates and states. Give each tensor to one optimizer only.",
                s["index"], shared))
    return out


CHECKS = [changed_outside_optimizer, model_changed, tensor_in_two_optimizers]
