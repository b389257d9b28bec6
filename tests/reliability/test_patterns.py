"""Training patterns, each recorded correctly against ground truth taken by the test itself:
gradient accumulation, AMP steps skipped by a GradScaler, zero_grad(set_to_none=False), tied and
shared weights, a param group added mid-run, optimizers re-created between stages, a replaced head,
a torch.compile'd model, nothing trainable, zero-size tensors, integer buffers, a meta model.

Complements tests/test_core_stages.py and test_core_metrics.py (which cover one tied embedding,
a membership change without unfreezing, one re-created optimizer, grad_steps with one doubled
backward): here each pattern in the form users write it, checked value by value.
"""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freezeframe
import oracle
from models import Branchy, batch, build, loss_of


def _summary(run_dir) -> dict:
    run = freezeframe.load(run_dir)
    summary = run.summary()
    oracle.check_summary_schema(oracle.strict_json(json.dumps(summary, allow_nan=False)))
    return summary


def _param(summary: dict, name: str) -> dict:
    return next(p for p in summary["params"] if p["name"] == name)


def _col(summary: dict, name: str, key: str) -> list:
    return [e[key] for e in _param(summary, name)["stages"]]


def _xy(step: int, n: int = 6, d: int = 4, classes: int = 3):
    g = torch.Generator().manual_seed(7000 + step)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


