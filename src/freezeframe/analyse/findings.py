"""Findings: the fine-tuning mistakes a stored run shows, each a pure function of the summary."""

from __future__ import annotations

from . import findings_peft, findings_writes

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def _finding(code, severity, message, stage=None, params=()):
    return {"code": code, "severity": severity, "message": message, "stage": stage, "params": list(params)}


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _train_stages(summary):
    return [s for s in summary["stages"] if s["kind"] != "trial"]


def frozen_param_changed(summary, view) -> list[dict]:
    out = []
    for s in _train_stages(summary):
        k = summary["stages"].index(s)
        hit = [p for p in summary["params"]
               if p["stages"][k]["trainable"] is False and p["stages"][k]["changed"] is True]
        if hit:
            names = [p["name"] for p in hit]
            out.append(_finding(
                "frozen-param-changed", "error",
                f"{len(hit)} tensor(s) frozen for the whole of stage {s['name']!r} changed anyway ({_names(names)}): "
                + _frozen_change_cause(s, k, hit) + findings_peft.merge_hint(summary, names), s["index"], names))
    return out


# The fact the fastai integration puts in a stage's meta: frozen tensors still holding gradients
# as the fit began (docs/fastai.md, "Frozen tensors that move").
FASTAI_ZERO_GRADS = "fastai_zero_grads_frozen"

_ZERO_GRAD_FIX = ("Set their gradients to None (optimizer.zero_grad(set_to_none=True), or p.grad = None when "
                  "you freeze them) or take them out of the optimizer.")


def _frozen_change_cause(s: dict, k: int, hit: list[dict]) -> str:
    """Why frozen tensors moved, from what the run holds: the fastai integration's fact when it
    gives one, else what the stage shows of each tensor (held by a stepping optimizer, moved
    by its steps, rewritten outside them)."""
    fact = (s.get("meta") or {}).get(FASTAI_ZERO_GRADS)
    if isinstance(fact, dict) and fact.get("tensors"):
        named = fact.get("names")
        # the fastai cause only for tensors the integration saw holding gradients (all of them,
        # else the stage's own facts decide: some may have been rewritten outside a step)
        if not isinstance(named, list) or {p["name"] for p in hit} <= set(named):
            return _fastai_cause(fact)
    written = {n for w in s.get("outside_writes") or [] for n in w.get("params") or []}
    outside = [p for p in hit if p["name"] in written]
    held = [p for p in hit if p["name"] not in written and p["stages"][k]["in_optimizer"]]
    loose = [p for p in hit if p["name"] not in written and not p["stages"][k]["in_optimizer"]]
    parts = []
    if held:
        ratios = sorted(p["stages"][k]["update_ratio_median"] for p in held
                        if (p["stages"][k]["update_ratio_median"] or 0) > 0)
        if ratios:
            how = (f"the optimizer's steps moved {len(ratios)} of them (median update {ratios[len(ratios) // 2]:.2g} "
                   "of the weight's norm per recorded step) though no gradient reached them")
        else:
            how = "an optimizer that stepped in this stage holds them though no gradient reached them"
        parts.append(f"{_held(held, hit)}{how}: a gradient that is a zero tensor rather than None "
                     "(zero_grad(set_to_none=False), or one left from before they were frozen) still gets "
                     "weight decay and momentum applied. " + _ZERO_GRAD_FIX)
    if outside:
        parts.append(f"{_held(outside, hit)}they were rewritten outside an optimizer step (see "
                     "changed-outside-optimizer).")
    if loose:
        parts.append(f"{_held(loose, hit)}no optimizer that stepped holds them, so something outside the steps "
                     "wrote them: an in-place edit, a hand-written update or a tensor tied to a trained one. Find "
                     "what writes them.")
    return " ".join(parts)


def _held(part: list, hit: list) -> str:
    return "" if len(part) == len(hit) else f"{len(part)} of them: "


