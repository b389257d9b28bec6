"""freezeframe never breaks or changes the training it watches: an internal error is one warning
and training goes on bit for bit; watching a model with dropout changes no value; bad input is a
clear error before anything is written; every hook is removed."""

from __future__ import annotations

import sys
import types
import warnings
from contextlib import nullcontext

import pytest
import torch
from torch import nn

import freezeframe
import freezeframe.capture.metrics as ff_metrics
import freezeframe.store.writer as ff_writer
import oracle
from models import DropoutMLP, SmallCNN, batch, build, loss_of, train


def dropout_training(run_dir=None, *, every=1, inject=None, flush_seconds=0.0):
    """Two stages of an MLP with dropout (the global RNG is consumed every step), a gradient
    accumulation, an eval pass. Returns what the user sees: weights, gradients, losses, RNG."""
    model = build(DropoutMLP, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(11)
    losses = []
    watcher = (freezeframe.watch(model, opt, run_dir, every=every, flush_seconds=flush_seconds)
               if run_dir is not None else nullcontext())
    with watcher as rec:
        if inject is not None:
            inject()
        for phase, name in enumerate(["a", "b"]):
            with rec.stage(name) if rec is not None else nullcontext():
                if phase == 1:
                    model.net[0].requires_grad_(False)
                for s in range(4):
                    opt.zero_grad()
                    for k in range(2 if s == 1 else 1):
                        x, y = batch(model, 10 * (s + 4 * phase) + k)
                        loss = loss_of(model, x, y)
                        loss.backward()
                        losses.append(loss.detach().clone())
                    opt.step()
                    if rec is not None:
                        rec.log(loss=loss)
        model.eval()
        with torch.no_grad():
            losses.append(loss_of(model, *batch(model, 999)).detach().clone())
        model.train()
    return {"model": model, "opt": opt, "losses": losses, "rng": torch.get_rng_state()}


def assert_bitwise_same_training(a: dict, b: dict) -> None:
    pa, pb = dict(a["model"].named_parameters()), dict(b["model"].named_parameters())
    for n in pa:
        assert oracle.same_bytes(pa[n], pb[n]), f"{n} differs"
        ga, gb = pa[n].grad, pb[n].grad
        assert (ga is None) == (gb is None) and (ga is None or oracle.same_bytes(ga, gb)), f"{n}.grad differs"
    assert len(a["losses"]) == len(b["losses"])
    for k, (la, lb) in enumerate(zip(a["losses"], b["losses"])):
        assert oracle.same_bytes(la, lb), f"loss {k} differs"
    assert torch.equal(a["rng"], b["rng"]), "the global RNG was used differently"


def assert_no_hooks_left(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks and not m._backward_hooks, type(m).__name__
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for n, p in model.named_parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None), n


@pytest.mark.parametrize("every", [1, None])
def test_watching_a_model_with_dropout_changes_nothing(run_dir, every):
    plain = dropout_training()
    watched = dropout_training(run_dir, every=every)
    assert_bitwise_same_training(plain, watched)
    assert_no_hooks_left(watched["model"], watched["opt"])
    summary = freezeframe.load(run_dir).summary()
    assert [s["name"] for s in summary["stages"]] == ["a", "b"] and summary["run"]["complete"] is True


def _fail_on_call(monkeypatch, owner, attr, n, exc):
    """An injector that makes `owner.attr` raise `exc` from its n-th call on. A module-level
    function is replaced where it is defined and wherever freezeframe re-exports it, so the
    fault fires whichever name the recorder calls it by."""
    real = getattr(owner, attr)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            raise exc
        return real(*args, **kwargs)

    targets = [owner]
    if isinstance(owner, types.ModuleType):
        home = sys.modules[real.__module__]
        targets = [m for name, m in list(sys.modules.items())
                   if name.startswith("freezeframe") and isinstance(m, types.ModuleType)
                   and getattr(m, attr, None) is real]
        assert home in targets

    def inject():
        for t in targets:
            monkeypatch.setattr(t, attr, failing)

    return inject, calls


INJECTIONS = {
    # a recorded step's metrics (the 6th norm computation: during the second step)
    "norms": (ff_metrics, "norms", 6, RuntimeError("injected: norms")),
    # hashing at a known stage end (calls 1-6 hash the first stage start; 7 is stage "a"'s end)
    "content_hash": (ff_metrics, "content_hash", 7, ValueError("injected: hash")),
    # W_before on a recorded step
    "snapshot": (ff_metrics, "snapshot", 3, MemoryError("injected: out of memory")),
    # the writer thread (its error surfaces at the next flush)
    "writer": (ff_writer.RunWriter, "_write_table", 1, OSError(28, "injected: No space left on device")),
}


@pytest.mark.parametrize("where", sorted(INJECTIONS))
def test_an_error_inside_the_recorder_is_one_warning_and_training_is_unchanged(run_dir, monkeypatch, where):
    owner, attr, n, exc = INJECTIONS[where]
    plain = dropout_training()
    inject, calls = _fail_on_call(monkeypatch, owner, attr, n, exc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = dropout_training(run_dir, inject=inject)
    monkeypatch.undo()
    assert calls["n"] >= n, f"the injected fault in {attr} never fired"
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert "freezeframe" in str(runtime[0].message)
    assert_bitwise_same_training(plain, watched)
    assert_no_hooks_left(watched["model"], watched["opt"])
    run = freezeframe.load(run_dir)  # what was written before the error still reads
    assert run.summary()["run"]["complete"] is False


def test_every_hook_is_removed_at_close(run_dir):
    model = build(SmallCNN)
    model.features.requires_grad_(False)   # hooks are also placed on tensors unfrozen later
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        train(model, opt, 2)
        model.features.requires_grad_(True)
        opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
        rec.track(opt2)
        train(model, opt2, 2, start=2)
    assert_no_hooks_left(model, opt)
    assert_no_hooks_left(model, opt2)
    assert not (run_dir / "writer.lock").exists()


class _NoParams(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("case", ["no-params", "model-as-optimizer", "unknown-option", "bad-mode", "bad-every"])
def test_bad_input_is_a_clear_error_before_anything_is_written(tmp_path, case):
    run_dir = tmp_path / "run"
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args, kwargs, words, errors = (model, opt, run_dir), {}, [], (freezeframe.FreezeFrameError,)
    if case == "no-params":
        args, words = (_NoParams(), opt, run_dir), ["no parameters", "_NoParams"]
    elif case == "model-as-optimizer":
        args, words = (model, model, run_dir), ["optimizer"]
    elif case == "unknown-option":
        kwargs, words = {"flush_secnds": 1.0}, ["flush_secnds"]
    elif case == "bad-mode":
        kwargs, words = {"mode": "replace"}, ["mode", "replace"]
    elif case == "bad-every":
        kwargs, words, errors = {"every": 0}, ["every", "0"], (freezeframe.FreezeFrameError, ValueError)
    with pytest.raises(errors) as e:
        freezeframe.watch(*args, **kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not run_dir.exists()
    assert_no_hooks_left(model, opt)