class MLP(nn.Module):
    def __init__(self, d=4, h=6, out=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.fc = nn.Linear(h, out)

    def forward(self, x):
        return self.fc(self.body(x))


# ------------------------------------------------------------------------ gradient accumulation


def test_gradient_accumulation_counts_steps_not_backward_passes(run_dir):
    """Four micro-batches per optimizer step; head_b is reached by the first micro-batch of even
    steps only. grad_steps counts steps in which a gradient arrived, the metrics are those of the
    accumulated gradient, and every forward pass is counted."""
    model = build(Branchy)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tape = oracle.Tape(model)
    n_steps, micro = 5, 4
    reached_b = 0
    with freezeframe.watch(model, opt, run_dir, every=1):
        for s in range(n_steps):
            opt.zero_grad()
            for k in range(micro):
                use_b = (s % 2 == 0 and k == 0)
                x, y = batch(model, 100 * s + k)
                (loss_of(model, x, y, use_b=use_b) / micro).backward()
            reached_b += s % 2 == 0
            tape.step(opt)
    run = freezeframe.load(run_dir)
    summary = _summary(run_dir)
    assert summary["run"]["steps"] == n_steps and run.steps().num_rows == n_steps
    (stage,) = summary["stages"]
    assert stage["steps"] == n_steps and stage["forward_passes"] == {"train": n_steps * micro, "eval": 0}
    for p in summary["params"]:
        want = reached_b if p["name"].startswith("head_b") else n_steps
        assert _col(summary, p["name"], "grad_steps") == [want], p["name"]
    assert oracle.compare_with_tape(run.tensors(), tape) == []


# ------------------------------------------------------------------------------------- AMP


def _amp_training(run_dir, *, with_scaler: bool, overflow_at: set[int]):
    """8 iterations in two explicit stages of four; an inf is injected into a gradient at the
    iterations in `overflow_at`, so the scaler skips those optimizer steps."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opts = {"scaler": scaler} if with_scaler else {}
    truth = []  # per iteration: skipped?, weights before, weights after
    with freezeframe.watch(model, opt, run_dir, every=1, **opts) as rec:
        for name, its in (("a", range(0, 4)), ("b", range(4, 8))):
            with rec.stage(name):
                for it in its:
                    x, y = _xy(it)
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = F.cross_entropy(model(x), y)
                    scaler.scale(loss).backward()
                    if it in overflow_at:
                        model.body[0].weight.grad[0, 0] = float("inf")
                    before = oracle.state(model)
                    scaler.step(opt)
                    scaler.update()
                    after = oracle.state(model)
                    truth.append((it in overflow_at, before, after))
    return model, truth


@pytest.mark.parametrize("with_scaler", [True, False], ids=["scaler", "no-scaler"])
def test_amp_steps_skipped_by_the_grad_scaler(run_dir, with_scaler):
    overflow_at = {0, 2, 4}  # the first iteration of the run, one mid-stage, the first of stage "b"
    model, truth = _amp_training(run_dir, with_scaler=with_scaler, overflow_at=overflow_at)
    # the test's own ground truth: a skipped iteration leaves every tensor's bytes as they were
    for skipped, before, after in truth:
        assert (oracle.differing(before, after) == set()) is skipped
    applied = [(b, a) for skipped, b, a in truth if not skipped]
    run = freezeframe.load(run_dir)
    summary = _summary(run_dir)
    assert summary["run"]["steps"] == len(applied) == 5
    assert run.steps().column("step").to_pylist() == list(range(5))  # skipped steps are not steps
    # stage "a": iterations 0-3, 0 and 2 skipped; stage "b": 4-7, 4 skipped
    assert [(s["name"], s["steps"]) for s in summary["stages"]] == [("a", 2), ("b", 3)]
    if with_scaler:
        assert summary["run"]["skipped_steps"] == 3
        assert [s["skipped_steps"] for s in summary["stages"]] == [2, 1]
    else:
        assert summary["run"]["skipped_steps"] is None
        assert [s["skipped_steps"] for s in summary["stages"]] == [None, None]
    # a skipped step's gradient was never applied: it is not a grad step, nor an update
    for p in summary["params"]:
        assert _col(summary, p["name"], "grad_steps") == [2, 3], p["name"]
    stored = oracle.stored_metrics(run.tensors())
    assert sorted(stored) == list(range(5))
    for step, (before, after) in enumerate(applied):
        for name in oracle.param_names(model):
            update = stored[step][name][1]
            assert oracle.isclose(update, oracle.dist(after[name], before[name])), (step, name)


# ----------------------------------------------------------------------- zero_grad(set_to_none=False)


def test_zero_grad_without_set_to_none_counts_only_gradients_that_arrived(run_dir):
    """Stale zero gradients stay in `.grad`: Adam still moves head_b on steps where backward never
    reached it (its moments), the metrics say so, and grad_steps does not count those steps."""
    model = build(Branchy)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tape = oracle.Tape(model)
    use_b = [True, False, False, True, False, False]
    with freezeframe.watch(model, opt, run_dir, every=1):
        for s, b in enumerate(use_b):
            opt.zero_grad(set_to_none=False)
            x, y = batch(model, s)
            loss_of(model, x, y, use_b=b).backward()
            tape.step(opt)
    run = freezeframe.load(run_dir)
    summary = _summary(run_dir)
    assert oracle.compare_with_tape(run.tensors(), tape) == []  # grad_norm 0.0 (not null) on stale steps
    assert _col(summary, "head_b.weight", "grad_steps") == [sum(use_b)]
    assert _col(summary, "head_a.weight", "grad_steps") == [len(use_b)]
    assert _col(summary, "head_b.weight", "changed") == [True]
    stale = [r["step"] for r in tape.steps if r["step"] < len(use_b) and not use_b[r["step"]]]
    rows = oracle.stored_metrics(run.tensors())
    for s in stale:
        grad, update, _, _ = rows[s]["head_b.weight"]
        assert grad == 0.0 and update > 0.0, (s, rows[s]["head_b.weight"])


# ----------------------------------------------------------------------- tied and shared weights


class Shared(nn.Module):
    """One Linear module applied twice (the same module under two names) and an output layer
    whose weight is tied to the input embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        block = nn.Linear(4, 4)
        self.blocks = nn.Sequential(block, nn.Tanh(), block)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(self.blocks(self.emb(idx)))


def test_tied_and_shared_weights_are_one_tensor_with_several_names(run_dir):
    torch.manual_seed(0)
    model = Shared()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=1):
        for s in range(3):
            g = torch.Generator().manual_seed(s)
            idx = torch.randint(0, 7, (3, 5), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(idx).reshape(-1, 7), torch.roll(idx, 1, 1).reshape(-1)).backward()
            tape.step(opt)
    run = freezeframe.load(run_dir)
    summary = _summary(run_dir)
    by_name = {p["name"]: p for p in summary["params"]}
    assert set(by_name) == {"emb.weight", "blocks.0.weight", "blocks.0.bias"}
    assert by_name["emb.weight"]["aliases"] == ["out.weight"]
    assert by_name["blocks.0.weight"]["aliases"] == ["blocks.2.weight"]
    assert by_name["blocks.0.bias"]["aliases"] == ["blocks.2.bias"]
    assert summary["run"]["tensors_total"] == 3
    assert summary["run"]["params_total"] == sum(p.numel() for p in model.parameters()) == 7 * 4 + 4 * 4 + 4
    for name in by_name:  # one gradient per step, however many uses
        assert _col(summary, name, "grad_steps") == [3], name
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    assert [m["name"] for m in summary["modules"]] == ["emb", "blocks.0"]


