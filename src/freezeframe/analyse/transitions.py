"""What happened between two fits (the summary's `transitions[]`), how the first fit started
(`stages[].initial_state`) and the values of each epoch (`stages[].epoch_metrics`); see
docs/summary-format.md."""

from __future__ import annotations


def _train(stages: list[dict]) -> list[int]:
    return [k for k, s in enumerate(stages) if s.get("kind", "train") != "trial"]


def _trainable(params: list[dict], k: int) -> dict[str, bool | None]:
    return {p["name"]: p["stages"][k]["trainable"] for p in params}


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def event(before: dict, after: dict, group_count: int, unfrozen: int, frozen: int,
          changes: dict | None = None) -> str:
    """The call that explains a change of what trains: fastai's own (from the stages' meta
    `frozen_groups`, against the number of groups), else counts of tensors that flipped, and of
    those the model gained or lost (`changes`: the later stage's `model_changes`)."""
    fa, fb = before.get("frozen_groups"), after.get("frozen_groups")
    if isinstance(fa, list) and isinstance(fb, list) and fa != fb:
        if not fb:
            return "unfreeze()"
        if group_count and len(fb) == group_count - 1:
            return "freeze()"
        return f"freeze_to({after.get('frozen_idx', len(fb))})"
    added, removed = (len((changes or {}).get(k) or []) for k in ("added", "removed"))
    words = [w for w, n in (("unfrozen", unfrozen), ("frozen", frozen), ("added", added), ("removed", removed)) if n]
    if not words:
        return "no change to what trains"
    counts = {"unfrozen": unfrozen, "frozen": frozen, "added": added, "removed": removed}
    first, *rest = words
    return ", ".join([f"{_n(counts[first], 'tensor')} {first}", *(f"{counts[w]} {w}" for w in rest)])


def _membership(raw: dict, active: set) -> dict[tuple, tuple]:
    """(optimizer, group) -> the sorted tensor indices it holds, for the optimizers that stepped."""
    return {(g["optimizer"], g["index"]): tuple(sorted(g.get("params") or []))
            for g in raw.get("groups") or [] if g["optimizer"] in active}


def _tokens(raw: dict, active: set) -> dict | None:
    """Optimizer index -> the token of the object behind it at the stage's start (capture/stages.py),
    for the optimizers that stepped; None when a token is missing (an older run)."""
    tokens = raw.get("optimizer_tokens")
    if not isinstance(tokens, list) or any(o >= len(tokens) or tokens[o] is None for o in active):
        return None
    return {o: tokens[o] for o in active}


def _optimizer(raw_a: dict, raw_b: dict, a: dict, b: dict) -> str:
    act_a = {g["optimizer"] for g in a["groups"]}
    act_b = {g["optimizer"] for g in b["groups"]}
    if act_a != act_b:
        return "new"
    ta, tb = _tokens(raw_a, act_a), _tokens(raw_b, act_b)
    if ta is not None and tb is not None and ta != tb:
        return "new"  # another optimizer object at the same index (a new fit's optimizer)
    return "same" if _membership(raw_a, act_a) == _membership(raw_b, act_b) else "groups changed"


def _state_reset(a: dict, b: dict) -> bool | None:
    """Stage b started with empty optimizer state after stage a's optimizer held some."""
    before, after = a.get("optimizer_state_end"), b.get("optimizer_state_start")
    if after is None:
        return None
    if after:
        return False
    return None if before is None else before > 0


def _groups(a: dict, b: dict) -> list[dict]:
    ga = {(g["optimizer"], g["index"]): g for g in a["groups"]}
    gb = {(g["optimizer"], g["index"]): g for g in b["groups"]}
    out = []
    for key in sorted(set(ga) | set(gb)):
        x, y = ga.get(key), gb.get(key)
        out.append({"index": key[1], "name": (y or x)["name"], "optimizer": key[0],
                    "lr_before": x["lr_last"] if x else None, "lr_after": y["lr_first"] if y else None,
                    "lr_max_after": y["lr_max"] if y else None,
                    "tensors_before": x["tensors"] if x else None, "tensors_after": y["tensors"] if y else None})
    return out


def build_transitions(stages: list[dict], raw: list[dict], params: list[dict]) -> list[dict]:
    """One entry per training stage after the first training stage (trial stages skipped on both
    sides). `stages`: the summary's stages; `raw`: the manifest's stage records, aligned;
    `params`: the summary's params."""
    train = _train(stages)
    out = []
    for j, i in zip(train, train[1:]):
        a, b = stages[j], stages[i]
        ta, tb = _trainable(params, j), _trainable(params, i)
        up = [n for n in tb if ta[n] is False and tb[n] is True]
        down = [n for n in tb if ta[n] is True and tb[n] is False]
        known = any(v is not None for v in ta.values()) and any(v is not None for v in tb.values())
        out.append({
            "stage": b["index"], "from_stage": a["index"],
            # null: a stage without a record of what trained (an interrupted run's recovered stage)
            "event": event(a.get("meta") or {}, b.get("meta") or {}, len(b["groups"]), len(up), len(down),
                           b.get("model_changes")) if known else None,
            "became_trainable": up, "became_frozen": down,
            "values_changed": list(b.get("changed_since_previous_end") or []),
            "values_kept": b.get("starts_from_previous_end"),
            "optimizer": _optimizer(raw[j], raw[i], a, b),
            "optimizer_state_reset": _state_reset(a, b),
            "groups": _groups(a, b),
        })
    return out


FINE_TUNE_NOTE = "fastai's fine_tune froze the body (freeze()) before its frozen epochs"
CREATED_NOTE = ("fastai's Learner froze the body before the first fit (vision_learner freezes it when "
                "created with pretrained weights; or freeze() was called)")


def initial_state(stage: dict, params: list[dict], k: int, framework: str) -> dict:
    """How the first training stage started: what was frozen and what trained, fastai's frozen
    groups, and, for fastai, who froze the body."""
    t = _trainable(params, k)
    meta = stage.get("meta") or {}
    fg = meta.get("frozen_groups")
    fg = list(fg) if isinstance(fg, list) else None
    note = None
    if framework == "fastai" and fg:
        note = FINE_TUNE_NOTE if meta.get("method") == "fine_tune" else CREATED_NOTE
    return {"frozen": [n for n, v in t.items() if v is False], "trainable": [n for n, v in t.items() if v is True],
            "frozen_groups": fg, "note": note}


def epoch_metrics(raw: dict, epoch_starts: list | None) -> list[dict] | None:
    """`[{epoch, first_step, values}]` aligned with `epoch_starts`, or None when the stage holds
    no epoch values (or they do not line up with its epochs)."""
    em = raw.get("epoch_metrics")
    if not isinstance(em, list) or epoch_starts is None or len(em) != len(epoch_starts):
        return None
    return [{"epoch": k, "first_step": int(first),
             "values": {str(n): v for n, v in e.items()} if isinstance(e, dict) else None}
            for k, (first, e) in enumerate(zip(epoch_starts, em))]


def attach(summary: dict, raw: list[dict]) -> None:
    """Add `stages[].epoch_metrics`, `stages[].initial_state` and `transitions` to a summary
    (`raw`: the manifest's stage records, aligned with `summary["stages"]`)."""
    stages, params = summary["stages"], summary["params"]
    train = _train(stages)
    for k, s in enumerate(stages):
        s["epoch_metrics"] = epoch_metrics(raw[k], s.get("epoch_starts"))
        s["initial_state"] = (initial_state(s, params, k, summary["run"].get("framework", "torch"))
                              if train and k == train[0] else None)
    summary["transitions"] = build_transitions(stages, raw, params)
