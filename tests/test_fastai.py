"""The fastai callback on a real `vision_learner(dls, resnet34, pretrained=False)` (and a timm
architecture given as a string): every stage checked against ground truth the test takes itself
(state dicts before and after each fit, requires_grad at its start, the steps fastai applied and
the lr of every group at each, the forward passes of the root module)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("fastai")

import torch  # noqa: E402
from fastai.callback.training import GradientAccumulation  # noqa: E402
from fastai.callback.tracker import SaveModelCallback  # noqa: E402
from fastai.layers import flatten_model  # noqa: E402

import freezeframe  # noqa: E402
from fastai_helpers import (Fit, collect, mismatches_with_truth, module_types, one_thread, owner,  # noqa: E402
                            resnet_learner, run_fit, stage_buffers, stage_params, summary_rows, watching)
from freezeframe.fastai import FreezeFrame  # noqa: E402

RESNET_GROUPS = 3
# Sampling of the tensor metrics is not under test here: the first step of every stage is always
# recorded, stage ends are exact; a large `every` keeps resnet34 on 2 CPU cores quick.
EVERY = 10**6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def _collect():
    yield
    collect()


def rel_close(a, b, rel=1e-12) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def body_param(name: str) -> bool:
    return name.startswith("0.")


def head_param(name: str) -> bool:
    return name.startswith("1.")


def is_bn(name: str, types: dict) -> bool:
    return types[owner(name)].startswith("BatchNorm")


# =============================================================================== the lesson-2 flow
@pytest.fixture(scope="module")
def lesson(tmp_path_factory):
    """freeze(), fit_one_cycle(1), unfreeze(), fit_one_cycle(1, lr_max=slice(1e-5, 1e-3)), then
    freeze() again and fit_one_cycle(1); 3 training batches per epoch. learn.summary(),
    validate() and get_preds() between the fits. Shared by the tests below (each reads it only)."""
    path = tmp_path_factory.mktemp("lesson")
    run_dir = path / "run"
    cb = FreezeFrame(run_dir, every=EVERY)
    learn = resnet_learner(path, n_train=12, bs=4, cbs=[cb])
    out = {"learn": learn, "run_dir": run_dir, "fits": [], "printed": [], "frozen_idx": []}
    learn.freeze()
    out["fits"].append(run_fit(learn, lambda: learn.fit_one_cycle(1)))
    out["printed"].append(learn.summary())
    out["frozen_idx"].append(learn.opt.frozen_idx)
    learn.validate()
    learn.get_preds()
    out["between"] = freezeframe.load(run_dir).summary()  # the run is readable between fits
    learn.unfreeze()
    out["fits"].append(run_fit(learn, lambda: learn.fit_one_cycle(1, lr_max=slice(1e-5, 1e-3))))
    out["printed"].append(learn.summary())
    out["frozen_idx"].append(learn.opt.frozen_idx)
    learn.freeze()
    out["fits"].append(run_fit(learn, lambda: learn.fit_one_cycle(1)))
    out["printed"].append(learn.summary())
    out["frozen_idx"].append(learn.opt.frozen_idx)
    out["summary"] = freezeframe.load(run_dir).summary()
    out["types"] = module_types(learn.model)
    yield out
    cb.close()


def test_each_fit_is_one_stage_named_after_the_call(lesson):
    s = lesson["summary"]
    assert [st["name"] for st in s["stages"]] == [
        "fit_one_cycle(1)", "fit_one_cycle(1, lr_max=[1e-05, 0.0001, 0.001])", "fit_one_cycle(1)"]
    assert [st["kind"] for st in s["stages"]] == ["train"] * 3
    assert s["run"]["framework"] == "fastai"
    assert s["run"]["complete"] is True
    assert [st["epochs"] for st in s["stages"]] == [1, 1, 1]
    assert len(s["run"]["sessions"]) == 1  # one callback attachment, one session
    assert s["run"]["sessions"][0]["versions"]["fastai"]
    # validate / get_preds / summary between the fits made no stage
    assert [st["name"] for st in lesson["between"]["stages"]] == ["fit_one_cycle(1)"]


def test_steps_and_forward_passes_are_counted_per_stage(lesson):
    s = lesson["summary"]
    learn = lesson["learn"]
    n_train, n_valid = len(learn.dls.train), len(learn.dls.valid)
    assert n_train == 3
    first = 0
    for st, fit in zip(s["stages"], lesson["fits"]):
        assert st["steps"] == fit.steps == n_train * 1  # training batches x epochs
        assert st["skipped_steps"] == fit.skipped == 0
        assert (st["first_step"], st["last_step"]) == (first, first + n_train - 1)
        first += n_train
        # every forward pass of the fit, and none of validate/get_preds/summary
        assert st["forward_passes"] == fit.forwards == {"train": n_train, "eval": n_valid}
    assert s["run"]["steps"] == 3 * n_train
    assert s["run"]["skipped_steps"] == 0


def test_stage_facts_equal_the_state_dicts(lesson):
    s = lesson["summary"]
    for k, fit in enumerate(lesson["fits"]):
        assert mismatches_with_truth(s, k, fit) == []


def test_frozen_stage_body_convs_frozen_and_unchanged_batchnorm_and_head_train(lesson):
    s, types = lesson["summary"], lesson["types"]
    fit = lesson["fits"][0]
    params = stage_params(s, 0)
    changed = fit.changed
    body_conv = [n for n in params if body_param(n) and not is_bn(n, types)]
    body_bn = [n for n in params if body_param(n) and is_bn(n, types)]
    head = [n for n in params if head_param(n)]
    assert len(body_conv) == 36 and len(body_bn) == 72 and len(head) == 6
    for n in body_conv:
        assert params[n]["trainable"] is False and params[n]["changed"] is False and not changed[n], n
        assert params[n]["grad_steps"] == 0, n
    for n in body_bn + head:
        assert params[n]["trainable"] is True and params[n]["changed"] is True and changed[n], n
        assert params[n]["grad_steps"] == fit.steps, n
    st = s["stages"][0]
    assert st["meta"]["frozen_groups"] == [0, 1]
    assert st["meta"]["train_bn"] is True
    assert "BatchNorm" in st["meta"]["norm_trains_reason"] and "train_bn=True" in st["meta"]["norm_trains_reason"]
    assert sorted(st["meta"]["norm_trains"]) == sorted(body_bn) and "norm_frozen" not in st["meta"]
    # a body block (conv + BatchNorm) is "partial"; each layer alone is True or False
    modules = {m["name"]: m for m in s["modules"]}
    assert modules["0.4.0.conv1"]["stages"][0]["trainable"] is False
    assert modules["0.4.0.bn1"]["stages"][0]["trainable"] is True
    from freezeframe.analyse.rollup import rollup

    blocks = {r["name"]: r for r in rollup(s, 3)}
    assert blocks["0.4.0"]["stages"][0]["trainable"] == "partial"
    # BatchNorm running statistics are kept apart from weights: they moved in train mode
    buffers = stage_buffers(s, 0)
    assert buffers["0.1.running_mean"]["changed"] is True and changed["0.1.running_mean"]


def test_unfrozen_stage_everything_trains_changes_and_continues(lesson):
    s = lesson["summary"]
    fit = lesson["fits"][1]
    params = stage_params(s, 1)
    assert all(e["trainable"] and e["changed"] for e in params.values())
    assert all(fit.changed[n] for n in params)
    st = s["stages"][1]
    assert st["starts_from_previous_end"] is True
    assert st["continuity"] == "bitwise"
    assert st["changed_since_previous_end"] == []
    assert st["meta"]["frozen_groups"] == []
    assert st["tensors_trainable"] == s["run"]["tensors_total"] == 114
    # the second fit continued from the first one's end: the test's own state dicts agree
    first_end, second_start = lesson["fits"][0].after, lesson["fits"][1].before
    assert all(torch.equal(first_end[k], second_start[k]) for k in first_end)


def test_lr_max_per_group_is_the_schedule_peak_and_lr_is_recorded_every_step(lesson):
    s = lesson["summary"]
    expected = [[1e-3] * 3, [1e-5, 1e-4, 1e-3], [1e-3] * 3]
    for k, (st, fit) in enumerate(zip(s["stages"], lesson["fits"])):
        assert [g["name"] for g in st["groups"]] == ["pg0", "pg1", "pg2"]
        assert [g["tensors"] for g in st["groups"]] == [48, 60, 6]
        for g, want in zip(st["groups"], expected[k]):
            assert rel_close(g["lr_max"], want), (k, g["lr_max"], want)
            # one-cycle never reaches its peak on 3 batches: the peak is read from the schedule
            assert g["lr_applied_max"] < want
            assert g["momentum_max"] <= 0.95 and g["momentum_min"] >= 0.85
        assert st["meta"]["scheduled"] == ["lr", "mom"]
    # the scheduled lr of every group at every step, as fastai applied it
    steps = freezeframe.load(lesson["run_dir"]).steps().to_pydict()
    assert steps["step"] == list(range(9))
    assert steps["stage"] == [0] * 3 + [1] * 3 + [2] * 3
    assert steps["lr"] == [lr for fit in lesson["fits"] for lr in fit.lrs]
    assert steps["momentum"] == [m for fit in lesson["fits"] for m in fit.moms]  # one-cycle schedules it too
    # and the loss of every step, from learn.loss
    assert steps["loss"] == [x for fit in lesson["fits"] for x in fit.losses]


def test_refrozen_tensors_still_change_through_decoupled_weight_decay(lesson):
    """freeze -> unfreeze -> freeze: fastai zeroes gradients instead of clearing them, so the
    optimizer still steps the tensors frozen the second time and weight decay moves them."""
    s, types = lesson["summary"], lesson["types"]
    fit = lesson["fits"][2]
    params = stage_params(s, 2)
    frozen_changed = sorted(n for n in params if not fit.trainable[n] and fit.changed[n])
    body_conv = sorted(n for n in params if body_param(n) and not is_bn(n, types))
    assert frozen_changed == body_conv  # ground truth: every frozen conv weight moved
    for n in body_conv:
        assert params[n]["trainable"] is False and params[n]["changed"] is True, n
    findings = [f for f in s["findings"] if f["code"] == "frozen-param-changed"]
    assert len(findings) == 1 and findings[0]["stage"] == 2
    assert sorted(findings[0]["params"]) == frozen_changed
    assert not any(f["code"] == "frozen-param-changed" and f["stage"] != 2 for f in s["findings"])


def test_trainable_agrees_with_every_row_learn_summary_prints(lesson):
    s = lesson["summary"]
    learn = lesson["learn"]
    names = {id(m): n for n, m in learn.model.named_modules()}
    modules = {m["name"]: m for m in s["modules"]}
    leaves = flatten_model(learn.model)
    for k, printed in enumerate(lesson["printed"]):
        rows = summary_rows(printed)
        assert len(rows) == len(leaves)
        compared = 0
        for row, leaf in zip(rows, leaves):
            assert row[0] == type(leaf).__name__
            if len(row) == 1:
                assert not hasattr(leaf, "weight") or leaf.weight is None
                continue
            ours = modules[names[id(leaf)]]["stages"][k]["trainable"]
            assert ours == (row[2] == "True"), (k, names[id(leaf)], row, ours)
            compared += 1
        assert compared == sum(1 for m in leaves if getattr(m, "weight", None) is not None)
        frozen_idx = lesson["frozen_idx"][k]
        assert s["stages"][k]["meta"]["frozen_idx"] == frozen_idx
        footer = "Model unfrozen" if frozen_idx == 0 else f"frozen up to parameter group #{frozen_idx}"
        assert footer in str(printed)


# =============================================================================== more flows
def test_fine_tune_is_two_stages_frozen_then_unfrozen(tmp_path):
    run_dir = tmp_path / "run"
    learn = resnet_learner(tmp_path, n_train=8, bs=4, cbs=[watching(run_dir, every=EVERY)])
    fit = run_fit(learn, lambda: learn.fine_tune(1))
    s = freezeframe.load(run_dir).summary()
    assert [st["name"] for st in s["stages"]] == ["fine_tune(1) · frozen", "fine_tune(1) · unfrozen"]
    assert [st["meta"]["half"] for st in s["stages"]] == ["frozen", "unfrozen"]
    assert len(fit.parts) == 2
    assert [st["steps"] for st in s["stages"]] == [part.steps for part in fit.parts] == [2, 2]
    for k, part in enumerate(fit.parts):
        assert mismatches_with_truth(s, k, part) == []
    frozen, unfrozen = s["stages"]
    # fine_tune: slice(base_lr) frozen, then slice(base_lr/2/lr_mult, base_lr/2)
    for g, want in zip(frozen["groups"], [2e-4, 2e-4, 2e-3]):
        assert rel_close(g["lr_max"], want), g
    for g, want in zip(unfrozen["groups"], [1e-5, 1e-4, 1e-3]):
        assert rel_close(g["lr_max"], want), g
    assert frozen["meta"]["frozen_groups"] == [0, 1] and unfrozen["meta"]["frozen_groups"] == []
    assert unfrozen["starts_from_previous_end"] is True and unfrozen["continuity"] == "bitwise"
    types = module_types(learn.model)
    p0, p1 = stage_params(s, 0), stage_params(s, 1)
    for n in p0:
        frozen_conv = body_param(n) and not is_bn(n, types)
        assert p0[n]["trainable"] is (not frozen_conv) and p0[n]["changed"] is (not frozen_conv), n
        assert p1[n]["trainable"] is True and p1[n]["changed"] is True, n
    n_valid = len(learn.dls.valid)
    assert [st["forward_passes"] for st in s["stages"]] == [{"train": 2, "eval": n_valid}] * 2
    assert fit.forwards == {"train": 4, "eval": 2 * n_valid}


def test_freeze_to_minus_two_freezes_only_the_first_group(tmp_path):
    run_dir = tmp_path / "run"
    learn = resnet_learner(tmp_path, cbs=[watching(run_dir, every=EVERY)])
    learn.freeze_to(-2)
    fit = run_fit(learn, lambda: learn.fit_one_cycle(1))
    s = freezeframe.load(run_dir).summary()
    assert mismatches_with_truth(s, 0, fit) == []
    st = s["stages"][0]
    assert st["meta"]["frozen_groups"] == [0] and st["meta"]["frozen_idx"] == 1
    group0 = {p["name"] for p in s["params"] if p["stages"][0]["group"] == 0}
    types = module_types(learn.model)
    params = stage_params(s, 0)
    for n, e in params.items():
        frozen = n in group0 and not is_bn(n, types)
        assert e["trainable"] is (not frozen) and e["changed"] is (not frozen), n
    assert len(group0) == 48
    assert sorted(st["meta"]["norm_trains"]) == sorted(n for n in group0 if is_bn(n, types))


def test_timm_architecture_given_as_a_string_has_two_groups(tmp_path):
    run_dir = tmp_path / "run"
    learn = resnet_learner(tmp_path, arch="resnet18", cbs=[watching(run_dir, every=EVERY)])
    learn.freeze()
    fits = [run_fit(learn, lambda: learn.fit_one_cycle(1))]
    learn.unfreeze()
    fits.append(run_fit(learn, lambda: learn.fit_one_cycle(1, lr_max=slice(1e-5, 1e-3))))
    s = freezeframe.load(run_dir).summary()
    assert [st["name"] for st in s["stages"]] == ["fit_one_cycle(1)", "fit_one_cycle(1, lr_max=[1e-05, 0.001])"]
    for k, fit in enumerate(fits):
        assert mismatches_with_truth(s, k, fit) == []
    assert [[g["tensors"] for g in st["groups"]] for st in s["stages"]] == [[60, 6], [60, 6]]
    for g, want in zip(s["stages"][0]["groups"], [1e-3, 1e-3]):
        assert rel_close(g["lr_max"], want)
    for g, want in zip(s["stages"][1]["groups"], [1e-5, 1e-3]):
        assert rel_close(g["lr_max"], want)
    types = module_types(learn.model)
    p0 = stage_params(s, 0)
    body = [n for n in p0 if n.startswith("0.model.")]
    assert len(body) == 60
    for n in body:
        bn = is_bn(n, types)
        assert p0[n]["trainable"] is bn and p0[n]["changed"] is bn, n
    assert s["stages"][1]["starts_from_previous_end"] is True


def test_train_bn_false_freezes_batchnorm_weights_but_not_running_stats(tmp_path):
    run_dir = tmp_path / "run"
    learn = resnet_learner(tmp_path, train_bn=False, cbs=[watching(run_dir, every=EVERY)])
    learn.freeze()
    fit = run_fit(learn, lambda: learn.fit_one_cycle(1))
    s = freezeframe.load(run_dir).summary()
    assert mismatches_with_truth(s, 0, fit) == []
    types = module_types(learn.model)
    params, buffers = stage_params(s, 0), stage_buffers(s, 0)
    body_bn = [n for n in params if body_param(n) and is_bn(n, types)]
    assert len(body_bn) == 72
    for n in body_bn:
        assert params[n]["trainable"] is False and params[n]["changed"] is False and not fit.changed[n], n
    stats = [b for b in buffers if b.startswith("0.") and b.endswith(("running_mean", "running_var"))]
    assert len(stats) == 72
    for b in stats:
        assert buffers[b]["changed"] is True and fit.changed[b], b  # the model ran in train mode
    st = s["stages"][0]
    assert st["meta"]["train_bn"] is False and "norm_trains" not in st["meta"]
    assert sorted(st["meta"]["norm_frozen"]) == sorted(body_bn)
    assert "train_bn=False" in st["meta"]["norm_frozen_reason"]
    modules = {m["name"]: m for m in s["modules"]}
    assert modules["0.1"]["stages"][0]["trainable"] is False
    shown = [f for f in s["findings"] if f["code"] == "frozen-bn-stats-changed"]
    assert len(shown) == 1 and sorted(shown[0]["params"]) == sorted(stats)
    assert not any(f["code"] == "frozen-param-changed" for f in s["findings"])


def test_lr_find_is_a_trial_stage_and_the_next_fit_continues_the_last_training_stage(tmp_path):
    run_dir = tmp_path / "run"
    learn = resnet_learner(tmp_path, cbs=[watching(run_dir, every=EVERY)])
    fits = [run_fit(learn, lambda: learn.fit_one_cycle(1))]
    fits.append(run_fit(learn, lambda: learn.lr_find(num_it=6, suggest_funcs=None, show_plot=False)))
    fits.append(run_fit(learn, lambda: learn.fit_one_cycle(1)))
    s = freezeframe.load(run_dir).summary()
    assert [(st["name"], st["kind"]) for st in s["stages"]] == [
        ("fit_one_cycle(1)", "train"), ("lr_find(num_it=6)", "trial"), ("fit_one_cycle(1)", "train")]
    assert [st["steps"] for st in s["stages"]] == [f.steps for f in fits] == [2, 6, 2]
    assert [(st["first_step"], st["last_step"]) for st in s["stages"]] == [(0, 1), (2, 7), (8, 9)]
    trial = s["stages"][1]
    # LRFinder restores the weights before the stage's end is taken: nothing changed, by the truth too
    assert not any(fits[1].changed.values())
    assert mismatches_with_truth(s, 1, fits[1]) == []
    assert trial["meta"]["reload_at_end"]["by"] == "LRFinder"
    assert all(rel_close(g["lr_max"], 10.0) for g in trial["groups"])  # LRFinder's end_lr
    assert trial["forward_passes"] == {"train": 6, "eval": 0} == fits[1].forwards
    last = s["stages"][2]
    assert last["starts_from_previous_end"] is True and last["continuity"] == "bitwise"
    manifest = freezeframe.load(run_dir).manifest
    assert manifest["stages"][2]["compared_with"] == 0  # the trial is skipped for continuity
    assert mismatches_with_truth(s, 2, fits[2]) == []
    assert not [f for f in s["findings"] if f["stage"] == 1]


def _first_epoch_only(value, best):
    return best == -float("inf")


def test_save_model_callback_reload_is_the_stage_end(tmp_path):
    run_dir = tmp_path / "run"
    learn = resnet_learner(tmp_path, cbs=[watching(run_dir, every=EVERY)])
    learn.unfreeze()
    saver = SaveModelCallback(comp=_first_epoch_only)  # the best epoch is epoch 0: the reload matters
    fits = [run_fit(learn, lambda: learn.fit_one_cycle(2, cbs=[saver]))]
    saved = torch.load(learn.path / learn.model_dir / "model.pth", weights_only=True)
    fits.append(run_fit(learn, lambda: learn.fit_one_cycle(1)))
    s = freezeframe.load(run_dir).summary()
    # ground truth: the fit returned epoch 0's weights, not its last step's
    assert all(torch.equal(fits[0].after[k], saved[k]) for k in fits[0].after)
    assert mismatches_with_truth(s, 0, fits[0]) == []
    st0, st1 = s["stages"]
    assert st0["steps"] == 4 and st0["epochs"] == 2
    assert st0["meta"]["reload_at_end"]["by"] == "SaveModelCallback"
    # the reload is stated, as the intended act of a callback the fit announced: information
    (w,) = st0["outside_writes"]
    (f,) = [f for f in s["findings"] if f["code"] == "changed-outside-optimizer"]
    assert (f["severity"], f["stage"]) == ("info", 0) and "SaveModelCallback" in f["message"]
    assert set(f["params"]) == set(w["params"]) | set(w["buffers"]) and w["params"]
    assert (w["when"], w["detected"], w["step"]) == ("after_last_step", "stage_end", st0["last_step"])
    # drift at the stage's end is measured on the reloaded weights (W_ref: the model before the fit)
    for p in s["params"]:
        want = float(torch.linalg.vector_norm((fits[0].after[p["name"]] - fits[0].before[p["name"]]).double()))
        assert math.isclose(p["stages"][0]["drift_abs"], want, rel_tol=1e-4, abs_tol=1e-7), p["name"]
    assert st1["starts_from_previous_end"] is True and st1["continuity"] == "bitwise"
    assert not [f for f in s["findings"] if f["code"] == "stage-discontinuity"]


def test_gradient_accumulation_batches_are_neither_steps_nor_skipped_steps(tmp_path):
    run_dir = tmp_path / "run"
    learn = resnet_learner(tmp_path, n_train=16, bs=4, cbs=[watching(run_dir, every=EVERY)])
    learn.unfreeze()
    fit = run_fit(learn, lambda: learn.fit(1, cbs=[GradientAccumulation(n_acc=8)]))
    s = freezeframe.load(run_dir).summary()
    (st,) = s["stages"]
    assert fit.steps == 2 and fit.skipped == 0
    assert st["name"] == "fit(1)"
    assert st["steps"] == 2 and st["skipped_steps"] == 0
    assert st["forward_passes"] == fit.forwards == {"train": 4, "eval": 1}  # every batch ran forward
    params = stage_params(s, 0)
    assert all(e["grad_steps"] == 2 for e in params.values())  # two batches accumulate into each step
    assert mismatches_with_truth(s, 0, fit) == []


def test_a_learner_recreated_between_stages_does_not_continue(tmp_path):
    """The common mistake: re-running the cell that builds the Learner. The run appends (same
    model map), and the second stage starts from fresh weights, not from the first one's end.
    2 training batches per epoch here (3 in the lesson fixture): lr_max is the same."""
    run_dir = tmp_path / "run"
    learn = resnet_learner(tmp_path, seed=0, cbs=[watching(run_dir, every=EVERY)])
    learn.freeze()
    fits = [run_fit(learn, lambda: learn.fit_one_cycle(1))]
    learn = resnet_learner(tmp_path, seed=1, cbs=[watching(run_dir, every=EVERY)])
    learn.unfreeze()
    fits.append(run_fit(learn, lambda: learn.fit_one_cycle(1, lr_max=slice(1e-5, 1e-3))))
    s = freezeframe.load(run_dir).summary()
    assert len(s["run"]["sessions"]) == 2
    assert [st["steps"] for st in s["stages"]] == [2, 2]
    for g, want in zip(s["stages"][0]["groups"], [1e-3] * 3):
        assert rel_close(g["lr_max"], want)
    for g, want in zip(s["stages"][1]["groups"], [1e-5, 1e-4, 1e-3]):
        assert rel_close(g["lr_max"], want)
    st = s["stages"][1]
    assert st["starts_from_previous_end"] is False and st["continuity"] == "bitwise"
    truth = sorted(k for k in fits[0].after if Fit(before=fits[0].after, after=fits[1].before).changed[k])
    assert sorted(st["changed_since_previous_end"]) == truth
    assert len(truth) > 100
    found = [f for f in s["findings"] if f["code"] == "stage-discontinuity"]
    assert len(found) == 1 and found[0]["stage"] == 1
    for k, fit in enumerate(fits):
        assert mismatches_with_truth(s, k, fit) == []
