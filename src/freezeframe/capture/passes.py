"""Forward passes of the watched model: on the module itself, or on its direct children when the
module is never called itself (Lightning's `training_step` calling `self.forward(x)` or
`self.backbone(x)` bypasses the module's own hooks). See docs/recording.md, "Forward passes"."""

from __future__ import annotations

import torch
from torch import nn


class PassHooks:
    """Places the forward hooks that count passes and calls `on_pre(module, grad_enabled)` /
    `on_post()` once per pass.

    - The root module's hooks always count: one call of the model is one pass.
    - Until the root has been called with autograd on before an optimizer step, its
      direct children that own parameters are hooked too; a child called while the root is not
      running (and has not run with autograd on since the last step) is part of a pass that
      bypassed the root, and a pass is counted each time the *entry child* runs (the first child
      seen running outside the root). TorchScript children take no hooks and are skipped. Once the root is known to carry the training
      passes, the children's hooks are removed (a plain PyTorch loop pays for them on its first
      step only)."""

    def __init__(self, model: nn.Module, on_pre, on_post, wrap, post_needed: bool = True):
        self._on_pre, self._on_post = on_pre, on_post
        self._post_needed = post_needed  # on_post does work (buffers to follow); else the root's
        # post-hook only tracks the depth the children's hooks need, and goes with them
        self._depth = 0              # root forwards in progress
        self._root_graded = False    # the root ran with autograd on since the last step
        self._entry: nn.Module | None = None
        self.handles = [model.register_forward_pre_hook(wrap(self._root_pre)),
                        model.register_forward_hook(wrap(self._root_post))]
        self.child_handles = []
        for child in model.children():
            if next(child.parameters(), None) is None:
                continue  # a loss or metric module: data through it is not a pass of the network
            try:
                pre = child.register_forward_pre_hook(wrap(self._child_pre))
            except RuntimeError:  # a TorchScript submodule takes no hooks: the root's are enough
                continue
            self.child_handles.append(pre)
            self.child_handles.append(child.register_forward_hook(wrap(self._child_post)))

    def _root_pre(self, module, args):
        self._depth += 1
        if torch.is_grad_enabled():  # not a validation or sanity-check pass (no_grad)
            self._root_graded = True
        self._on_pre(module)

    def _root_post(self, module, args, output):
        self._depth = max(self._depth - 1, 0)
        self._on_post()

    def _child_pre(self, module, args):
        if self._depth or self._root_graded:
            return  # inside a call of the root, or after one this step: the root counts the passes
        if self._entry is None:
            self._entry = module
        self._on_pre(module, count=module is self._entry)

    def _child_post(self, module, args, output):
        if not self._depth and not self._root_graded:
            self._on_post()

    def after_step(self) -> None:
        """An optimizer step applied: if the root carried its training passes, the children's
        hooks are no longer needed."""
        self._depth = 0  # a forward that raised never ran its post-hook
        if self._root_graded:
            if self.child_handles:
                self.remove_children()
            if not self._post_needed and len(self.handles) == 2:
                self.handles.pop().remove()  # the root's forward post-hook
        self._root_graded = False

    def remove_children(self) -> None:
        for h in self.child_handles:
            h.remove()
        self.child_handles = []

    def remove(self) -> None:
        self.remove_children()
        for h in self.handles:
            h.remove()
        self.handles = []
