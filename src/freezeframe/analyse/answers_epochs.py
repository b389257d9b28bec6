"""Sentences of the first answer about one stage: what it ran in epochs, batches and steps, which
kinds of layers trained while others were frozen, and what happened to BatchNorm running
statistics (docs/summary-format.md, "answers[]")."""

from __future__ import annotations

from collections import Counter

from .layers import is_weight_type
from .words import number as _n, pct as _pct, plural as _plural

STATS = ("running_mean", "running_var")


def batches_per_epoch(s: dict) -> int | None:
    """Training batches per epoch, when the stage's record makes it exact: its first epoch began
    in it and its last ended in it (no split inside an epoch, no run stopped mid-epoch), every
    epoch it planned ran in full (or none was planned), each applied the same number of steps,
    and its training forward passes divide evenly among its epochs."""
    if s.get("first_epoch_continued") is not False or s.get("last_epoch_partial") is not False:
        return None
    epochs, starts = s.get("epochs"), s.get("epoch_starts")
    fp = (s.get("forward_passes") or {}).get("train")
    planned = s.get("epochs_planned")
    if not epochs or not starts or not fp or fp % epochs or (planned is not None and planned != epochs):
        return None
    if s.get("first_step") is None or s.get("last_step") is None or starts[0] != s["first_step"]:
        return None
    ends = [*starts[1:], s["last_step"] + 1]
    if len({b - a for a, b in zip(starts, ends)}) != 1:
        return None
    return fp // epochs


def ran(s: dict) -> str:
    """What a stage ran: "3 epochs = 3 passes over the 15 training batches = 45 optimizer steps",
    "3 epochs = 45 optimizer steps" when the batches per epoch are not exact, "5 optimizer steps
    in 1 epoch, which goes on in the next stage" when a stage split inside an epoch, "... (the
    run did not finish: ...)" when the run stopped in the stage, or the steps alone when no
    epoch was announced."""
    steps = _plural(s["steps"], "optimizer step")
    epochs = s.get("epochs")
    if not epochs:
        return steps
    first, last = s.get("first_epoch_continued") is True, s.get("last_epoch_partial") is True
    if first or last:  # an epoch shared with another stage: its batches are not all in this one
        if epochs == 1:
            what = " and ".join(w for w, on in (("began in the stage before", first),
                                                ("goes on in the next stage", last)) if on)
            return f"{steps} in 1 epoch, which {what}"
        what = "; ".join(w for w, on in (("the first began in the stage before", first),
                                         ("the last goes on in the next stage", last)) if on)
        return f"{steps} in {_plural(epochs, 'epoch')} ({what})"
    if s.get("last_epoch_partial") is None and s.get("first_epoch_continued") is False:
        return f"{steps} in {_plural(epochs, 'epoch')} (the run did not finish: the last may be cut short)"
    batches = batches_per_epoch(s)
    if batches:
        return (f"{_plural(epochs, 'epoch')} = {_plural(epochs, 'pass')} over the "
                f"{_plural(batches, 'training batch')} = {steps}")
    return f"{_plural(epochs, 'epoch')} = {steps}"


def _by_name(summary: dict) -> dict[str, dict]:
    out = {}
    for p in summary["params"]:
        for n in [p["name"], *(p.get("aliases") or [])]:
            out[n] = p
    return out


def _kinds(layers: list[dict]) -> str:
    """"2 Linear and 2 BatchNorm1d layers": counts by type, convolutions and Linear first."""
    count = Counter(x["type"] for x in layers)
    order = sorted(count, key=lambda t: (not is_weight_type(t), [x["type"] for x in layers].index(t)))
    words = [f"{_n(count[t])} {t}" for t in order]
    joined = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
    return f"{joined} layer{'' if len(layers) == 1 else 's'}"


