"""Parameters replaced while recording: a new head under the same name is followed; names that
appear or disappear are reported by the caller."""

from __future__ import annotations

import torch

from .modelmap import ModelMap, normalise_name, unwrap


def follow_replaced(model: torch.nn.Module, model_map: ModelMap, params: list, index_of: dict, refs: list,
                    ref_norms: list, keep_reference: bool) -> tuple[list[int], list[str], list[str]]:
    """Rebind, in place, every parameter the model now holds under a known name but as another
    tensor (`model.fc = nn.Linear(...)`). A tensor of another shape or dtype has no reference:
    its drift counts from its first value. Returns (rebound indices, new names, gone names)."""
    current = {normalise_name(n): p for n, p in unwrap(model).named_parameters()}
    rebound = []
    for i, info in enumerate(model_map.params):
        p = current.get(info.name)
        if p is None or p is params[i]:
            continue
        del index_of[id(params[i])]
        params[i] = p
        index_of[id(p)] = i
        dtype = str(p.dtype).removeprefix("torch.")
        if list(p.shape) != info.shape or dtype != info.dtype:
            info.shape, info.numel, info.dtype = list(p.shape), p.numel(), dtype
            refs[i] = p.detach().clone() if keep_reference else None
            ref_norms[i] = float(p.detach().double().norm()) if keep_reference else None
        rebound.append(i)
    known = {n for info in model_map.params for n in [info.name, *info.aliases]}
    return rebound, sorted(set(current) - known), sorted(known - set(current))
