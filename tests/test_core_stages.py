"""Stages, learning rates, forward passes, grad_steps and the frozen/changed facts, each against
ground truth the test takes itself (the optimizer's param_groups, state copies, its own counts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import freezeframe
import oracle
from models import BodyHead, Branchy, SmallCNN, batch, build, loss_of, train


def _stage(summary, index):
    return summary["stages"][index]


def _param(summary, name):
    return next(p for p in summary["params"] if p["name"] == name)


def _module(summary, name):
    return next(m for m in summary["modules"] if m["name"] == name)


def _buffer(summary, name):
    return next(b for b in summary["buffers"] if b["name"] == name)


# ------------------------------------------------------------------------ learning rates


def test_onecycle_lr_per_group_per_step_and_lr_max_equal_the_scheduler(run_dir):
    model = build(BodyHead)
    max_lr = [1e-4, 1e-3, 1e-2]
    opt = torch.optim.SGD([{"params": g, "weight_decay": wd} for g, wd in zip(model.layer_groups(), [0.0, 1e-4, 1e-3])],
                          lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=7)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 7, tape=tape, scheduler=sched)
    run = freezeframe.load(run_dir)
    steps = run.steps()
    assert steps.column("lr").to_pylist() == [r["lr"] for r in tape.steps]
    assert steps.column("momentum").to_pylist() == [r["momentum"] for r in tape.steps]
    assert steps.column("weight_decay").to_pylist() == [r["weight_decay"] for r in tape.steps]
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    summary = run.summary()
    assert len(summary["stages"]) == 1  # hyperparameters changing every step make no new stage
    groups = _stage(summary, 0)["groups"]
    assert [g["name"] for g in groups] == ["pg0", "pg1", "pg2"]
    for g, peak in zip(groups, max_lr):
        i = g["index"]
        lrs = [r["lr"][i] for r in tape.steps]
        moms = [r["momentum"][i] for r in tape.steps]
        assert abs(g["lr_max"] - peak) <= 1e-12 * peak, (g["name"], g["lr_max"], peak)
        assert g["lr_applied_max"] == max(lrs)
        assert g["lr_applied_max"] < peak  # 7 steps never reach the nominal peak exactly
        assert g["lr_min"] == min(lrs) and g["lr_first"] == lrs[0] and g["lr_last"] == lrs[-1]
        assert g["momentum_min"] == min(moms) and g["momentum_max"] == max(moms)
        assert g["weight_decay"] == tape.steps[-1]["weight_decay"][i]
        assert g["tensors"] == len(model.layer_groups()[i])
        assert g["params"] == sum(p.numel() for p in model.layer_groups()[i])


def test_lr_set_by_hand_every_step_lr_max_is_the_largest_applied(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD([{"params": model.features.parameters(), "lr": 0.01},
                           {"params": model.classifier.parameters(), "lr": 0.1}], momentum=0.0)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=2):
        for s, scale in enumerate([1.0, 3.0, 0.5, 2.0]):
            for g, base in zip(opt.param_groups, [0.01, 0.1]):
                g["lr"] = base * scale
            x, y = batch(model, s)
            opt.zero_grad()
            loss_of(model, x, y).backward()
            tape.step(opt)
    run = freezeframe.load(run_dir)
    assert run.steps().column("lr").to_pylist() == [r["lr"] for r in tape.steps]
    summary = run.summary()
    assert len(summary["stages"]) == 1
    for g in _stage(summary, 0)["groups"]:
        lrs = [r["lr"][g["index"]] for r in tape.steps]
        assert g["lr_max"] == max(lrs) == g["lr_applied_max"]
        assert (g["lr_first"], g["lr_last"], g["lr_min"]) == (lrs[0], lrs[-1], min(lrs))


# ------------------------------------------------------------------------ stages


def test_new_optimizer_followed_with_track_is_recorded_as_a_new_stage(run_dir):
    model = build(BodyHead)
    model.freeze_body()
    head = model.layer_groups()[2]
    opt_head = torch.optim.SGD(head, lr=0.05)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt_head, run_dir, every=1) as rec:
        train(model, opt_head, 3, tape=tape)
        model.unfreeze()
        early, late, head = model.layer_groups()
        opt_all = torch.optim.Adam([{"params": early, "lr": 1e-4}, {"params": late, "lr": 1e-3},
                                    {"params": head, "lr": 1e-2}])
        rec.track(opt_all)
        train(model, opt_all, 4, start=3, tape=tape, opt_index=1)
    run = freezeframe.load(run_dir)
    summary = run.summary()
    assert [(s["first_step"], s["last_step"], s["steps"]) for s in summary["stages"]] == [(0, 2, 3), (3, 6, 4)]
    assert summary["run"]["steps"] == 7
    steps = run.steps()
    assert steps.column("optimizer").to_pylist() == [0, 0, 0, 1, 1, 1, 1]
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    # the new optimizer's groups, their lrs as the optimizer held them at every step
    stage1 = _stage(summary, 1)
    mine = sorted((g for g in stage1["groups"] if g["optimizer"] == 1), key=lambda g: g["index"])
    assert [g["name"] for g in mine] == ["opt1.pg0", "opt1.pg1", "opt1.pg2"]
    lr_rows = steps.column("lr").to_pylist()
    for k, g in enumerate(mine):
        assert [lr_rows[r["step"]][g["index"]] for r in tape.steps[3:]] == [r["lr"][k] for r in tape.steps[3:]]
        assert g["lr_first"] == [1e-4, 1e-3, 1e-2][k]
    for p in summary["params"]:
        e = p["stages"][1]
        assert e["trainable"] is True and e["in_optimizer"] is True and e["grad_steps"] == 4, p["name"]
        assert e["group"] in [g["index"] for g in mine]
    assert stage1["tensors_trainable"] == len(list(model.parameters()))


def test_requires_grad_change_starts_automatic_stage_and_explicit_stage_gets_parts(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        model.features.requires_grad_(False)
        train(model, opt, 2)                                  # stage 0 (automatic)
        model.features.requires_grad_(True)
        train(model, opt, 2, start=2)                         # stage 1 (automatic)
        with rec.stage("fine-tune"):
            train(model, opt, 1, start=4)                     # stage 2 "fine-tune"
            model.features[0].weight.requires_grad_(False)
            train(model, opt, 2, start=5)                     # stage 3 "fine-tune (part 2)"
        with rec.stage("nothing"):                            # no step: no stage
            model.features[0].weight.requires_grad_(True)
        for g in opt.param_groups:
            g["lr"] = 0.01                                    # a hyperparameter: no new stage
        train(model, opt, 2, start=7)                         # stage 4 (automatic; trainable set changed)
    summary = freezeframe.load(run_dir).summary()
    got = [(s["name"], s["first_step"], s["steps"]) for s in summary["stages"]]
    assert got == [("stage 0", 0, 2), ("stage 1", 2, 2), ("fine-tune", 4, 1), ("fine-tune (part 2)", 5, 2),
                   ("stage 4", 7, 2)]
    assert [s["index"] for s in summary["stages"]] == [0, 1, 2, 3, 4]
    n = len(list(model.parameters()))
    assert [s["tensors_trainable"] for s in summary["stages"]] == [2, n, n, n - 1, n]


def test_param_group_membership_change_starts_a_new_stage(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.classifier.parameters(), lr=0.05)  # features trainable but not held
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2)
        opt.add_param_group({"params": list(model.features.parameters()), "lr": 0.01})
        train(model, opt, 2, start=2)
    summary = freezeframe.load(run_dir).summary()
    assert [(s["first_step"], s["steps"]) for s in summary["stages"]] == [(0, 2), (2, 2)]
    assert [len(s["groups"]) for s in summary["stages"]] == [1, 2]
    conv = _param(summary, "features.0.weight")
    assert [e["in_optimizer"] for e in conv["stages"]] == [False, True]
    assert [e["group"] for e in conv["stages"]] == [None, 1]
    # trainable, gradients every step, but held by no optimizer: never moves, and that is a finding
    assert conv["stages"][0]["trainable"] is True and conv["stages"][0]["grad_steps"] == 2
    assert conv["stages"][0]["changed"] is False
    codes = {(f["code"], f["stage"]) for f in summary["findings"]}
    assert ("trainable-not-in-optimizer", 0) in codes


# ------------------------------------------------------------------------ frozen and changed


@pytest.mark.parametrize("second_bn_eval", [False, True])
def test_frozen_tensors_unchanged_and_frozen_bn_stats_in_train_mode_changed(run_dir, second_bn_eval):
    model = build(SmallCNN)
    model.features.requires_grad_(False)  # the whole body frozen, BatchNorm included
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    model.train()
    if second_bn_eval:
        model.features[4].eval()
    start = oracle.state(model)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3)
    end = oracle.state(model)
    changed = oracle.differing(start, end)
    # ground truth: the frozen params kept their bytes; the BN statistics in train mode moved
    frozen = [n for n, p in model.features.named_parameters(prefix="features")]
    assert not changed & set(frozen)
    bn_train = {"features.1.running_mean", "features.1.running_var"}
    bn_second = {"features.4.running_mean", "features.4.running_var"}
    assert bn_train <= changed and (not (bn_second & changed) if second_bn_eval else bn_second <= changed)

    summary = freezeframe.load(run_dir).summary()
    for p in summary["params"]:
        e = p["stages"][0]
        assert e["changed"] is (p["name"] in changed), p["name"]
        assert e["trainable"] is (p["name"] not in frozen), p["name"]
        if p["name"] in frozen:
            assert e["grad_steps"] == 0 and e["update_ratio_median"] is None and e["drift_abs"] == 0.0
    for b in summary["buffers"]:
        assert b["stages"][0]["changed"] is (b["name"] in changed), b["name"]
    assert _module(summary, "features.1")["stages"][0]["trainable"] is False
    assert _module(summary, "features.1")["stages"][0]["changed"] is False
    assert not [f for f in summary["findings"] if f["code"] == "frozen-param-changed"]


def test_frozen_tensor_written_in_place_is_changed_and_a_finding(run_dir):
    model = build(SmallCNN)
    model.features.requires_grad_(False)
    opt = torch.optim.SGD(model.classifier.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2)
        with torch.no_grad():
            model.features[3].bias.mul_(-1.0)  # a "hand-written update" of a frozen tensor
        train(model, opt, 2, start=2)
    summary = freezeframe.load(run_dir).summary()
    assert len(summary["stages"]) == 1
    e = _param(summary, "features.3.bias")["stages"][0]
    assert e["trainable"] is False and e["changed"] is True
    hits = [f for f in summary["findings"] if f["code"] == "frozen-param-changed"]
    assert len(hits) == 1 and hits[0]["severity"] == "error" and hits[0]["stage"] == 0
    assert hits[0]["params"] == ["features.3.bias"]


# ------------------------------------------------------------------------ forward passes


def test_forward_passes_counted_per_stage_train_and_eval(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1):
        model.eval()
        with torch.no_grad():
            model(batch(model, 99)[0])                  # before any step: belongs to no stage
        model.train()
        model.features.requires_grad_(False)
        train(model, opt, 3)                            # stage 0: 3 training passes
        model.eval()
        with torch.no_grad():
            for _ in range(2):
                model(batch(model, 98)[0])              # stage 0 (last to step): 2 eval passes
        model.train()
        model.features.requires_grad_(True)
        for s in range(2):                              # stage 1: 2 steps of 2 accumulated passes
            opt.zero_grad()
            for k in range(2):
                x, y = batch(model, 10 + 2 * s + k)
                loss_of(model, x, y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            model(batch(model, 97)[0])                  # stage 1: 1 eval pass
            model.features(batch(model, 96)[0])         # a submodule alone is not a forward pass of the model
        model.train()
    summary = freezeframe.load(run_dir).summary()
    assert [s["forward_passes"] for s in summary["stages"]] == [{"train": 3, "eval": 2}, {"train": 4, "eval": 1}]


# ------------------------------------------------------------------------ grad_steps


def _grads_per_step(run, names):
    out = []
    for mask in run.steps().column("grads").to_pylist():
        bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8))[: len(names)]
        out.append({n for n, b in zip(names, bits) if b})
    return out


def test_grad_steps_count_applied_steps_backward_reached(run_dir):
    model = build(Branchy)
    model.trunk.bias.requires_grad_(False)              # frozen at watch start, unfrozen later
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    use_b = [True, False, True, False, False, True, False]
    with freezeframe.watch(model, opt, run_dir, every=1):
        for s, b in enumerate(use_b):
            if s == 4:
                model.trunk.bias.requires_grad_(True)   # stage 1 from step 4
            # stale (zeroed, not None) gradients must not count
            opt.zero_grad(set_to_none=False)
            n_acc = 2 if s == 2 else 1                 # gradient accumulation: still one step
            for k in range(n_acc):
                x, y = batch(model, 10 * s + k)
                loss_of(model, x, y, use_b=b).backward()
            opt.step()
    run = freezeframe.load(run_dir)
    summary = run.summary()
    names = [p["name"] for p in summary["params"]]
    assert sorted(names) == sorted(oracle.param_names(model))
    # the test's own ground truth, per step
    expected_sets = []
    for s, b in enumerate(use_b):
        got = {"trunk.weight", "head_a.weight", "head_a.bias"}
        if s >= 4:
            got.add("trunk.bias")
        if b:
            got |= {"head_b.weight", "head_b.bias"}
        expected_sets.append(got)
    assert _grads_per_step(run, names) == expected_sets
    stages = [(0, 4), (4, 7)]
    assert [(s["first_step"], s["last_step"] + 1) for s in summary["stages"]] == stages
    for p in summary["params"]:
        want = [sum(p["name"] in expected_sets[s] for s in range(a, b)) for a, b in stages]
        assert [e["grad_steps"] for e in p["stages"]] == want, p["name"]
    assert [e["grad_steps"] for e in _param(summary, "head_b.weight")["stages"]] == [2, 1]
    assert [e["grad_steps"] for e in _param(summary, "trunk.bias")["stages"]] == [0, 3]


def test_grad_steps_of_a_tensor_unfrozen_later_when_training_in_eval_mode(run_dir):
    """Fine-tuning with the model in eval mode (BatchNorm statistics kept as pretrained) is
    common; a tensor unfrozen later must still get its gradient hook."""
    model = build(Branchy)
    model.trunk.bias.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.eval()
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2)
        model.trunk.bias.requires_grad_(True)
        train(model, opt, 3, start=2)
    summary = freezeframe.load(run_dir).summary()
    assert [(s["first_step"], s["steps"]) for s in summary["stages"]] == [(0, 2), (2, 3)]
    for p in summary["params"]:
        want = [0, 3] if p["name"] == "trunk.bias" else [2, 3]
        assert [e["grad_steps"] for e in p["stages"]] == want, p["name"]
    assert not [f for f in summary["findings"] if f["code"] == "trainable-never-gets-grad"]


def test_several_optimizers_from_the_start_are_named_and_recorded(run_dir):
    model = build(BodyHead)
    opt_body = torch.optim.SGD(model.body.parameters(), lr=1e-3, momentum=0.9)
    opt_head = torch.optim.Adam([{"params": list(model.head.parameters()) + [model.temperature], "name": "head"}],
                                lr=1e-2)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, [opt_body, opt_head], run_dir, every=1):
        for s in range(3):
            x, y = batch(model, s)
            opt_body.zero_grad()
            opt_head.zero_grad()
            loss_of(model, x, y).backward()
            tape.step(opt_body, opt_index=0)
            tape.step(opt_head, opt_index=1)
    run = freezeframe.load(run_dir)
    summary = run.summary()
    assert summary["run"]["steps"] == 6 and len(summary["stages"]) == 1
    assert run.steps().column("optimizer").to_pylist() == [0, 1, 0, 1, 0, 1]
    assert [(g["name"], g["optimizer"]) for g in summary["stages"][0]["groups"]] == [("opt0.pg0", 0), ("head", 1)]
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    lr_rows = run.steps().column("lr").to_pylist()
    for row, rec in zip(lr_rows, tape.steps):
        assert row[rec["opt"]] == rec["lr"][0]
    for p in summary["params"]:
        assert p["stages"][0]["grad_steps"] == 3, p["name"]
        assert p["stages"][0]["group"] == (0 if p["name"].startswith("body.") else 1), p["name"]


def test_continuity_after_a_trial_stage_is_judged_against_the_last_training_stage(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("head"):
            train(model, opt, 2)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with rec.stage("lr_find", kind="trial"):
            for g in opt.param_groups:
                g["lr"] = 1.0
            train(model, opt, 2, start=2)
        model.load_state_dict(saved)   # lr_find puts the weights back
        for g in opt.param_groups:
            g["lr"] = 0.05
        with rec.stage("all"):
            train(model, opt, 2, start=4)
    summary = freezeframe.load(run_dir).summary()
    assert [(s["name"], s["kind"]) for s in summary["stages"]] == [("head", "train"), ("lr_find", "trial"),
                                                                    ("all", "train")]
    last = summary["stages"][2]
    assert (last["starts_from_previous_end"], last["continuity"], last["changed_since_previous_end"]) == \
        (True, "bitwise", [])


def test_lr_max_of_a_later_stage_without_a_schedule_is_the_largest_applied(run_dir):
    """OneCycleLR leaves `max_lr` in the param groups; a later stage run at a constant lr
    has no schedule, so its lr_max is the largest lr it applied."""
    model = build(SmallCNN)
    model.features.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=3)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3, scheduler=sched)          # stage 0: one cycle up to 1e-2
        model.features.requires_grad_(True)
        for g in opt.param_groups:
            g["lr"] = 1e-5
        train(model, opt, 3, start=3)                  # stage 1: constant 1e-5, no scheduler
    summary = freezeframe.load(run_dir).summary()
    g0, g1 = summary["stages"][0]["groups"][0], summary["stages"][1]["groups"][0]
    assert g0["lr_max"] == pytest.approx(1e-2, rel=1e-12)
    assert g1["lr_applied_max"] == 1e-5
    assert g1["lr_max"] == 1e-5, g1


def test_changed_is_bitwise_not_torch_equal(run_dir):
    """A frozen tensor holding NaN that nobody writes is unchanged (torch.equal says NaN != NaN);
    a frozen +0.0 overwritten with -0.0 is changed (torch.equal says they are equal)."""
    model = build(Branchy)
    with torch.no_grad():
        model.head_b.weight[0, 0] = float("nan")
        model.head_b.bias[0] = 0.0
    model.head_b.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = oracle.state(model)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("train"):
            train(model, opt, 2, use_b=False)
            with torch.no_grad():
                model.head_b.bias[0] = -0.0
            train(model, opt, 1, start=2, use_b=False)
    assert not torch.equal(start["head_b.weight"], model.head_b.weight)   # torch's view
    assert torch.equal(start["head_b.bias"], model.head_b.bias)
    summary = freezeframe.load(run_dir).summary()
    assert _param(summary, "head_b.weight")["stages"][0]["changed"] is False
    assert _param(summary, "head_b.bias")["stages"][0]["changed"] is True
    hits = [f for f in summary["findings"] if f["code"] == "frozen-param-changed"]
    assert [f["params"] for f in hits] == [["head_b.bias"]]
    import json

    oracle.strict_json(json.dumps(summary, allow_nan=False))  # the NaN tensor's drift is null, not NaN
