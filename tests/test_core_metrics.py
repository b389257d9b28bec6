"""Every stored tensor metric equals the oracle recomputed from the test's own snapshots around
each optimizer.step(); the sampling schedule (`every`) records exactly the steps it promises."""

from __future__ import annotations

import pyarrow.compute as pc
import torch

import freezeframe
import oracle
from models import BodyHead, Branchy, DropoutMLP, SmallCNN, TiedLM, batch, build, loss_of, train


def _recorded_steps(run) -> list[int]:
    steps = run.steps()
    return [s for s, r in zip(steps.column("step").to_pylist(), steps.column("recorded").to_pylist()) if r]


def test_cnn_with_batchnorm_partly_frozen_every_metric_equals_oracle(run_dir):
    model = build(SmallCNN)
    model.features[0].weight.requires_grad_(False)  # a partly frozen body, still held by the optimizer
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 4, tape=tape)
    run = freezeframe.load(run_dir)
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    # the frozen tensor has no row (no gradient, not trainable); every BN running stat has one per step
    rows = oracle.stored_metrics(run.tensors())
    assert sorted(rows) == [0, 1, 2, 3]
    for step_rows in rows.values():
        assert "features.0.weight" not in step_rows
        for buf in ("features.1.running_mean", "features.1.running_var",
                    "features.4.running_mean", "features.4.running_var"):
            grad, update, _, _ = step_rows[buf]
            assert grad is None and update is None
    assert _recorded_steps(run) == [0, 1, 2, 3]


def test_tied_weight_is_one_tensor_and_its_metrics_equal_oracle(run_dir):
    model = build(TiedLM)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.01)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3, tape=tape)
    run = freezeframe.load(run_dir)
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    summary = run.summary()
    names = [p["name"] for p in summary["params"]]
    assert sorted(names) == sorted(oracle.param_names(model))  # tied tensor once
    assert "out.weight" not in names
    emb = next(p for p in summary["params"] if p["name"] == "emb.weight")
    assert emb["aliases"] == ["out.weight"]
    assert summary["run"]["tensors_total"] == 4
    assert summary["run"]["params_total"] == sum(p.numel() for p in model.parameters())
    # Adam's momentum is beta1
    assert run.steps().column("momentum").to_pylist() == [[0.8]] * 3


def test_three_groups_two_stages_metrics_equal_oracle(run_dir):
    model = build(BodyHead)
    model.freeze_body()
    early, late, head = model.layer_groups()
    opt = torch.optim.AdamW([{"params": early, "lr": 1e-4}, {"params": late, "lr": 1e-3},
                             {"params": head, "lr": 1e-2}], weight_decay=0.05)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3, tape=tape, set_to_none=False)
        model.unfreeze()
        train(model, opt, 3, start=3, tape=tape, set_to_none=False)
    run = freezeframe.load(run_dir)
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    assert [len(r["rows"]) for r in tape.steps] == [5, 5, 5, 13, 13, 13]  # the test's own ground truth


def test_trainable_tensor_without_gradient_has_null_grad_norm_and_zero_update(run_dir):
    model = build(Branchy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2, tape=tape, use_b=False)  # head_b: trainable, never a gradient
    run = freezeframe.load(run_dir)
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    for step_rows in oracle.stored_metrics(run.tensors()).values():
        grad, update, pnorm, _ = step_rows["head_b.weight"]
        assert grad is None and update == 0.0 and pnorm > 0


def test_lbfgs_closure_steps_are_recorded_and_gradients_read_after_the_step(run_dir):
    model = build(SmallCNN)
    model.features[0].weight.requires_grad_(False)
    opt = torch.optim.LBFGS([p for p in model.parameters() if p.requires_grad], lr=0.5, max_iter=3,
                            history_size=4)
    tape = oracle.Tape(model)
    closure_calls = {"a": 0, "b": 0}
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        for name, steps in (("a", [0]), ("b", [1, 2])):
            with rec.stage(name):
                for s in steps:
                    x, y = batch(model, s)

                    def closure():
                        closure_calls[name] += 1
                        opt.zero_grad()
                        loss = loss_of(model, x, y)
                        loss.backward()
                        return loss

                    tape.step(opt, closure)
    run = freezeframe.load(run_dir)
    summary = run.summary()
    assert closure_calls["a"] > 1 and closure_calls["b"] > 2  # several forward passes inside each step
    assert summary["run"]["steps"] == 3
    assert [(s["name"], s["steps"]) for s in summary["stages"]] == [("a", 1), ("b", 2)]
    # every pass inside a step's closure belongs to that step's stage
    assert [s["forward_passes"] for s in summary["stages"]] == [{"train": closure_calls["a"], "eval": 0},
                                                                {"train": closure_calls["b"], "eval": 0}]
    assert oracle.compare_with_tape(run.tensors(), tape) == []
    assert oracle.norm(tape.steps[-1]["grad"]["classifier.weight"]) > 0


