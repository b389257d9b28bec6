"""What the benchmark attaches to the watched model B: freezeframe, the hand-written "floor", and
(in peers.py) the tools people use today. Each `attach(model, optimizer, workdir)` returns an
`Attached`; a peer that cannot run here raises `PeerUnavailable` and its row is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import freezeframe


class PeerUnavailable(RuntimeError):
    """A peer instrument cannot be measured here (not installed, refuses this torch, ...)."""


def _one() -> int:
    return 1


@dataclass
class Attached:
    """What an instrument attached to model B exposes to the benchmark."""

    drain: Callable[[], None]                     # wait until its background work is done
    close: Callable[[], None]
    every: Callable[[], int | None] = _one        # the recording period in force (None: still calibrating)
    analytic_bytes: dict = field(default_factory=dict)  # {"reference": n, "temporary": n}
    run_dir: Path | None = None                   # freezeframe's run directory, for the bytes-written figures
    info: Callable[[], dict] = dict               # anything else worth reporting
    # Peers only (freezeframe and the floor leave these unset):
    after_step: Callable[[torch.Tensor], None] | None = None   # called with the loss after each of B's
    #                                                             steps, inside B's timed region
    due: Callable[[], int] | None = None          # B's steps until its next recorded step (0: the next one)
    helper_cpu: Callable[[], float] | None = None  # cumulative CPU seconds of helper processes it started
    helper_rss: Callable[[], int] | None = None    # their resident memory, bytes
    written: Callable[[], dict] | None = None      # bytes written, read after close (instead of run_dir)


@dataclass
class Instrument:
    """A row of the overhead benchmark: what is attached to model B, and how its rows are shown."""

    name: str                # the row's name
    attach: Callable[[nn.Module, torch.optim.Optimizer, Path], Attached]
    family: str              # the column of the side-by-side table (overhead_tables.FAMILIES)
    peer: bool = False       # a peer: its rows are skipped (with the reason) when it cannot run


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- freezeframe
def attach_freezeframe(every: int | None):
    def attach(model: nn.Module, opt: torch.optim.Optimizer, workdir: Path) -> Attached:
        run_dir = workdir / "run"
        rec = freezeframe.watch(model, opt, run_dir, every=every, mode="new")
        trainable = [p for p in model.parameters() if p.requires_grad]
        return Attached(
            drain=rec._writer.drain, close=rec.close, every=lambda: rec.every, run_dir=run_dir,
            analytic_bytes={"reference": tensor_bytes(list(model.parameters()) + list(model.buffers())),
                            "temporary": tensor_bytes(trainable)},
            info=lambda: {"calibration": rec.sampler.measured},
        )
    return attach


# --------------------------------------------------------------------------- the floor
class _Floor:
    """The least a per-step metric needs: snapshot the parameters before the step (a clone), after
    it the norms of the gradients, of (after - before) and of (after - reference), one host sync."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer):
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            self.ref = [p.detach().clone() for p in self.params]
        self.rows: list[np.ndarray] = []
        self.before: list[torch.Tensor] | None = None
        self.handles = [opt.register_step_pre_hook(self.pre), opt.register_step_post_hook(self.post)]

    @torch.no_grad()
    def pre(self, opt, args, kwargs) -> None:
        self.before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def post(self, opt, args, kwargs) -> None:
        params = [p.detach() for p in self.params]
        grads = torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
        torch._foreach_sub_(self.before, params)              # before := before - after
        updates = torch._foreach_norm(self.before)
        drift = torch._foreach_norm(torch._foreach_sub(params, self.ref))
        self.before = None
        self.rows.append(torch.stack(list(grads) + list(updates) + list(drift)).cpu().numpy())  # the one sync

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def attach_floor(model: nn.Module, opt: torch.optim.Optimizer, workdir: Path) -> Attached:
    f = _Floor(model, opt)
    return Attached(drain=lambda: None, close=f.close,
                    analytic_bytes={"reference": tensor_bytes(f.params), "temporary": tensor_bytes(f.params)})
