"""Each finding, built on purpose with a small real model, and clean two-stage runs with none."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import torch
from torch import nn

import freezeframe
from models import BodyHead, Branchy, SmallCNN, build, train


def codes(run_dir, severity=None):
    f = freezeframe.load(run_dir).findings()
    return [x["code"] for x in f if severity is None or x["severity"] == severity]


def finding(run_dir, code):
    hits = [f for f in freezeframe.load(run_dir).findings() if f["code"] == code]
    assert len(hits) >= 1, f"{code} not among {codes(run_dir)}"
    return hits[0]


def test_clean_two_stage_run_has_no_warning_or_error(run_dir):
    model = build(BodyHead)
    model.freeze_body(keep_bn=True)
    opt = torch.optim.AdamW([{"params": g} for g in model.layer_groups()], lr=1e-3)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("head"):
            train(model, opt, 4)
        model.unfreeze()
        opt = torch.optim.AdamW([{"params": g, "lr": lr} for g, lr in zip(model.layer_groups(), (1e-5, 1e-4, 1e-3))])
        rec.track(opt)
        with rec.stage("all"):
            train(model, opt, 4, start=4)
    bad = [f for f in freezeframe.load(run_dir).findings() if f["severity"] in ("warning", "error")]
    assert bad == []


def test_trainable_not_in_optimizer(run_dir):
    model = build(BodyHead)
    model.freeze_body()
    opt = torch.optim.SGD(list(model.head.parameters()) + [model.temperature], lr=0.1)  # the head, forever
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2)
        model.unfreeze()  # the classic bug: unfrozen, but the optimizer still holds the head only
        before = {k: v.clone() for k, v in model.body.state_dict().items()}
        train(model, opt, 3, start=2)
    f = finding(run_dir, "trainable-not-in-optimizer")
    assert f["severity"] == "error" and f["stage"] == 1
    body_params = {f"body.{n}" for n, _ in model.body.named_parameters()}
    assert set(f["params"]) == body_params
    assert "pass the other optimizer" in f["message"] or "rec.track" in f["message"]
    for k, v in model.body.state_dict().items():  # ground truth: the body indeed never moved
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k


def test_frozen_param_changed_by_weight_decay_on_zeroed_grads(run_dir):
    model = build(BodyHead)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2, set_to_none=False)
        model.freeze_body()  # frozen, but their gradients are zero tensors, not None: AdamW decays them
        w = model.body[0].weight.detach().clone()
        train(model, opt, 2, start=2, set_to_none=False)
        assert not torch.equal(w, model.body[0].weight)  # ground truth
    f = finding(run_dir, "frozen-param-changed")
    assert f["severity"] == "error" and f["stage"] == 1
    assert "body.0.weight" in f["params"]
    s = freezeframe.load(run_dir).summary()
    p = next(p for p in s["params"] if p["name"] == "body.0.weight")
    assert p["stages"][1]["trainable"] is False and p["stages"][1]["changed"] is True


def test_frozen_param_changed_says_what_moved_them_and_the_fix(run_dir):
    """Each cause the run can tell apart, named as such: a stepping optimizer holding frozen
    tensors with zero-filled gradients (the re-freeze pattern), and a hand-written in-place edit of a
    frozen tensor no optimizer holds."""
    model = build(BodyHead)
    opt = torch.optim.AdamW(list(model.body.parameters()) + list(model.head.parameters()), lr=1e-2,
                            weight_decay=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("all"):
            train(model, opt, 2, set_to_none=False)
        model.freeze_body()
        model.temperature.requires_grad_(False)  # in no optimizer: only the edit below moves it
        conv, temp = model.body[0].weight.detach().clone(), model.temperature.detach().clone()
        with rec.stage("head"):
            train(model, opt, 2, start=2, set_to_none=False)
            with torch.no_grad():
                model.temperature.mul_(0.5)  # a hand-written edit after the last step
            assert not torch.equal(conv, model.body[0].weight) and not torch.equal(temp, model.temperature)
    f = finding(run_dir, "frozen-param-changed")
    assert f["stage"] == 1 and {"body.0.weight", "temperature"} <= set(f["params"])
    msg = f["message"]
    moved = [n for n in f["params"] if n != "temperature"]
    assert f"{len(moved)} of them: the optimizer's steps moved {len(moved)} of them" in msg
    assert "zero tensor rather than None" in msg and "zero_grad(set_to_none=True)" in msg
    assert "1 of them: they were rewritten outside an optimizer step (see changed-outside-optimizer)" in msg
    assert finding(run_dir, "changed-outside-optimizer")["stage"] == 1


def test_stage_discontinuity_names_how_many_tensors_differ(run_dir):
    model = build(SmallCNN)
    other = build(SmallCNN, seed=5).state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("one"):
            train(model, opt, 2)
        sd = copy.deepcopy(model.state_dict())
        sd["classifier.weight"] = other["classifier.weight"]
        sd["classifier.bias"] = other["classifier.bias"]
        model.load_state_dict(sd)
        with rec.stage("two"):
            train(model, opt, 2, start=2)
    f = finding(run_dir, "stage-discontinuity")
    assert f["severity"] == "warning" and f["stage"] == 1
    assert set(f["params"]) == {"classifier.weight", "classifier.bias"}
    assert "2 tensor(s) differ" in f["message"]


def test_frozen_bn_stats_changed(run_dir):
    model = build(SmallCNN)
    for p in model.features.parameters():
        p.requires_grad_(False)  # BatchNorm affine frozen too, but the model stays in train mode
    opt = torch.optim.SGD(model.classifier.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3)
    f = finding(run_dir, "frozen-bn-stats-changed")
    assert f["severity"] == "info"
    assert {"features.1.running_mean", "features.1.running_var"} <= set(f["params"])


def test_frozen_bn_in_eval_mode_is_not_reported(run_dir):
    model = build(SmallCNN)
    for p in model.features.parameters():
        p.requires_grad_(False)
    for m in model.features.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.SGD(model.classifier.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3)
    assert "frozen-bn-stats-changed" not in codes(run_dir)


def test_zero_lr_group(run_dir):
    model = build(BodyHead)
    groups = model.layer_groups()
    opt = torch.optim.SGD([{"params": groups[0], "lr": 0.0}, {"params": groups[1] + groups[2], "lr": 0.1}])
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3)
    f = finding(run_dir, "zero-lr-group")
    assert f["severity"] == "warning" and "pg0" in f["message"]


def test_trainable_never_gets_grad(run_dir):
    model = build(Branchy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3, use_b=False)  # head_b never takes part in the forward pass
    f = finding(run_dir, "trainable-never-gets-grad")
    assert f["severity"] == "warning"
    assert set(f["params"]) == {"head_b.weight", "head_b.bias"}


def test_nonfinite_names_first_step_and_tensor(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    with freezeframe.watch(model, opt, run_dir, every=1):
        for step in range(4):
            opt.zero_grad()
            inp = x.clone()
            if step == 2:
                inp[0, 0, 0, 0] = float("nan")
            nn.functional.cross_entropy(model(inp), y).backward()
            opt.step()
    f = finding(run_dir, "nonfinite")
    assert f["severity"] == "error"
    assert "step 2" in f["message"]
    assert f["params"], f


def test_optimizer_state_reset_between_stages(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("a"):
            train(model, opt, 2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)  # fresh state
        rec.track(opt)
        with rec.stage("b"):
            train(model, opt, 2, start=2)
    f = finding(run_dir, "optimizer-state-reset")
    assert f["severity"] == "info" and f["stage"] == 1


def test_update_ratio_outlier(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=50.0)  # absurdly large steps
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3)
    f = finding(run_dir, "update-ratio-outlier")
    assert f["severity"] == "info" and "pg0" in f["message"]


def test_bn_trains_in_frozen_group(run_dir):
    model = build(BodyHead)
    model.freeze_body(keep_bn=True)
    opt = torch.optim.SGD([{"params": g} for g in model.layer_groups()], lr=0.01)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2)
    hits = [f for f in freezeframe.load(run_dir).findings() if f["code"] == "bn-trains-in-frozen-group"]
    assert {tuple(sorted(f["params"])) for f in hits} == {("body.1.bias", "body.1.weight"),
                                                          ("body.4.bias", "body.4.weight")}


@pytest.mark.parametrize("with_error", [False, True])
def test_check_cli_exit_codes(tmp_path, with_error, freezeframe_exe, cli_env):
    run_dir = tmp_path / "run"
    model = build(BodyHead)
    opt = torch.optim.SGD(model.head.parameters() if with_error else model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2)  # with_error: the body trains (requires_grad) but is in no optimizer
    out = subprocess.run([freezeframe_exe, "check", str(run_dir), "--json"], capture_output=True, text=True,
                         env=cli_env)
    doc = json.loads(out.stdout)
    assert doc["schema"] == "freezeframe.check/1"
    errors = [f for f in doc["findings"] if f["severity"] == "error"]
    assert out.returncode == (1 if with_error else 0), out.stderr
    assert bool(errors) == with_error
    bad = subprocess.run([freezeframe_exe, "check", str(tmp_path / "nope")], capture_output=True, text=True,
                         env=cli_env)
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
