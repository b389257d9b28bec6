"""The step path (docs/recording.md, "The step path"): what the recorder does on a step it does not
record is cheap and still exact. Stages still split when a tensor is frozen or unfrozen between
two steps, gradient counts still match a count kept by hand, an error in the gradient marks is
one warning, hooks go at close() and with a recorder nobody closed, and an unrecorded step runs
no Python line per tensor."""

from __future__ import annotations

import gc
import json
import sys
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

import freezeframe

PACKAGE_DIR = str(Path(freezeframe.__file__).parent)


def chain(n_layers: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_layers)])


def step(model, opt, x, micro: int = 1) -> None:
    opt.zero_grad()
    for _ in range(micro):
        model(x).pow(2).mean().backward()
    opt.step()


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def grads_bits(run_dir: Path, n_params: int) -> list[list[int]]:
    """Per step (in step order), the stored `grads` bits unpacked to 0/1 per parameter."""
    rows = []
    for f in sorted((run_dir / "steps").glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    rows.sort(key=lambda r: r["step"])
    return [np.unpackbits(np.frombuffer(r["grads"], dtype=np.uint8))[:n_params].tolist() for r in rows]


def test_freezing_and_unfreezing_between_two_steps_starts_new_stages(run_dir):
    """No forward pass sits between the change and the step that sees it: the step itself must
    notice (the trainable set is read at every step, cached or not)."""
    model = chain(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 4)
    with freezeframe.watch(model, opt, run_dir, every=10**9) as rec:
        for _ in range(3):
            step(model, opt, x)
        model[0].requires_grad_(False)  # between the step and the next forward
        for _ in range(4):
            step(model, opt, x)
        model[0].requires_grad_(True)
        for _ in range(2):
            step(model, opt, x)
        # frozen after the backward, before the step: that step's trainable set is the new one
        opt.zero_grad()
        model(x).sum().backward()
        model[1].requires_grad_(False)
        opt.step()
    stages = manifest(run_dir)["stages"]
    assert [s["trainable"] for s in stages] == [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 1, 4, 5]]
    assert [s["steps"] for s in stages] == [3, 4, 2, 1]
    # unfrozen tensors got their hook back: their gradients count in the stage after unfreezing
    assert stages[2]["grad_steps"] == [2] * 6
    assert stages[1]["grad_steps"] == [0, 0, 4, 4, 4, 4]
    assert stages[3]["grad_steps"] == [1] * 6  # the gradient was accumulated before the freeze


def test_grad_steps_match_a_count_by_hand(run_dir):
    """Gradients into some tensors on some steps only (a branch of the model skipped, grads kept
    as zeros or set to None, two micro-batches): the stored per-step bits and each stage's
    grad_steps equal a count kept by the test."""
    model = chain(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 4)
    expected_bits = []
    with freezeframe.watch(model, opt, run_dir, every=10**9):
        for k in range(9):
            opt.zero_grad(set_to_none=k % 2 == 0)
            if k % 3 == 0:  # only the last layer takes part
                model[2](x).sum().backward()
                expected_bits.append([0, 0, 0, 0, 1, 1])
            elif k % 3 == 1:  # two micro-batches: still one gradient step per tensor
                model(x).sum().backward()
                model(x).sum().backward()
                expected_bits.append([1] * 6)
            else:  # the first layer's bias left out of the graph
                h = x @ model[0].weight.T
                model[2](model[1](h)).sum().backward()
                expected_bits.append([1, 0, 1, 1, 1, 1])
            opt.step()
    assert grads_bits(run_dir, 6) == expected_bits
    (stage,) = manifest(run_dir)["stages"]
    assert stage["grad_steps"] == np.sum(expected_bits, axis=0).tolist()