# ------------------------------------------------------------------ a param group added mid-run


def test_param_group_added_mid_run_as_backbone_finetuning_does(run_dir):
    """Lightning's BackboneFinetuning: the body starts frozen and outside the optimizer; at the
    unfreeze epoch it is unfrozen and added as a new param group with its own lr. Later a third
    group is added inside an explicit stage: that stage gets a second part."""
    torch.manual_seed(0)
    model = MLP()
    model.body.requires_grad_(False)
    opt = torch.optim.SGD(model.fc.parameters(), lr=1e-2, momentum=0.9)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        for s in range(3):
            x, y = _xy(s)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.body[2].requires_grad_(True)
        opt.add_param_group({"params": list(model.body[2].parameters()), "lr": 1e-4})
        with rec.stage("finetune"):
            for s in range(3, 8):
                if s == 6:
                    model.body[0].requires_grad_(True)
                    opt.add_param_group({"params": list(model.body[0].parameters()), "lr": 1e-5, "name": "early"})
                x, y = _xy(s)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    run = freezeframe.load(run_dir)
    summary = _summary(run_dir)
    assert [(s["name"], s["first_step"], s["steps"]) for s in summary["stages"]] == [
        ("stage 0", 0, 3), ("finetune", 3, 3), ("finetune (part 2)", 6, 2)]
    assert [[(g["name"], g["lr_max"], g["tensors"], g["params"]) for g in s["groups"]] for s in summary["stages"]] == [
        [("pg0", 1e-2, 2, 6 * 3 + 3)],
        [("pg0", 1e-2, 2, 21), ("pg1", 1e-4, 2, 6 * 6 + 6)],
        [("pg0", 1e-2, 2, 21), ("pg1", 1e-4, 2, 42), ("early", 1e-5, 2, 4 * 6 + 6)]]
    assert run.steps().column("lr").to_pylist() == [[1e-2]] * 3 + [[1e-2, 1e-4]] * 3 + [[1e-2, 1e-4, 1e-5]] * 2
    assert [s["params_trainable"] for s in summary["stages"]] == [21, 63, 93]
    assert _col(summary, "body.2.weight", "in_optimizer") == [False, True, True]
    assert _col(summary, "body.2.weight", "group") == [None, 1, 1]
    assert _col(summary, "body.2.weight", "changed") == [False, True, True]
    assert _col(summary, "body.2.weight", "grad_steps") == [0, 3, 2]
    assert _col(summary, "body.0.weight", "changed") == [False, False, True]
    assert [s["starts_from_previous_end"] for s in summary["stages"]] == [None, True, True]


# ------------------------------------------------------------ optimizers re-created between stages


