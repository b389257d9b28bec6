"""Shared set-up of the fastai tests: synthetic image data, learners, and the ground truth each test
takes itself (state dicts before and after every fit, requires_grad at its start, the steps fastai
applied or cancelled with the lr of every group, the forward passes of the root module)."""

from __future__ import annotations

import contextlib
import functools
import gc
from dataclasses import dataclass, field

import torch
from fastai.vision.all import (CrossEntropyLossFlat, DataLoaders, Learner, ProgressCallback, TensorCategory,
                               TensorImage, noop, resnet34, set_seed, vision_learner)
from fastai.callback.core import Callback

IMG = 64  # pixels


@contextlib.contextmanager
def one_thread():
    """CPU tests share 2 cores with other test processes: two intra-op threads per process
    oversubscribe them (a resnet34 fit ran 10x slower); one keeps every fit quick."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_WATCHING: list = []


def watching(run_dir, **options):
    """A FreezeFrame callback that `collect()` closes after the test. A recorder left open keeps
    its model alive (torch does not let the garbage collector see a tensor's hooks), and a fastai
    Learner has no event to close it on: without this, resnet34 copies pile up test after test."""
    from freezeframe.fastai import FreezeFrame

    cb = FreezeFrame(run_dir, **options)
    _WATCHING.append(cb)
    return cb


def collect():
    """Close the callbacks `watching` made, then collect the Learner / model cycles."""
    while _WATCHING:
        _WATCHING.pop().close()
    gc.collect()


def image_dls(n_train: int, n_valid: int = 4, bs: int = 4, size: int = IMG, n_cls: int = 3, seed: int = 0):
    """Random 3-channel images and labels: `n_train // bs` training batches, no shuffling surprises."""
    g = torch.Generator().manual_seed(seed)

    def items(n):
        return [(TensorImage(torch.randn(3, size, size, generator=g)),
                 TensorCategory(int(torch.randint(0, n_cls, (1,), generator=g)))) for _ in range(n)]

    dls = DataLoaders.from_dsets(items(n_train), items(n_valid), bs=bs, device="cpu", num_workers=0)
    dls.c = n_cls
    return dls


def quiet(learn):
    """No progress bars or logging tables in the test output."""
    if hasattr(learn, "progress"):
        learn.remove_cb(ProgressCallback)
    learn.logger = noop
    return learn


def resnet_learner(path, *, arch=resnet34, n_train: int = 8, bs: int = 4, seed: int = 0, cbs=(), **kwargs):
    set_seed(seed)  # python, numpy and torch: fastai's DataLoader shuffles with python's random
    learn = vision_learner(image_dls(n_train, bs=bs, seed=seed), arch, pretrained=False,
                           loss_func=CrossEntropyLossFlat(), path=path, cbs=list(cbs), **kwargs)
    return quiet(learn)


class Truth(Callback):
    """Ground truth per training fit, seen after every other callback: the state at its start
    (first before_train) and its end (after_fit), requires_grad at its start, the steps fastai
    applied (with the lr of every group at each) and those it cancelled."""

    order = 101

    def __init__(self):
        self.parts: list[Fit] = []
        self._open: list = []   # one entry per fit event pair (validate() may run inside a fit)
        self._cancel = False

    def before_fit(self):
        self._open.append(None)

    def before_train(self):
        if self._open and self._open[-1] is None:
            self._open[-1] = Fit(before=snapshot(self.learn.model),
                                 trainable={n: p.requires_grad for n, p in self.learn.model.named_parameters()})

    def after_cancel_step(self):
        self._cancel = True

    def after_step(self):
        fit = self._open[-1]
        if self._cancel:
            fit.skipped += 1
        else:
            fit.lrs.append([float(h["lr"]) for h in self.learn.opt.hypers])
            fit.moms.append([float(h["mom"]) for h in self.learn.opt.hypers])
            fit.losses.append(float(self.learn.loss.detach()))
        self._cancel = False

    def after_fit(self):
        fit = self._open.pop() if self._open else None
        if fit is not None:
            fit.after = snapshot(self.learn.model)
            self.parts.append(fit)


@contextlib.contextmanager
def forward_counter(model):
    """Forward passes of the root module, by train / eval mode."""
    counts = {"train": 0, "eval": 0}

    def hook(module, args):
        counts["train" if module.training else "eval"] += 1

    handle = model.register_forward_pre_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter and floating-point buffer, copied."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise, by comparing raw bytes (torch.equal on the values is not: NaN != NaN, -0 == +0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    return not torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


@dataclass
class Fit:
    """Ground truth of one fit (or of one fit method's call, with its fits as `parts`)."""

    before: dict
    after: dict = field(default_factory=dict)
    trainable: dict = field(default_factory=dict)   # requires_grad at the fit's start
    lrs: list = field(default_factory=list)     # per applied step: the lr of every group
    moms: list = field(default_factory=list)    # per applied step: the momentum of every group
    losses: list = field(default_factory=list)  # per applied step: learn.loss
    skipped: int = 0
    forwards: dict = field(default_factory=dict)
    parts: list = field(default_factory=list)

    @functools.cached_property
    def changed(self) -> dict[str, bool]:
        """Per tensor name: do its bytes differ between `before` and `after`? (read once both are set)"""
        return {k: differs(self.before[k], self.after[k]) for k in self.before}

    @property
    def steps(self) -> int:
        return len(self.lrs)


def run_fit(learn, call) -> Fit:
    """Run `call()` (one fit method: fit_one_cycle, fine_tune, lr_find, ...) and take the ground
    truth around it; `parts` holds one Fit per training fit it made."""
    truth = next((cb for cb in learn.cbs if isinstance(cb, Truth)), None)
    if truth is None:
        truth = Truth()
        learn.add_cb(truth)
    truth.parts = []
    before = snapshot(learn.model)
    trainable = {n: p.requires_grad for n, p in learn.model.named_parameters()}
    with forward_counter(learn.model) as counts:
        call()
    parts = list(truth.parts)
    if len(parts) == 1 and not any(differs(before[k], parts[0].before[k]) for k in before):
        fit = parts[0]  # one fit: the same truth (no second copy of the model)
        fit.parts = [fit]
        fit.forwards = dict(counts)
        return fit
    fit = Fit(before=before, after=snapshot(learn.model), trainable=trainable, forwards=dict(counts), parts=parts)
    fit.lrs = [lr for part in fit.parts for lr in part.lrs]
    fit.moms = [m for part in fit.parts for m in part.moms]
    fit.losses = [x for part in fit.parts for x in part.losses]
    fit.skipped = sum(part.skipped for part in fit.parts)
    return fit


def module_types(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules()}


def owner(name: str) -> str:
    return name.rpartition(".")[0]


def stage_params(summary: dict, k: int) -> dict[str, dict]:
    return {p["name"]: p["stages"][k] for p in summary["params"]}


def stage_buffers(summary: dict, k: int) -> dict[str, dict]:
    return {b["name"]: b["stages"][k] for b in summary["buffers"]}


def mismatches_with_truth(summary: dict, k: int, fit: Fit) -> list[str]:
    """Every parameter's `trainable` and `changed`, and every buffer's `changed`, in stage k
    against the ground truth of the fit that formed it."""
    bad = []
    params, buffers = stage_params(summary, k), stage_buffers(summary, k)
    changed = fit.changed
    for name, entry in params.items():
        if entry["trainable"] != fit.trainable[name]:
            bad.append(f"{name}: trainable {entry['trainable']}, requires_grad was {fit.trainable[name]}")
        if entry["changed"] != changed[name]:
            bad.append(f"{name}: changed {entry['changed']}, state dicts say {changed[name]}")
    for name, entry in buffers.items():
        if entry["changed"] != changed[name]:
            bad.append(f"buffer {name}: changed {entry['changed']}, state dicts say {changed[name]}")
    missing = set(changed) - set(params) - set(buffers)
    if missing:
        bad.append(f"not in the summary: {sorted(missing)}")
    return bad


def summary_rows(text: str) -> list[list[str]]:
    """The layer rows `learn.summary()` prints: [type] or [type, params, trainable]."""
    lines = str(text).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Layer (type)")) + 2
    rows = []
    for line in lines[start:]:
        if line.startswith("Total params"):
            break
        if not line.strip() or line.startswith(" ") or set(line.strip()) <= {"_", "="}:
            continue  # output-shape lines and separators
        rows.append(line.split())
    return rows


def custom_learner(path, *, seed: int = 0, n_train: int = 16, bs: int = 4, cbs=(), **kwargs):
    """A Learner on a small custom model (tests/models.py BodyHead) with its own 3-group splitter."""
    from models import BodyHead

    set_seed(seed)
    model = BodyHead()
    g = torch.Generator().manual_seed(seed)

    def items(n):
        return [(torch.randn(3, 6, 6, generator=g), TensorCategory(int(torch.randint(0, 3, (1,), generator=g))))
                for _ in range(n)]

    dls = DataLoaders.from_dsets(items(n_train), items(4), bs=bs, device="cpu", num_workers=0)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), splitter=lambda m: m.layer_groups(),
                    path=path, cbs=list(cbs), **kwargs)
    return quiet(learn)
