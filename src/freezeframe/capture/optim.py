"""Optimizer views: param-group membership and per-group hyperparameters, read the same way for any framework."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FreezeFrameError


def _num(v) -> float | None:
    if type(v) is float or v is None:  # the usual hyperparameter, read on every step
        return v
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = v.item()  # a sync point, only for tensor-valued hyperparameters (capturable optimizers)
    if isinstance(v, (tuple, list)):
        v = v[0] if v else None
        return _num(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f


class OptimizerView:
    """What the recorder reads from one optimizer. Integrations for optimizers that are not
    `torch.optim.Optimizer` (fastai's) subclass this and hand the framework's facts as data."""

    #: torch.optim.Optimizer to hook, or None when an integration calls the recorder itself
    hookable = None

    def groups(self) -> list[tuple[str | None, list[torch.Tensor]]]:
        """(own name or None, params) for each param group, in order."""
        raise NotImplementedError

    def membership_key(self) -> tuple:
        """Cheap value that changes whenever group membership may have changed."""
        raise NotImplementedError

    def hypers(self) -> list[tuple[float | None, float | None, float | None, float | None]]:
        """(lr, momentum, weight_decay, nominal lr peak) per group, as applied by the next step."""
        raise NotImplementedError

    def state_count(self) -> int | None:
        """How many tensors hold optimizer state (momentum buffers...), None if unknown."""
        return None

    def nominal_floors(self) -> list[float | None]:
        """Per group, the lowest lr of the schedule that states the nominal peak, when the peak
        may be a leftover of an earlier schedule (torch's OneCycleLR leaves `max_lr` in the
        group when it is done); None where the framework's peak is always current."""
        return [None] * len(self.groups())


def unwrap_optimizer(opt):
    """The torch optimizer inside Accelerate's AcceleratedOptimizer / Lightning's LightningOptimizer
    (their own step() calls the inner optimizer's, where the step hooks fire)."""
    for _ in range(4):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            inner = getattr(opt, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
            opt = inner
        else:
            break
    return opt


class TorchOptimizerView(OptimizerView):
    def __init__(self, opt: torch.optim.Optimizer):
        opt = unwrap_optimizer(opt)
        if not isinstance(opt, torch.optim.Optimizer):
            raise FreezeFrameError(
                f"expected a torch.optim.Optimizer, got {type(opt).__name__}"
                + (" (pass the optimizer, not the model)" if isinstance(opt, torch.nn.Module) else "")
            )
        self.opt = opt
        self.hookable = opt

    def groups(self):
        return [(g.get("name") if isinstance(g.get("name"), str) else None, list(g["params"]))
                for g in self.opt.param_groups]

    def membership_key(self) -> tuple:
        return tuple((id(g["params"]), len(g["params"])) for g in self.opt.param_groups)

    def state_count(self) -> int:
        return sum(1 for st in self.opt.state.values() if st)

    def nominal_floors(self):
        return [min(_num(g.get("initial_lr")) or math.inf, _num(g.get("min_lr")) or math.inf)
                if "max_lr" in g else None for g in self.opt.param_groups]

    def hypers(self):
        out = []
        for g in self.opt.param_groups:
            mom = g.get("momentum")
            if mom is None and "betas" in g:
                mom = g["betas"]
            # OneCycleLR writes the peak it was built for into each group as `max_lr`
            out.append((_num(g.get("lr")), _num(mom), _num(g.get("weight_decay")), _num(g.get("max_lr"))))
        return out


def as_view(opt) -> OptimizerView:
    return opt if isinstance(opt, OptimizerView) else TorchOptimizerView(opt)


@dataclass
class GroupLayout:
    """Param-group membership across all watched optimizers, as param indices."""

    groups: list[dict]            # index, optimizer, name, params (param indices)
    param_group: np.ndarray       # param index -> global group index, -1 when in no group
    members: list[np.ndarray]     # per optimizer: param indices its groups hold
    orphans: np.ndarray           # param indices no watched optimizer holds
    key: tuple                    # membership keys of all optimizers

    def signature(self) -> tuple:
        return tuple((g["optimizer"], tuple(g["params"])) for g in self.groups)


def build_layout(views: list[OptimizerView], index_of: dict[int, int], n_params: int) -> GroupLayout:
    groups = []
    param_group = np.full(n_params, -1, dtype=np.int64)
    members = []
    several = len(views) > 1
    for j, view in enumerate(views):
        held = []
        for i, (own_name, params) in enumerate(view.groups()):
            idx = [index_of[id(p)] for p in params if id(p) in index_of]
            name = own_name or (f"opt{j}.pg{i}" if several else f"pg{i}")
            gi = len(groups)
            groups.append({"index": gi, "optimizer": j, "name": name, "params": idx})
            for k in idx:
                if param_group[k] < 0:
                    param_group[k] = gi
            held.extend(idx)
        members.append(np.unique(np.asarray(held, dtype=np.int64)))
    orphans = np.flatnonzero(param_group < 0)
    return GroupLayout(groups=groups, param_group=param_group, members=members, orphans=orphans,
                       key=tuple(v.membership_key() for v in views))


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