def test_optimizers_recreated_between_stages_are_followed_with_track(run_dir):
    model = build(Branchy)
    opt1 = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt1, run_dir, every=1) as rec:
        with rec.stage("sgd"):
            for s in range(2):
                opt1.zero_grad()
                loss_of(model, *batch(model, s)).backward()
                tape.step(opt1, opt_index=0)
        opt2 = torch.optim.Adam(model.parameters(), lr=1e-3)
        with rec.stage("adam"):
            rec.track(opt2)
            rec.track(opt2)  # twice: still one set of hooks
            for s in range(2, 5):
                opt2.zero_grad()
                loss_of(model, *batch(model, s)).backward()
                tape.step(opt2, opt_index=1)
        opt3 = torch.optim.SGD([{"params": model.trunk.parameters(), "lr": 1e-3},
                                {"params": list(model.head_a.parameters()) + list(model.head_b.parameters())}],
                               lr=1e-2)
        rec.track(opt3)
        with rec.stage("sgd again"):
            for s in range(5, 7):
                opt3.zero_grad()
                loss_of(model, *batch(model, s)).backward()
                tape.step(opt3, opt_index=2)
        assert len(opt2._optimizer_step_pre_hooks) == 1 and len(opt2._optimizer_step_post_hooks) == 1
    run = freezeframe.load(run_dir)
    summary = _summary(run_dir)
    assert run.steps().column("optimizer").to_pylist() == [0, 0, 1, 1, 1, 2, 2]
    assert [(s["name"], s["steps"]) for s in summary["stages"]] == [("sgd", 2), ("adam", 3), ("sgd again", 2)]
    # only the optimizer that stepped in a stage has groups there (named "pg0" while it was the only one)
    assert [[g["name"] for g in s["groups"]] for s in summary["stages"]] == [
        ["pg0"], ["opt1.pg0"], ["opt2.pg0", "opt2.pg1"]]
    assert [[g["lr_max"] for g in s["groups"]] for s in summary["stages"]] == [[0.05], [1e-3], [1e-3, 1e-2]]
    assert [(s["starts_from_previous_end"], s["continuity"]) for s in summary["stages"]] == [
        (None, None), (True, "bitwise"), (True, "bitwise")]
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    assert _col(summary, "trunk.weight", "group") == [0, 1, 2]


# -------------------------------------------------------------------------------- a new head


def test_a_replaced_head_of_another_shape_is_followed(run_dir):
    """`model.fc = nn.Linear(...)` with more classes and a new optimizer for it, tracked: the new
    tensors are recorded under the old names (gradients, updates, drift from their first value),
    and the stage says they are not where the previous one ended."""
    torch.manual_seed(0)
    model = MLP(out=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("3 classes"):
            for s in range(3):
                x, y = _xy(s)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        model.body.requires_grad_(False)
        model.fc = nn.Linear(6, 5)
        first = oracle.state(model)
        opt2 = torch.optim.Adam(model.fc.parameters(), lr=1e-2)
        rec.track(opt2)
        tape = oracle.Tape(model, first_step=3, ref=first)
        with rec.stage("5 classes"):
            for s in range(3, 7):
                x, y = _xy(s, classes=5)
                opt2.zero_grad()
                F.cross_entropy(model(x), y).backward()
                tape.step(opt2, opt_index=1)
        end = oracle.state(model)
    run = freezeframe.load(run_dir)
    summary = _summary(run_dir)
    _, s1 = summary["stages"]
    assert sorted(s1["changed_since_previous_end"]) == ["fc.bias", "fc.weight"]
    assert s1["starts_from_previous_end"] is False
    assert s1["params_trainable"] == 6 * 5 + 5 and s1["tensors_trainable"] == 2
    fc_w = _param(summary, "fc.weight")
    assert fc_w["shape"] == [5, 6] and fc_w["numel"] == 30
    assert [e["grad_steps"] for e in fc_w["stages"]] == [3, 4]
    assert [e["changed"] for e in fc_w["stages"]] == [True, True]
    # metrics of the new tensors against the test's own tape; drift from their first value
    tensors = run.tensors()
    stage1_rows = tensors.filter(pc.greater_equal(tensors.column("step"), 3))
    names = {"fc.weight", "fc.bias"}
    got = oracle.stored_metrics(stage1_rows)
    for rec_ in tape.steps:
        expected = {n: m for n, m in tape.metrics(rec_).items() if n in names}
        assert oracle.metric_mismatches({n: v for n, v in got[rec_["step"]].items() if n in names}, expected) == []
    assert oracle.isclose(fc_w["stages"][1]["drift_abs"], oracle.dist(end["fc.weight"], first["fc.weight"]))
    assert summary["run"]["params_total"] == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ torch.compile


def test_a_compiled_model_is_recorded_under_the_names_of_the_model(run_dir):
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.05, momentum=0.9)
    tape = oracle.Tape(model)
    with freezeframe.watch(compiled, opt, run_dir, every=1) as rec:
        with rec.stage("compiled"):
            for s in range(3):
                x, y = _xy(s)
                opt.zero_grad()
                F.cross_entropy(compiled(x), y).backward()
                tape.step(opt)
    run = freezeframe.load(run_dir)
    summary = _summary(run_dir)
    names = [p["name"] for p in summary["params"]]
    assert names == oracle.param_names(model) == ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias",
                                                  "fc.weight", "fc.bias"]
    assert not any("_orig_mod" in m["name"] for m in summary["modules"])
    (stage,) = summary["stages"]
    assert stage["forward_passes"]["train"] == 3
    assert all(_col(summary, n, "grad_steps") == [3] for n in names)
    assert oracle.compare_with_tape(run.tensors(), tape) == []