def trained_layers(summary: dict, s: dict, k: int) -> str | None:
    """Which kinds of layers trained in stage k while others were frozen: "While the body was
    frozen, these layers trained: the head's 2 Linear and 2 BatchNorm1d layers, and 36
    BatchNorm2d layers of the body (fastai's train_bn)." None when nothing was frozen."""
    layers = summary.get("layers") or []
    p = _by_name(summary)

    def states(x):
        return [p[n]["stages"][k] for n in x["params"] if n in p]

    frozen = [x for x in layers if states(x) and all(e["trainable"] is False for e in states(x))]
    trained = [x for x in layers if any(e["trainable"] and e["in_optimizer"] for e in states(x))]
    if not frozen or not trained:
        return None
    body = [x for x in layers if x["part"] == "body"]
    body_weights = [x for x in body if is_weight_type(x["type"])]
    if (all(x["part"] == "body" for x in frozen) and body_weights
            and all(x in frozen for x in body_weights)):
        intro = "While the body was frozen"
    else:
        intro = f"While {_n(len(frozen))} of the {_plural(len(layers), 'layer')} were frozen"
    if all(x["part"] is None for x in trained):
        return f"{intro}, these layers trained: {_kinds(trained)}."
    head = [x for x in trained if x["part"] == "head"]
    in_body = [x for x in trained if x["part"] == "body"]
    other = [x for x in trained if x["part"] is None]
    words = []
    if head:
        every = len(head) == sum(1 for x in layers if x["part"] == "head")
        words.append(f"the head's {_kinds(head)}" if every else f"{_kinds(head)} of the head")
    if in_body:
        norm = all(p[n]["is_norm"] for x in in_body for n in x["params"] if n in p)
        why = " (fastai's train_bn)" if norm and (s.get("meta") or {}).get("norm_trains") else ""
        words.append(f"{_kinds(in_body)} of the body{why}")
    if other:
        words.append(f"{_kinds(other)} outside both (the root module's own tensors)" if all(
            not x["module"] for x in other) else f"{_kinds(other)} outside both")
    return f"{intro}, these layers trained: {', and '.join(words)}."


def bn_statistics(summary: dict, s: dict, k: int) -> str | None:
    """What happened to the BatchNorm running statistics in stage k, with the largest change
    (relative L2 distance from the values watching began with); None for a model without them or
    a stage whose end was not captured."""
    stats = [b for b in summary.get("buffers") or [] if b["name"].rpartition(".")[2] in STATS]
    if not stats or any(b["stages"][k]["changed"] is None for b in stats):
        return None
    owners = list(dict.fromkeys(b["module"] for b in stats))
    moved = list(dict.fromkeys(b["module"] for b in stats if b["stages"][k]["changed"]))
    layer_words = "BatchNorm layer" if len(owners) == 1 else f"{_n(len(owners))} BatchNorm layers"
    if not moved:
        return f"The running statistics of the {layer_words} did not change in this stage (bitwise)."
    modules = {m["name"]: m for m in summary.get("modules") or []}
    frozen = [n for n in moved if n in modules and modules[n]["stages"][k]["trainable"] is False]
    p = _by_name(summary)
    layers = summary.get("layers") or []
    where = {x["module"]: x for x in layers}

    def frozen_weights(layer: dict) -> bool:
        # a norm layer standing alone (a stem's bn1 is its own block) is judged by its part's
        # weight layers, as the layer view does (docs/report.md)
        ws = [x for x in layers if x["block"] == layer["block"] and is_weight_type(x["type"])]
        if not ws and layer.get("part") is not None:
            ws = [x for x in layers if x.get("part") == layer["part"] and is_weight_type(x["type"])]
        return bool(ws) and all(p[n]["stages"][k]["trainable"] is False for x in ws for n in x["params"] if n in p)

    beside = [n for n in moved if n not in frozen and n in where and frozen_weights(where[n])]
    notes = [("it was frozen" if len(owners) == 1 else f"{_n(len(frozen))} of these layers were frozen")] if frozen else []
    if beside:
        notes.append(f"{_n(len(beside))} sit in blocks whose convolution and linear layers were frozen")
    of = ("the" if len(owners) == 1 else "all" if len(moved) == len(owners) else f"{_n(len(moved))} of the")
    out = (f"The running statistics (running_mean, running_var) of {of} {layer_words} moved: the forward pass updates them in train mode, "
           "frozen or not, and no optimizer step is involved" + (f" ({'; '.join(notes)})" if notes else ""))
    rel = {b["name"]: b["stages"][k]["drift_rel"] for b in stats
           if b["stages"][k]["changed"] and b["stages"][k]["drift_rel"] is not None}
    if rel:
        top = max(rel, key=rel.get)
        out += f"; largest: {top}, {_pct(rel[top])} from its value when watching began (relative L2 distance)"
    return out + "."
