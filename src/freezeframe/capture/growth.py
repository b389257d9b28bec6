"""Parameters that appear under new names after watching began (a module added to the model):
they join the model map at its end and are recorded from the next stage on, with stored
indices after the buffers (docs/run-format.md, "Tensor indices"; docs/recording.md)."""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from ..errors import FreezeFrameError
from .modelmap import ModelMap, ParamInfo, is_norm_module, normalise_name, unwrap
from .optim import build_layout
from .structure import rebind, scan


def add_params(model: torch.nn.Module, model_map: ModelMap, params: list, index_of: dict,
               new_names: list[str], from_stage: int) -> tuple[list[int], list[str]]:
    """Append each new name's tensor to the map (in place: `model_map.params`, `params`,
    `index_of`); a new name for a tensor already known is an alias of it. Returns (the new
    parameter indices, the names recorded: new tensors' and aliases')."""
    root = unwrap(model)
    current = {}
    for n, p in root.named_parameters(remove_duplicate=False):
        current.setdefault(normalise_name(n), p)
    modules = {normalise_name(n): m for n, m in root.named_modules(remove_duplicate=True)}
    known_modules = {m["name"] for m in model_map.modules}
    added, recorded = [], []
    for name in new_names:
        p = current.get(name)
        if p is None or p.device.type == "meta":
            continue
        i = index_of.get(id(p))
        if i is not None:  # a tied tensor under one more name
            model_map.params[i].aliases.append(name)
            recorded.append(name)
            continue
        mname = name.rpartition(".")[0]
        mod = modules.get(mname, root)
        if mname not in known_modules:
            model_map.modules.append({"name": mname, "type": type(mod).__name__, "is_norm": is_norm_module(mod)})
            known_modules.add(mname)
        model_map.params.append(ParamInfo(
            name=name, aliases=[], module=mname, module_type=type(mod).__name__, shape=list(p.shape),
            numel=p.numel(), dtype=str(p.dtype).removeprefix("torch."), is_norm=is_norm_module(mod),
            from_stage=from_stage))
        index_of[id(p)] = len(params)
        params.append(p)
        added.append(len(params) - 1)
        recorded.append(name)
    return added, recorded


def adopt_order(path, model_map: ModelMap, stored_model: dict) -> int:
    """An appended session of a run whose parameters grew: this model's parameters and buffers
    put in the stored run's order (its parameters must be the stored map's, as sets; its
    buffers must include the stored ones; buffers beyond them are not recorded, like buffers
    of modules added while recording). Keeps each added parameter's `from_stage`. Returns P0."""
    stored_params = stored_model["params"]
    p0 = stored_model.get("buffers_at", len(stored_params))
    place = {row["name"]: k for k, row in enumerate(stored_params)}
    order = sorted(range(len(model_map.params)), key=lambda i: place[model_map.params[i].name])
    model_map.params[:] = [model_map.params[i] for i in order]
    model_map.param_tensors[:] = [model_map.param_tensors[i] for i in order]
    for info, row in zip(model_map.params, stored_params):
        info.from_stage = row.get("from_stage")
    mine = {b.name: k for k, b in enumerate(model_map.buffers)}
    missing = [b["name"] for b in stored_model["buffers"] if b["name"] not in mine]
    if missing:
        raise FreezeFrameError(f"{str(path)!r} holds a run of a different model (buffer {missing[0]!r} is "
                               "missing from this model); use another run directory or mode='overwrite'")
    keep = [mine[b["name"]] for b in stored_model["buffers"]]
    model_map.buffers[:] = [model_map.buffers[k] for k in keep]
    model_map.buffer_tensors[:] = [model_map.buffer_tensors[k] for k in keep]
    model_map.buffers_at = p0
    return p0


class ModelChanges:
    """The Recorder's handling of a model whose tensor set changes while it records."""

    def _check_structure(self) -> None:
        """Has the model's tensor set changed (a tensor replaced under its name, names new or
        gone)? Then the current stage ends here (its end hashed with the tensors it trained), the
        replaced tensors are followed from now on, and the next applied step begins a stage
        whose `model_changes` say what changed (docs/recording.md)."""
        self._structure_checked = time.perf_counter()
        replaced, new, gone = scan(self.model, self.map, self._params)
        new = [n for n in new if n not in self._seen_new]
        gone = [n for n in gone if n not in self._seen_gone]
        if not (replaced or new or gone):
            return
        self.map.changed()  # the manifest's model lists are encoded anew (ModelMap.model_json)
        self._seen_new.update(new)
        self._seen_gone.update(gone)
        self._capture_end("next_stage")  # the old tensors' end, before they are let go
        rebound, reshaped = rebind(replaced, self.map, self._params, self._index_of)
        self._refs.reshaped(reshaped, self._step)
        names = [self._names[i] for i in rebound]
        grown = self._grow(new) if new else []
        if rebound or grown:
            self._hooked[rebound] = False
            for i in rebound:  # a new tensor holds a gradient only if a backward reached it since
                if self._params[i].grad is not None:
                    self._grad_flags[i] = 1
                    self._flags_set = True
            self._hook_new_trainable()
            self._req_flags = None
            self._layout = build_layout(self._views, self._index_of, self._P)
            self._count_idx = [np.union1d(m, self._layout.orphans) for m in self._layout.members]
        self._book.note_model_change(names, new, gone)
        warnings.warn(
            f"freezeframe: the model's tensors changed while recording {str(self.path)!r}"
            + (f"; replaced: {_few(names)} (followed as new tensors from the next step)" if names else "")
            + (f"; new: {_few(new)} ({'recorded from the next step' if grown else _NOT_GROWN})" if new else "")
            + (f"; gone: {_few(gone)} (their record ends)" if gone else "")
            + ". A new stage begins at the next step.", RuntimeWarning, stacklevel=4)

    def _grow(self, new: list[str]) -> list[str]:
        """Parameters under new names join the record (docs/recording.md): appended to the map
        and to every per-parameter array, W_ref their value now. Under torch.distributed ranks
        could see them at different times: they are not recorded there."""
        if self._dist.on:
            return []
        first = self._P
        added, recorded = add_params(self.model, self.map, self._params, self._index_of, new, len(self._stages))
        self._names[:] = self.map.names  # in place: the stage book holds this list
        if not added:
            return recorded
        self._P = len(self._params)
        tensors = self._params[first:]
        self._grad_flags = np.concatenate([self._grad_flags, [int(t.grad is not None) for t in tensors]]).astype(np.uint8)
        self._flags_set = bool(self._grad_flags.any())
        self._mask_keys = None  # the tensor count changed: the fast path's mask is built anew
        self._hooked = np.concatenate([self._hooked, np.zeros(len(tensors), dtype=bool)])
        self._note_unhooked()
        self._bounds.grow(first)
        hashes = self._bounds.baseline[first:self._P]  # their bytes now: the bytes their W_ref must have
        if self._reference_hashes is not None:
            self._reference_hashes += hashes  # stored order: added parameters come last
        self._refs.grow(first, hashes, self._step)  # W_ref now of those trainable, lazily of the others
        self.map.buffers_at = self._p0
        return recorded



_NOT_GROWN = "not recorded: under torch.distributed a run's parameters are those watching began with"


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
