"""Frozen tensors that still hold gradients when a fastai fit starts (docs/fastai.md, "Frozen
tensors that move"). fastai's `Optimizer.zero_grad()` zeroes gradients in place and never sets
them to None, and its `step()` updates every tensor whose `.grad` is not None, frozen or not: a
tensor frozen after an earlier fit (lr_find, or a fit before `freeze()`) keeps its zero-filled
gradient, so weight decay (and any optimizer state it still has) moves it in the next fit."""

from __future__ import annotations

import sys

import torch

KEY = "fastai_zero_grads_frozen"


def frozen_with_grads(learn, cause: str) -> dict | None:
    """The fact for a stage's meta (under KEY), or None when no frozen tensor holds a gradient.

    tensors: frozen tensors (requires_grad False) of the optimizer whose .grad is a tensor;
    names: those tensors' names in the model; zero_filled: how many of those gradients are all zeros; decayed: how many of those tensors
    the optimizer applies weight decay to (its group's wd is not 0 and fastai's per-tensor
    `do_wd` flag is not False); weight_decay: the largest wd of their groups; decoupled: True for
    fastai's decoupled weight decay (`p *= 1 - lr*wd`, the default `true_wd`), False for L2
    regularisation added to the gradient, None when the optimizer does not say; cause: "lr_find"
    (its LRFinder zeroes the gradients at its end), "earlier fit" (every fit ends its batches with
    zero_grad) or "unknown" (no earlier fit was seen by this callback)."""
    opt = learn.opt
    state = getattr(opt, "state", None) or {}
    held, wds = [], []
    for pl, hyper in zip(opt.param_lists, opt.hypers):
        for p in pl:
            if isinstance(p, torch.Tensor) and not p.requires_grad and p.grad is not None:
                held.append((p, _wd(hyper)))
    if not held:
        return None
    zero = sum(1 for p, _ in held if not bool(p.grad.detach().ne(0).any()))
    decayed = 0
    for p, wd in held:
        st = state.get(p) if isinstance(state, dict) else None
        if wd and (st or {}).get("do_wd", True) is not False:
            decayed += 1
        wds.append(wd or 0.0)
    name_of = {id(p): n for n, p in learn.model.named_parameters()}
    return {"tensors": len(held), "zero_filled": zero, "decayed": decayed, "weight_decay": max(wds),
            "decoupled": _decoupled(opt), "cause": cause,
            "names": sorted(name_of[id(p)] for p, _ in held if id(p) in name_of)}


def _wd(hyper) -> float | None:
    v = hyper.get("wd") if isinstance(hyper, dict) else None
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _decoupled(opt) -> bool | None:
    mod = sys.modules.get("fastai.optimizer")
    cbs = getattr(opt, "cbs", None)
    if mod is None or cbs is None:
        return None
    if mod.weight_decay in cbs:
        return True
    if mod.l2_reg in cbs:
        return False
    return None