# ------------------------------------------------------------------- nothing trainable, empty tensors


def test_a_model_with_nothing_trainable(run_dir, tmp_path):
    torch.manual_seed(0)
    model = MLP()
    model.requires_grad_(False)
    # watching with no optimizer and forward passes only: no step, so no stage
    with freezeframe.watch(model, [], run_dir, every=1):
        for s in range(3):
            model(_xy(s)[0])
    summary = freezeframe.load(run_dir).summary()  # no stage: present_from_stage is null
    json.dumps(summary, allow_nan=False)
    assert summary["stages"] == [] and summary["run"]["steps"] == 0 and summary["run"]["complete"] is True
    assert summary["run"]["tensors_total"] == 6
    # an optimizer over tensors none of which is trainable: its steps are one stage that moves nothing
    other = tmp_path / "stepping"
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    before = oracle.state(model)
    with freezeframe.watch(model, opt, other, every=1):
        for s in range(3):
            model(_xy(s)[0])
            opt.step()
    assert oracle.differing(before, oracle.state(model)) == set()
    summary = _summary(other)
    (stage,) = summary["stages"]
    assert (stage["steps"], stage["params_trainable"], stage["tensors_trainable"]) == (3, 0, 0)
    for p in summary["params"]:
        (e,) = p["stages"]
        assert (e["trainable"], e["grad_steps"], e["changed"], e["drift_abs"]) == (False, 0, False, 0.0), p["name"]


class WithEmpty(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.empty = nn.Parameter(torch.empty(0))
        self.empty_matrix = nn.Parameter(torch.empty(0, 3))
        self.register_buffer("empty_stat", torch.empty(0))

    def forward(self, x):
        return self.lin(x) + self.empty.sum() + (self.empty_matrix @ x.T).sum()


def test_zero_size_tensors_are_recorded(run_dir):
    torch.manual_seed(0)
    model = WithEmpty()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=1):
        for s in range(3):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            tape.step(opt)
    run = freezeframe.load(run_dir)
    summary = _summary(run_dir)
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    assert summary["run"]["params_total"] == 8 and summary["run"]["tensors_total"] == 4
    for name, shape in (("empty", [0]), ("empty_matrix", [0, 3])):
        p = _param(summary, name)
        assert (p["shape"], p["numel"]) == (shape, 0)
        (e,) = p["stages"]
        assert (e["changed"], e["drift_abs"], e["drift_rel"], e["update_ratio_median"]) == (False, 0.0, None, None)
    assert [b["name"] for b in summary["buffers"]] == ["empty_stat"]


class WithIntBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)  # num_batches_tracked: int64
        self.register_buffer("calls", torch.zeros((), dtype=torch.int32))
        self.register_buffer("mask", torch.ones(3, dtype=torch.bool))
        self.register_buffer("codes", torch.arange(3, dtype=torch.uint8))

    def forward(self, x):
        self.calls += 1
        self.codes.add_(1)
        return self.bn(self.lin(x)) * self.mask


def test_integer_buffers_are_ignored_without_error(run_dir):
    torch.manual_seed(0)
    model = WithIntBuffers()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("a"):
            for s in range(3):
                opt.zero_grad()
                model(torch.randn(4, 3)).sum().backward()
                opt.step()
        with torch.no_grad():
            model.calls.fill_(100)  # written between stages: not a recorded tensor
        with rec.stage("b"):
            for s in range(2):
                opt.zero_grad()
                model(torch.randn(4, 3)).sum().backward()
                opt.step()
    summary = _summary(run_dir)
    assert [b["name"] for b in summary["buffers"]] == ["bn.running_mean", "bn.running_var"]
    assert int(model.calls) == 102 and int(model.bn.num_batches_tracked) == 5
    assert summary["stages"][1]["changed_since_previous_end"] == []
    assert summary["stages"][1]["starts_from_previous_end"] is True


# ------------------------------------------------------------------------------------- meta