def test_every_n_records_multiples_of_n_within_each_stage(run_dir):
    model = build(SmallCNN)
    model.features[0].weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=3) as rec:
        train(model, opt, 7, tape=tape)                 # automatic stage 0: steps 0..6
        model.features[0].weight.requires_grad_(True)
        train(model, opt, 5, start=7, tape=tape)        # automatic stage 1: steps 7..11
        with rec.stage("named"):
            train(model, opt, 2, start=12, tape=tape)   # explicit stage 2: steps 12..13
    run = freezeframe.load(run_dir)
    stages = run.summary()["stages"]
    assert [(s["first_step"], s["last_step"]) for s in stages] == [(0, 6), (7, 11), (12, 13)]
    expected = [0, 3, 6, 7, 10, 12]
    assert _recorded_steps(run) == expected
    assert sorted(set(run.tensors().column("step").to_pylist())) == expected
    assert oracle.compare_with_tape(run.tensors(), tape, steps=expected) == []
    assert run.summary()["run"]["sessions"][0]["every"] == 3


def test_every_none_calibrates_and_stores_every(run_dir):
    model = build(DropoutMLP)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with freezeframe.watch(model, opt, run_dir) as rec:
        train(model, opt, 24)                       # calibration needs ~10 clean steps
        model.net[0].weight.requires_grad_(False)
        train(model, opt, 6, start=24)
        every = rec.every
    run = freezeframe.load(run_dir)
    stored = run.summary()["run"]["sessions"][0]["every"]
    assert isinstance(stored, int) and not isinstance(stored, bool) and stored >= 1
    assert stored == every
    # after calibration the schedule holds: within the second stage, exactly the multiples of `every`
    steps = run.steps()
    second = pc.equal(steps.column("stage"), 1)
    rows = steps.filter(second)
    first = rows.column("step").to_pylist()[0]
    assert first == 24
    for step, recorded in zip(rows.column("step").to_pylist(), rows.column("recorded").to_pylist()):
        assert recorded == ((step - first) % stored == 0), step


def test_reference_option_off_gives_null_drift(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=1, reference=False):
        train(model, opt, 2, tape=tape)
    run = freezeframe.load(run_dir)
    tensors = run.tensors()
    assert tensors.num_rows > 0
    assert tensors.column("drift").null_count == tensors.num_rows
    # the other metrics are still exact
    stored = oracle.stored_metrics(tensors)
    for rec in tape.steps:
        expected = tape.metrics(rec)
        for name, (g, u, p, _) in expected.items():
            got = stored[rec["step"]][name]
            assert oracle.isclose(got[0], g) and oracle.isclose(got[1], u) and oracle.isclose(got[2], p), name
    for p in run.summary()["params"]:
        assert all(e["drift_abs"] is None and e["drift_rel"] is None for e in p["stages"])


def test_update_ratio_median_and_end_drift_equal_oracle(run_dir):
    model = build(BodyHead)
    opt = torch.optim.SGD([{"params": g} for g in model.layer_groups()], lr=0.05, momentum=0.9)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 5, tape=tape)
    end = oracle.state(model)
    summary = freezeframe.load(run_dir).summary()
    for p in summary["params"]:
        e = p["stages"][0]
        name = p["name"]
        want = tape.update_ratio_median(name, list(range(5)))
        assert oracle.isclose(e["update_ratio_median"], want), (name, e["update_ratio_median"], want)
        drift = oracle.dist(end[name], tape.ref[name])
        assert oracle.isclose(e["drift_abs"], drift), name
        ref_norm = oracle.norm(tape.ref[name])
        assert (e["drift_rel"] is None) if ref_norm == 0 else oracle.isclose(e["drift_rel"], drift / ref_norm), name
    # a BatchNorm bias starts at 0: its drift_rel is null, never Infinity
    assert oracle.norm(tape.ref["body.1.bias"]) == 0
    bias = next(p for p in summary["params"] if p["name"] == "body.1.bias")
    assert bias["stages"][0]["drift_rel"] is None and bias["stages"][0]["drift_abs"] > 0


def test_appended_session_measures_drift_against_the_first_reference(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = oracle.state(model)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2)
    tape = oracle.Tape(model, first_step=2, ref=ref)
    with freezeframe.watch(model, opt, run_dir, every=1, mode="append"):
        train(model, opt, 2, start=2, tape=tape)
    run = freezeframe.load(run_dir)
    later = run.tensors().filter(pc.greater_equal(run.tensors().column("step"), 2))
    assert sorted(set(later.column("step").to_pylist())) == [2, 3]
    assert oracle.compare_with_tape(later, tape) == []
    assert oracle.dist(oracle.state(model)["classifier.weight"], ref["classifier.weight"]) > 0


def test_stage_end_drift_is_exact_even_when_the_last_step_was_not_recorded(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tape = oracle.Tape(model)
    with freezeframe.watch(model, opt, run_dir, every=4) as rec:
        with rec.stage("a"):
            train(model, opt, 6, tape=tape)              # recorded: 0, 4
        end_a = oracle.state(model)
        model.features[0].weight.requires_grad_(False)
        train(model, opt, 3, start=6, tape=tape)         # automatic stage: recorded 6
    end_b = oracle.state(model)
    run = freezeframe.load(run_dir)
    assert _recorded_steps(run) == [0, 4, 6]
    summary = run.summary()
    for p in summary["params"]:
        n = p["name"]
        for k, end in enumerate([end_a, end_b]):
            assert oracle.isclose(p["stages"][k]["drift_abs"], oracle.dist(end[n], tape.ref[n])), (n, k)
        assert oracle.isclose(p["stages"][0]["update_ratio_median"], tape.update_ratio_median(n, [0, 4])), n
