"""The model's tensor set while recording: a tensor replaced under the same name
(`model.fc = nn.Linear(...)`) is followed from then on, as a new tensor (version counters
belong to tensor objects: a new tensor under an old name never continues the old one); names
that appear or disappear are reported by the caller (docs/recording.md)."""

from __future__ import annotations

import torch

from .modelmap import OPTIMIZER_ONLY, ModelMap, normalise_name, unwrap


def scan(model: torch.nn.Module, model_map: ModelMap, params: list) -> tuple[list[tuple[int, torch.Tensor]],
                                                                               list[str], list[str]]:
    """One walk of the model's parameters: ([(index, the tensor now under that name)] for every
    known name that holds another tensor object, new names, names gone), in model order."""
    current = {}
    for n, p in unwrap(model).named_parameters(remove_duplicate=False):
        current.setdefault(normalise_name(n), p)
    replaced = []
    known = set()
    for i, info in enumerate(model_map.params):
        if info.module == OPTIMIZER_ONLY:
            continue
        known.update([info.name, *info.aliases])
        p = current.get(info.name)
        if p is not None and p is not params[i]:
            replaced.append((i, p))
    gone = [info.name for info in model_map.params if info.module != OPTIMIZER_ONLY and info.name not in current]
    return replaced, [n for n in current if n not in known], gone


def rebind(replaced: list[tuple[int, torch.Tensor]], model_map: ModelMap, params: list,
           index_of: dict) -> tuple[list[int], list[int]]:
    """Rebind, in place, each replaced parameter. Returns (the rebound indices, those of another
    shape or dtype: their drift counts from their first value, see capture/reference.py)."""
    rebound, reshaped = [], []
    for i, p in replaced:
        info = model_map.params[i]
        index_of.pop(id(params[i]), None)
        params[i] = p
        index_of[id(p)] = i
        dtype = str(p.dtype).removeprefix("torch.")
        if list(p.shape) != info.shape or dtype != info.dtype:
            info.shape, info.numel, info.dtype = list(p.shape), p.numel(), dtype
            reshaped.append(i)
        rebound.append(i)
    return rebound, reshaped