def test_an_error_taking_the_gradient_marks_is_one_warning_and_training_goes_on(run_dir):
    """The gradient hooks only mark (a C call); what they marked is taken at the step. A fault
    there is the recorder's error: one warning, recording stops, the training is unchanged."""
    def train(watch: bool):
        model = chain(2, seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
        rec = freezeframe.watch(model, opt, run_dir, every=2) if watch else None
        for k in range(6):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if rec is not None and k == 3:
                rec._got[10**6] = None  # a mark no tensor has: taking it fails
            opt.step()
        if rec is not None:
            rec.close()
        return model
    plain = train(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = train(True)
    ours = [w for w in caught if "freezeframe" in str(w.message)]
    assert len(ours) == 1 and "stopped recording" in str(ours[0].message), [str(w.message) for w in ours]
    for (n, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), n
    for p in watched.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    assert manifest(run_dir)["steps_total"] == 3  # the steps before the fault are kept


def test_close_removes_every_hook_and_drops_the_marked_tensors(run_dir):
    model = chain(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 4)
    rec = freezeframe.watch(model, opt, run_dir, every=1)
    step(model, opt, x)
    model(x).sum().backward()  # marks taken by no step
    assert rec._got
    rec.close()
    assert not rec._got
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)


def test_a_recorder_nobody_closed_is_collected_and_keeps_nothing_alive(run_dir):
    """A backward after the last step leaves marks that hold tensors: a recorder dropped then
    is still collected, and so are the model and its tensors once the user drops them."""
    model = chain(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 4)
    rec = freezeframe.watch(model, opt, run_dir, every=1)
    step(model, opt, x)
    model(x).sum().backward()
    assert rec._got
    rec_ref = weakref.ref(rec)
    del rec
    gc.collect()
    assert rec_ref() is None, "the recorder is kept alive"
    for p in model.parameters():  # the recorder's hooks went with it
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    step(model, opt, x)  # training goes on without it
    refs = [weakref.ref(model)] + [weakref.ref(p) for p in model.parameters()]
    del model, opt, p
    gc.collect()
    assert all(r() is None for r in refs), "the model or a tensor is kept alive"


def _lines_in_one_unrecorded_step(n_layers: int, run_dir: Path) -> int:
    """Python lines of the freezeframe package run by one unrecorded training step (a forward
    with its hooks, a backward with the gradient hooks, the optimizer step with its hooks)."""
    model = chain(n_layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(2, 4)
    count = [0]

    def tracer(frame, event, arg):
        if frame.f_code.co_filename.startswith(PACKAGE_DIR):
            if event in ("call", "line"):
                count[0] += 1
            return tracer
        return None

    with freezeframe.watch(model, opt, run_dir, every=10**9, flush_seconds=10**6) as rec:
        for _ in range(3):
            step(model, opt, x)
        rec._structure_checked = time.perf_counter()  # no periodic walk of the model in the step
        sys.settrace(tracer)
        try:
            step(model, opt, x)
        finally:
            sys.settrace(None)
        assert rec.steps == 4 and len(rec._stages) == 1
    return count[0]


def test_an_unrecorded_step_runs_no_python_line_per_tensor(tmp_path):
    """Counted, not timed: the lines freezeframe runs on an unrecorded step are the same for 8
    and for 400 tensors (a per-tensor loop or a Python gradient hook would add lines per tensor)."""
    small = _lines_in_one_unrecorded_step(4, tmp_path / "small")
    large = _lines_in_one_unrecorded_step(200, tmp_path / "large")
    assert small > 0
    assert large == small, (small, large)


def test_repeated_gradient_patterns_and_a_replaced_tensor_keep_exact_bits(run_dir):
    """The step reuses the previous step's gradient mask when the same tensors got gradients
    (docs/recording.md, "The step path"): runs of equal patterns, a change back and forth, and a
    tensor replaced under its name (its gradient, present before the step, marked without a
    hook) still give the bits and grad_steps a count by hand gives. The manifest, whose model
    lists are encoded once and again after the change, is what `json.dumps` writes for it."""
    model = chain(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 4)
    last_only, all_six = [0, 0, 0, 0, 1, 1], [1] * 6
    expected_bits = []
    with freezeframe.watch(model, opt, run_dir, every=10**9):
        for pattern in [all_six] * 3 + [last_only] * 3 + [all_six] * 2 + [last_only]:
            opt.zero_grad()
            (model(x) if pattern is all_six else model[2](x)).sum().backward()
            expected_bits.append(pattern)
            opt.step()
        first_bits = len(expected_bits)
        # the last layer's weight replaced under its name between two steps, and handed to the
        # optimizer in a new list (the step sees the group change and looks at the model)
        model[2].weight = nn.Parameter(model[2].weight.detach().clone())
        opt.param_groups[0]["params"] = list(model.parameters())
        for pattern in [all_six] * 3:
            opt.zero_grad()
            model(x).sum().backward()
            expected_bits.append(pattern)
            opt.step()
    assert grads_bits(run_dir, 6) == expected_bits
    stages = manifest(run_dir)["stages"]
    assert [s["steps"] for s in stages] == [first_bits, 3]
    assert stages[0]["grad_steps"] == np.sum(expected_bits[:first_bits], axis=0).tolist()
    assert stages[1]["grad_steps"] == [3] * 6
    text = (run_dir / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text))
    assert stages[1]["model_changes"]["replaced"] == ["2.weight"]