def _fastai_cause(fact: dict) -> str:
    cause = {"lr_find": "lr_find left zero-filled gradients on them",
             "earlier fit": "an earlier fit left zero-filled gradients on them"}.get(
        fact.get("cause"), "they still held gradients from before this fit")
    wd = fact.get("weight_decay")
    if fact.get("decayed"):
        kind = "decoupled weight decay" if fact.get("decoupled") else "weight decay"
        mover = f"its {kind}" + (f" (wd={wd:g})" if isinstance(wd, (int, float)) else "") + " moved them"
    else:
        mover = "the optimizer state they still hold moved them"
    return (f"{cause} (fastai's zero_grad() zeroes gradients in place and never sets them to None), and fastai's "
            f"optimizer steps every tensor whose gradient is not None, frozen or not: {mover}. Before this fit, "
            "set the gradients to None with learn.model.zero_grad(set_to_none=True) (e.g. right after lr_find); "
            "the frozen tensors then stay bitwise as they were.")


def trainable_not_in_optimizer(summary, view) -> list[dict]:
    out = []
    for s in _train_stages(summary):
        k = summary["stages"].index(s)
        hit = [p["name"] for p in summary["params"]
               if p["stages"][k]["trainable"] and not p["stages"][k]["in_optimizer"] and p["stages"][k]["grad_steps"] > 0]
        if hit:
            out.append(_finding(
                "trainable-not-in-optimizer", "error",
                f"In stage {s['name']!r}, {len(hit)} tensor(s) received gradients but no watched optimizer holds them, "
                f"so they never move ({_names(hit)}). After unfreezing, add them to the optimizer "
                "(or rebuild it); if another optimizer updates them, pass it to watch() or rec.track()."
                + findings_peft.optimizer_hint(summary, hit), s["index"], hit))
    return out


def trainable_never_gets_grad(summary, view) -> list[dict]:
    out = []
    for s in _train_stages(summary):
        k = summary["stages"].index(s)
        if not s["steps"]:
            continue
        hit = [p["name"] for p in summary["params"]
               if p["stages"][k]["trainable"] and p["stages"][k]["in_optimizer"] and p["stages"][k]["grad_steps"] == 0]
        if hit:
            out.append(_finding(
                "trainable-never-gets-grad", "warning",
                f"In stage {s['name']!r}, {len(hit)} trainable tensor(s) never received a gradient in "
                f"{s['steps']} steps ({_names(hit)}): they are not used in the forward pass (or their "
                "output is detached). Freeze them or check the model's forward.",
                s["index"], hit))
    return out


def stage_discontinuity(summary, view) -> list[dict]:
    out = []
    for s in _train_stages(summary):
        if s["starts_from_previous_end"] is False and not s.get("meta", {}).get("reload_requested"):
            diff = s["changed_since_previous_end"]
            out.append(_finding(
                "stage-discontinuity", "warning",
                f"Stage {s['name']!r} did not start where the previous stage ended: {len(diff)} tensor(s) differ "
                f"({_names(diff)}; decided {'bitwise' if s['continuity'] == 'bitwise' else 'by write tracking'}). "
                "The model was re-created or weights were reloaded between stages; if that was not intended, "
                "the earlier training is lost.",
                s["index"], diff))
    return out


def frozen_bn_stats_changed(summary, view) -> list[dict]:
    out = []
    modules = {m["name"]: m for m in summary["modules"]}
    for s in _train_stages(summary):
        k = summary["stages"].index(s)
        hit = [b["name"] for b in summary["buffers"]
               if b["stages"][k]["changed"] and b["module"] in modules
               and modules[b["module"]]["stages"][k]["trainable"] is False]
        if hit:
            out.append(_finding(
                "frozen-bn-stats-changed", "info",
                f"In stage {s['name']!r}, the running statistics of {len(hit)} buffer(s) of frozen norm layers "
                f"moved ({_names(hit)}) because the model ran in train mode. Put those layers in eval mode if "
                "they should stay exactly as pretrained.",
                s["index"], hit))
    return out


def zero_lr_group(summary, view) -> list[dict]:
    out = []
    for s in _train_stages(summary):
        for g in s["groups"]:
            if g["trainable_params"] > 0 and g["lr_applied_max"] == 0:
                out.append(_finding(
                    "zero-lr-group", "warning",
                    f"In stage {s['name']!r}, group {g['name']} holds {g['trainable_params']:,} trainable parameters "
                    "but its learning rate was 0 at every step: it cannot learn. Check the scheduler or the lr you set.",
                    s["index"]))
    return out