@pytest.mark.parametrize("where", ["whole model", "one submodule", "a buffer"])
def test_a_meta_device_model_is_refused_clearly(tmp_path, where):
    if where == "whole model":
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        named = "0.weight"
    elif where == "one submodule":
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3, device="meta"))
        named = "1.weight"
    else:
        model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        model[1].running_var = torch.empty(3, device="meta")
        named = "1.running_var"
    run_dir = tmp_path / "run"
    with pytest.raises(freezeframe.FreezeFrameError) as e:
        freezeframe.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir)
    msg = str(e.value)
    assert "meta" in msg and named in msg and "\n" not in msg, msg
    assert not run_dir.exists()


# ------------------------------------------------------------------------------ a changed model


def _seq_steps(model, opt, steps, start=0):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("how", ["add_param_group", "track"])
def test_a_layer_replaced_after_watch_starts_a_new_stage_that_is_not_a_continuation(run_dir, how):
    """`model[2] = nn.Linear(...)` of the same shape, its tensors given to the optimizer, no
    explicit stage: the next stage must not claim to start where the previous one ended, and
    the new head's own tensors are recorded (their grad steps, their bytes at the end)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="replaced: 2.weight, 2.bias"):
        with freezeframe.watch(model, opt, run_dir, every=1) as rec:
            _seq_steps(model, opt, 3)
            model[2] = nn.Linear(6, 3)
            head0 = oracle.state(model)
            if how == "add_param_group":
                opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.1})
                _seq_steps(model, opt, 3, start=3)
            else:
                opt2 = torch.optim.SGD(list(model[0].parameters()) + list(model[2].parameters()), lr=0.05)
                rec.track(opt2)
                _seq_steps(model, opt2, 3, start=3)
    end = oracle.state(model)
    run = freezeframe.load(run_dir)
    st = run.manifest["stages"]
    assert [s["steps"] for s in st] == [3, 3]
    assert st[1]["model_changes"] == {"replaced": ["2.weight", "2.bias"], "added": [], "removed": []}
    assert st[0]["model_changes"] is None
    assert st[1]["starts_from_previous_end"] is False
    assert {"2.weight", "2.bias"} <= set(st[1]["changed_since_previous_end"])
    names = [p["name"] for p in run.manifest["model"]["params"]]
    for n in ("2.weight", "2.bias"):
        i = names.index(n)
        assert st[1]["start_hashes"][i] == oracle.content_hash(head0[n])
        assert st[1]["end_hashes"][i] == oracle.content_hash(end[n])
        assert st[1]["grad_steps"][i] == 3
    summary = _summary(run_dir)
    assert [e["changed"] for e in _param(summary, "2.weight")["stages"]] == [True, True]
    (f,) = [f for f in summary["findings"] if f["code"] == "model-changed"]
    assert f["stage"] == 1 and f["params"] == ["2.weight", "2.bias"] and "replaced" in f["message"]


def test_a_module_added_after_watch_is_a_model_change(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="new: 4.weight, 4.bias"):
        with freezeframe.watch(model, opt, run_dir, every=1) as rec:
            with rec.stage("three layers"):
                _seq_steps(model, opt, 2)
            model.append(nn.ReLU())
            model.append(nn.Linear(3, 3))
            opt.add_param_group({"params": list(model[4].parameters())})
            with rec.stage("four layers"):
                _seq_steps(model, opt, 2, start=2)
    run = freezeframe.load(run_dir)
    st = run.manifest["stages"]
    assert [s["name"] for s in st] == ["three layers", "four layers"]
    assert st[1]["model_changes"] == {"replaced": [], "added": ["4.weight", "4.bias"], "removed": []}
    # recorded from the stage they appeared in: in the map, stepped, hashed at the stage's end
    end = oracle.state(model)
    names = [p["name"] for p in run.manifest["model"]["params"]]
    assert names[-2:] == ["4.weight", "4.bias"]
    for n in ("4.weight", "4.bias"):
        assert st[1]["grad_steps"][names.index(n)] == 2
        assert st[1]["end_hashes"][names.index(n)] == oracle.content_hash(end[n])
        p = _param(_summary(run_dir), n)
        assert p["present_from_stage"] == 1 and [e["trainable"] for e in p["stages"]] == [None, True]
