"""The forward order of the modules that own parameters, taken once per run by forward pre-hooks
during the first training forward before the first applied step, then removed (docs/run-format.md,
"model.forward_order")."""

from __future__ import annotations

import sys

import torch
from torch import nn

from .modelmap import normalise_name, unwrap

# the autograd graph task running now (-1: none, i.e. not inside a backward pass)
_graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)


class LayerOrder:
    """Forward pre-hooks on every module of the unwrapped model that owns parameters directly,
    noting each module's first call in a training pass: a pass (from one `pass_begins()` to the
    next) in which a hooked module runs with autograd on. Its calls under no_grad count too, at
    their place (a frozen backbone run under `torch.no_grad()` inside the training forward); a
    pass with autograd off throughout (a validation or sanity-check pass) does not count; a
    module called twice counts at its first call.

    `call(fn, *args)` runs each hook's work (the recorder passes its guard: an error there is one
    warning and the hooks go with every other). `known`: the order an earlier session of the
    run stored; it is kept and nothing is hooked. `order` is the manifest's value: null until
    the first applied step, then what the hooks saw, or null when they saw nothing (a compiled
    module whose graph runs without them) or could not see everything (a module that takes no
    hooks, a module first run inside a backward's recomputation)."""

    def __init__(self, model: nn.Module, call, known: list[str] | None = None):
        self.order: list[str] | None = list(known) if known is not None else None
        self.handles: list = []
        self._call = call
        self._seen: set[str] = set()
        self._found: list[str] = []
        self._pending: list[str] = []  # this pass's first calls under no_grad, before any with autograd on
        self._graded = False           # this pass has run a hooked module with autograd on
        self._spoilt = False
        self.done = known is not None
        if self.done:
            return
        for name, module in unwrap(model).named_modules(remove_duplicate=True):
            if next(module.parameters(recurse=False), None) is None:
                continue
            try:
                self.handles.append(module.register_forward_pre_hook(self._hook_for(normalise_name(name))))
            except RuntimeError:  # a TorchScript module takes no hooks: the order would miss it
                self.finish(keep=False)
                return

    def _hook_for(self, name: str):
        def pre(module, args):  # on every call of the module until the first applied step: kept small
            if not self.done and name not in self._seen:
                self._call(self._note, name)
        dynamo = sys.modules.get("torch._dynamo")  # imported: torch.compile is in use (never imported here)
        if dynamo is not None:
            pre = dynamo.disable(pre)  # run outside the compiled graph: no recompilation per module
        return pre

    def pass_begins(self) -> None:
        """A forward pass of the model begins (the recorder's pass counter, capture/passes.py)."""
        if not self.done:
            self._pending, self._graded = [], False

    def _note(self, name: str) -> None:
        if not torch.is_grad_enabled():
            if self._graded:
                self._add(name)  # under no_grad inside a training pass: it ran there
            elif name not in self._pending:
                self._pending.append(name)  # counts if this pass turns out to be a training pass
            return
        if _graph_task() != -1 and name not in self._pending:
            # first run inside a backward (a recomputed checkpoint segment) and not seen in the
            # forward: its place in the forward order is unknown, so no order is stated
            self._spoilt = True
        self._graded = True
        for n in self._pending:  # this pass's earlier calls under no_grad, in their order
            self._add(n)
        self._pending = []
        self._add(name)

    def _add(self, name: str) -> None:
        if name not in self._seen:
            self._seen.add(name)
            self._found.append(name)

    def after_step(self) -> None:
        """An optimizer step applied: the first one ends the observation."""
        if not self.done:
            self.finish(keep=True)

    def finish(self, keep: bool) -> None:
        self.done = True
        if keep and self._found and not self._spoilt:
            self.order = list(self._found)
        self.remove()

    def remove(self) -> None:
        self.done = True  # a compiled graph may still call a removed hook: it then does nothing
        for h in self.handles:
            h.remove()
        self.handles = []