def nonfinite(summary, view) -> list[dict]:
    bad = getattr(getattr(view, "tensors", None), "nonfinite", None)  # aggregate.NonFinite
    if bad is None:
        return []
    step, t = bad.step, bad.tensor
    names = [p["name"] for p in summary["params"]] + [b["name"] for b in summary["buffers"]]
    hit = sorted({names[i] for i in bad.tensors if i < len(names)})
    return [_finding(
        "nonfinite", "error",
        f"NaN or Inf appeared at step {step} in {names[t] if t < len(names) else t} (and {len(hit) - 1} other "
        "tensor(s) later): lower the learning rate, use gradient clipping, or check the data and loss.",
        bad.stage, hit)]


def optimizer_state_reset(summary, view) -> list[dict]:
    out = []
    stages = _train_stages(summary)
    for a, b in zip(stages, stages[1:]):
        before, after = a.get("optimizer_state_end"), b.get("optimizer_state_start")
        if before and after == 0:
            out.append(_finding(
                "optimizer-state-reset", "info",
                f"Stage {b['name']!r} started with empty optimizer state: the momentum / Adam statistics of "
                f"{before} tensor(s) built up in stage {a['name']!r} were discarded (a new optimizer, or fastai's "
                "freeze()/unfreeze(), which clear it). Usually intended; the first steps of the stage then "
                "behave like a fresh start of the optimizer.",
                b["index"]))
    return out


# A typical Adam/SGD step moves a weight by about 1e-3 of its norm; 100x away either side is unusual.
RATIO_LOW, RATIO_HIGH = 1e-5, 1e-1


def update_ratio_outlier(summary, view) -> list[dict]:
    out = []
    for s in _train_stages(summary):
        k = summary["stages"].index(s)
        for g in s["groups"]:
            ratios = sorted(p["stages"][k]["update_ratio_median"] for p in summary["params"]
                            if p["stages"][k]["group"] == g["index"] and p["stages"][k]["trainable"]
                            and p["stages"][k]["update_ratio_median"] is not None)
            if not ratios:
                continue
            med = ratios[len(ratios) // 2] if len(ratios) % 2 else (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
            if med > RATIO_HIGH or 0 < med < RATIO_LOW:
                hint = ("large: the learning rate may be too high for this group" if med > RATIO_HIGH
                        else "tiny: this group barely moves; its learning rate may be too low")
                out.append(_finding(
                    "update-ratio-outlier", "info",
                    f"In stage {s['name']!r}, group {g['name']}'s median update-to-weight ratio is {med:.2g} "
                    f"(usual: about 1e-3) — {hint}.",
                    s["index"]))
    return out


def bn_trains_in_frozen_group(summary, view) -> list[dict]:
    out = []
    for s in _train_stages(summary):
        k = summary["stages"].index(s)
        for g in s["groups"]:
            members = [p for p in summary["params"] if p["stages"][k]["group"] == g["index"]]
            frozen_other = [p for p in members if not p["is_norm"] and p["stages"][k]["trainable"] is False]
            norm_train = [p["name"] for p in members if p["is_norm"] and p["stages"][k]["trainable"]]
            if frozen_other and norm_train and not any(
                    p["stages"][k]["trainable"] for p in members if not p["is_norm"]):
                reason = s.get("meta", {}).get("norm_trains_reason")
                out.append(_finding(
                    "bn-trains-in-frozen-group", "info",
                    f"In stage {s['name']!r}, group {g['name']} is frozen but its {len(norm_train)} norm-layer "
                    f"tensor(s) still train ({_names(norm_train)})"
                    + (f": {reason}." if reason else ".")
                    + " They adapt the normalisation to the new data while the other weights stay as pretrained"
                    + ("." if reason else " (fastai's train_bn=True does this on purpose)."),
                    s["index"], norm_train))
    return out


CHECKS = [trainable_not_in_optimizer, frozen_param_changed, nonfinite, stage_discontinuity, zero_lr_group,
          trainable_never_gets_grad, frozen_bn_stats_changed, optimizer_state_reset, update_ratio_outlier,
          bn_trains_in_frozen_group, *findings_writes.CHECKS, *findings_peft.CHECKS]


def find(summary: dict, view=None) -> list[dict]:
    out = []
    for check in CHECKS:
        out.extend(check(summary, view))
    out.sort(key=lambda f: (SEVERITY_ORDER[f["severity"]], -1 if f["stage"] is None else f["stage"]))
    return out
