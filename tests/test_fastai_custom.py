"""The fastai callback on a `Learner` with a small custom model and splitter (tests/models.py
BodyHead, three layer groups): stage names of every fit method, cancelled steps, to_fp16 on a CPU,
sessions, reloads between fits, nested and interrupted fits, and that training is unchanged."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("fastai")

import torch  # noqa: E402
from fastai.callback.core import Callback, CancelStepException  # noqa: E402
from fastai.callback.fp16 import MixedPrecision  # noqa: E402

import freezeframe  # noqa: E402
import freezeframe.fastai as ff_fastai  # noqa: E402
from fastai_helpers import (collect, custom_learner, differs, mismatches_with_truth, one_thread, run_fit,  # noqa: E402
                            snapshot, stage_params, watching)
from freezeframe.errors import FreezeFrameError  # noqa: E402
from freezeframe.fastai import FreezeFrame  # noqa: E402


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


def summary_of(run_dir) -> dict:
    return freezeframe.load(run_dir).summary()


class CancelSteps(Callback):
    """Cancels the optimizer step of chosen batches, as MixedPrecision does on an fp16 overflow
    (same order, so the step never reaches callbacks ordered after it)."""

    order = MixedPrecision.order

    def __init__(self, batches):
        self.batches, self.seen = set(batches), 0

    def before_step(self):
        i, self.seen = self.seen, self.seen + 1
        if i in self.batches:
            raise CancelStepException()


# =============================================================================== names
def test_stage_names_show_the_method_and_the_values_fastai_resolved(tmp_path):
    run_dir = tmp_path / "run"
    cb = watching(run_dir, every=1)
    learn = custom_learner(tmp_path, cbs=[cb])
    learn.fit(1)
    learn.fit(1, lr=0.01)
    learn.fit(1, lr=slice(1e-4, 1e-2))
    learn.fit_one_cycle(1, pct_start=0.5, moms=(0.9, 0.8, 0.9), lr_max=1e-3)
    learn.fit_flat_cos(1, lr=0.005)
    learn.fit_sgdr(2, 1)
    cb.name_next("head only")
    learn.fit_one_cycle(1)
    learn.lr_find(start_lr=1e-5, num_it=6, suggest_funcs=None, show_plot=False)
    s = summary_of(run_dir)
    assert [st["name"] for st in s["stages"]] == [
        "fit(1)", "fit(1, lr=0.01)", "fit(1, lr=[0.0001, 0.001, 0.01])",
        "fit_one_cycle(1, pct_start=0.5, moms=(0.9, 0.8, 0.9))", "fit_flat_cos(1, lr=0.005)",
        "fit_sgdr(2, 1)", "head only", "lr_find(start_lr=1e-05, num_it=6)"]
    assert [st["kind"] for st in s["stages"]] == ["train"] * 7 + ["trial"]
    assert [st["epochs"] for st in s["stages"]] == [1, 1, 1, 1, 1, 3, 1, 2]
    lr_max = [[g["lr_max"] for g in st["groups"]] for st in s["stages"]]
    applied = [[g["lr_applied_max"] for g in st["groups"]] for st in s["stages"]]
    # a plain fit states no schedule: lr_max is the largest lr applied
    assert lr_max[:3] == applied[:3] == [[1e-3] * 3, [0.01] * 3, [1e-4, 1e-3, 1e-2]]
    for k, want in ((3, [1e-3] * 3), (4, [0.005] * 3), (5, [1e-3] * 3), (6, [1e-3] * 3), (7, [10.0] * 3)):
        assert all(rel_close(a, b) for a, b in zip(lr_max[k], want)), (k, lr_max[k])
    assert s["stages"][4]["meta"]["scheduled"] == ["lr"]
    assert s["stages"][0]["meta"].get("scheduled") is None
    assert s["stages"][3]["meta"]["kwargs"] == {"pct_start": 0.5, "moms": [0.9, 0.8, 0.9]}


def test_name_next_names_both_halves_of_fine_tune(tmp_path):
    run_dir = tmp_path / "run"
    cb = watching(run_dir, every=1)
    learn = custom_learner(tmp_path, cbs=[cb])
    cb.name_next("warm-up", meta={"note": "given by the user"})
    learn.fine_tune(1, base_lr=0.01, freeze_epochs=2)
    learn.fine_tune(1)
    s = summary_of(run_dir)
    assert [st["name"] for st in s["stages"]] == [
        "warm-up · frozen", "warm-up · unfrozen", "fine_tune(1) · frozen", "fine_tune(1) · unfrozen"]
    assert s["stages"][0]["meta"]["note"] == "given by the user" and "note" not in s["stages"][1]["meta"]
    assert s["stages"][0]["meta"]["kwargs"] == {"base_lr": 0.01, "freeze_epochs": 2}
    assert [st["epochs"] for st in s["stages"]] == [2, 1, 1, 1]
    for g, want in zip(s["stages"][1]["groups"], [5e-5, 5e-4, 5e-3]):
        assert rel_close(g["lr_max"], want)
    with pytest.raises(FreezeFrameError):
        cb.name_next("")


# =============================================================================== steps
def test_cancelled_steps_are_skipped_steps_of_their_own_stage(tmp_path):
    """Batch 1 of the first fit, and batches 0 (the second stage's very first step) and 2 of the
    second, are cancelled."""
    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path, n_train=16, cbs=[watching(run_dir, every=1)])
    learn.freeze()
    fits = [run_fit(learn, lambda: learn.fit(1, cbs=[CancelSteps({1})]))]
    learn.unfreeze()
    fits.append(run_fit(learn, lambda: learn.fit(1, cbs=[CancelSteps({0, 2})])))
    s = summary_of(run_dir)
    assert [f.steps for f in fits] == [3, 2] and [f.skipped for f in fits] == [1, 2]
    assert [st["steps"] for st in s["stages"]] == [3, 2]
    assert [st["skipped_steps"] for st in s["stages"]] == [1, 2]
    assert s["run"]["skipped_steps"] == 3 and s["run"]["steps"] == 5
    for k, fit in enumerate(fits):
        assert mismatches_with_truth(s, k, fit) == []
        # a cancelled batch still ran forward: it belongs to the stage of the next applied step
        assert s["stages"][k]["forward_passes"] == fit.forwards
    # the recorded lr is that of the applied steps only
    run = freezeframe.load(run_dir)
    assert run.scalars().to_pydict()["value"] == [x for f in fits for x in f.losses]


def test_a_fit_whose_every_step_is_cancelled_makes_no_stage(tmp_path):
    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path, n_train=16, cbs=[watching(run_dir, every=1)])
    learn.fit(1)
    fit = run_fit(learn, lambda: learn.fit(1, cbs=[CancelSteps({0, 1, 2, 3})]))
    learn.fit(1)
    s = summary_of(run_dir)
    assert fit.steps == 0 and fit.skipped == 4
    assert [st["steps"] for st in s["stages"]] == [4, 4]  # a stage has at least one applied step
    assert [st["skipped_steps"] for st in s["stages"]] == [0, 0]  # not put on a stage they are not in
    assert s["stages"][1]["starts_from_previous_end"] is True


def test_to_fp16_on_a_cpu_does_not_break_recording(tmp_path):
    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path, cbs=[watching(run_dir, every=1)]).to_fp16()
    learn.freeze()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling" from torch.amp
        fit = run_fit(learn, lambda: learn.fit_one_cycle(1))
    s = summary_of(run_dir)
    (st,) = s["stages"]
    assert st["steps"] == fit.steps == 4 and st["skipped_steps"] == 0
    assert mismatches_with_truth(s, 0, fit) == []
    assert not s["run"]["error"]


# =============================================================================== freeze state of a custom splitter
def test_custom_model_and_splitter_groups_and_freeze_state(tmp_path):
    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path, cbs=[watching(run_dir, every=1)])
    learn.freeze()
    fit = run_fit(learn, lambda: learn.fit_one_cycle(1))
    s = summary_of(run_dir)
    assert mismatches_with_truth(s, 0, fit) == []
    st = s["stages"][0]
    assert [g["tensors"] for g in st["groups"]] == [4, 4, 5]
    assert st["meta"]["frozen_groups"] == [0, 1]
    assert sorted(st["meta"]["norm_trains"]) == ["body.1.bias", "body.1.weight", "body.4.bias", "body.4.weight"]
    params = stage_params(s, 0)
    assert {n for n, e in params.items() if not e["trainable"]} == {
        "body.0.weight", "body.0.bias", "body.3.weight", "body.3.bias"}
    assert params["temperature"]["group"] == 2 and params["temperature"]["changed"] is True
    mods = {m["name"]: m for m in s["modules"]}
    assert mods["body.0"]["stages"][0]["trainable"] is False and mods["body.1"]["stages"][0]["trainable"] is True


# =============================================================================== sessions and reloads
def test_one_session_per_attachment_and_none_before_a_training_fit(tmp_path):
    run_dir = tmp_path / "run"
    cb = watching(run_dir)
    learn = custom_learner(tmp_path, cbs=[cb])
    learn.validate()
    learn.get_preds()
    learn.summary()
    assert not run_dir.exists()  # no training fit yet: nothing recorded, no run directory
    learn.fit(1)
    learn.fit(1)
    assert len(summary_of(run_dir)["run"]["sessions"]) == 1
    learn.remove_cb(cb)  # detaching ends the session
    assert summary_of(run_dir)["run"]["sessions"][0]["ended"] is not None
    learn.fit(1)  # not watched
    learn.add_cb(cb)
    learn.fit(1)  # a second session
    learn.remove_cb(cb)
    learn.fit(1, cbs=[watching(run_dir)])  # a callback for one fit: a third session, ended with the fit
    s = summary_of(run_dir)
    assert [st["session"] for st in freezeframe.load(run_dir).manifest["stages"]] == [0, 0, 1, 2]
    assert len(s["run"]["sessions"]) == 3
    assert all(x["ended"] is not None for x in s["run"]["sessions"])
    # the unwatched fit moved the weights between stages 1 and 2: told, never hidden
    assert [st["starts_from_previous_end"] for st in s["stages"]] == [None, True, False, True]
    assert [f["stage"] for f in s["findings"] if f["code"] == "stage-discontinuity"] == [2]


def test_learn_load_between_fits_is_a_requested_reload(tmp_path):
    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path, cbs=[watching(run_dir, every=1)])
    learn.fit(1)
    learn.save("after-1")
    learn.fit(1)
    learn.load("after-1")  # on purpose: back to the first stage's weights (and optimizer state)
    learn.fit(1)
    s = summary_of(run_dir)
    st = s["stages"][2]
    assert st["starts_from_previous_end"] is False and st["changed_since_previous_end"]
    assert st["meta"]["reload_requested"] is True
    assert "reload_requested" not in s["stages"][1]["meta"]
    assert not [f for f in s["findings"] if f["code"] == "stage-discontinuity"]


def test_weights_written_between_fits_otherwise_are_a_discontinuity_unless_the_user_says(tmp_path):
    run_dir = tmp_path / "run"
    cb = watching(run_dir, every=1)
    learn = custom_learner(tmp_path, cbs=[cb])
    start = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(1)
    learn.model.load_state_dict(start)  # not through learn.load: nothing tells it was wanted
    learn.fit(1)
    learn.model.load_state_dict(start)
    cb.name_next(meta={"reload_requested": True})
    learn.fit(1)
    s = summary_of(run_dir)
    assert [st["starts_from_previous_end"] for st in s["stages"]] == [None, False, False]
    assert [st["name"] for st in s["stages"]] == ["fit(1)"] * 3
    found = [f["stage"] for f in s["findings"] if f["code"] == "stage-discontinuity"]
    assert found == [1]


def test_a_new_model_on_the_same_learner_is_a_new_session(tmp_path):
    from models import BodyHead

    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path, cbs=[watching(run_dir, every=1)])
    learn.fit(1)
    torch.manual_seed(5)
    learn.model = BodyHead()
    learn.create_opt()
    learn.fit(1)
    s = summary_of(run_dir)
    assert len(s["run"]["sessions"]) == 2
    assert s["stages"][1]["starts_from_previous_end"] is False
    assert sum(p["stages"][1]["changed"] for p in s["params"]) == len(s["params"])


def test_mode_new_refuses_an_existing_run_at_the_first_fit(tmp_path):
    run_dir = tmp_path / "run"
    custom_learner(tmp_path, cbs=[watching(run_dir)]).fit(1)
    learn = custom_learner(tmp_path, cbs=[watching(run_dir, mode="new")])
    with pytest.raises(FreezeFrameError, match="already holds a run"):
        learn.fit(1)
    with pytest.raises(FreezeFrameError, match="unknown option"):
        FreezeFrame(run_dir, evry=3)
    with pytest.raises(FreezeFrameError, match="mode"):
        FreezeFrame(run_dir, mode="replace")


# =============================================================================== nesting, interruption, safety
class ValidateInside(Callback):
    """Calls learn.validate() at the end of every epoch of a training fit (validate() fires
    after_epoch too: not from there)."""

    order = 50

    def __init__(self):
        self.inside = False

    def after_epoch(self):
        if not self.inside:
            self.inside = True
            try:
                self.learn.validate()
            finally:
                self.inside = False


def test_validate_inside_a_training_fit_is_not_counted(tmp_path):
    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path, cbs=[watching(run_dir, every=1)])
    fit = run_fit(learn, lambda: learn.fit(2, cbs=[ValidateInside()]))
    s = summary_of(run_dir)
    (st,) = s["stages"]
    n_train, n_valid = len(learn.dls.train), len(learn.dls.valid)
    assert st["steps"] == fit.steps == 2 * n_train
    assert fit.forwards == {"train": 2 * n_train, "eval": 4 * n_valid}  # the fit's and validate()'s
    assert st["forward_passes"] == {"train": 2 * n_train, "eval": 2 * n_valid}  # the fit's only
    assert mismatches_with_truth(s, 0, fit) == []


class Boom(Callback):
    order = 0

    def after_batch(self):
        if self.learn.training and self.learn.iter == 1:
            raise RuntimeError("boom")


def test_an_interrupted_fit_keeps_its_steps_and_the_next_fit_is_recorded(tmp_path):
    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path, cbs=[watching(run_dir, every=1)])
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(1, cbs=[Boom()])
    learn.validate()
    learn.fit(1)
    s = summary_of(run_dir)
    assert [st["name"] for st in s["stages"]] == ["fit(1)", "fit(1)"]
    assert [st["steps"] for st in s["stages"]] == [2, 4]
    assert s["stages"][1]["forward_passes"] == {"train": 4, "eval": 1}
    assert s["stages"][1]["starts_from_previous_end"] is True


def test_training_is_unchanged_by_the_callback(tmp_path):
    def train(cbs):
        learn = custom_learner(tmp_path, seed=3, cbs=cbs)
        learn.freeze()
        learn.fit_one_cycle(1)
        learn.unfreeze()
        learn.fit_one_cycle(1, lr_max=slice(1e-4, 1e-2))
        return snapshot(learn.model), torch.rand(1)

    plain, rng_plain = train([])
    watched, rng_watched = train([watching(tmp_path / "run", every=1)])
    assert not any(differs(plain[k], watched[k]) for k in plain)
    assert torch.equal(rng_plain, rng_watched)  # same RNG use


def test_an_internal_error_is_one_warning_and_training_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("simulated")

    monkeypatch.setattr(ff_fastai, "nominal_peaks", broken)
    cb = watching(tmp_path / "run", every=1)
    learn = custom_learner(tmp_path, seed=4, cbs=[cb])
    with pytest.warns(RuntimeWarning, match="freezeframe stopped recording.*simulated") as caught:
        learn.fit_one_cycle(2)
        learn.fit_one_cycle(1)
    assert len([w for w in caught if "freezeframe" in str(w.message)]) == 1
    # the watched learner trained exactly like an unwatched replay
    replay = custom_learner(tmp_path, seed=4)
    replay.fit_one_cycle(2)
    replay.fit_one_cycle(1)
    assert not any(differs(a, b) for a, b in zip(replay.model.state_dict().values(), learn.model.state_dict().values()))


def test_the_callback_pickles_without_its_recorder(tmp_path):
    cb = watching(tmp_path / "run", every=1)
    learn = custom_learner(tmp_path, cbs=[cb])
    learn.fit(1)
    learn.remove_cb(cb)
    clone = pickle.loads(pickle.dumps(cb))
    assert clone._ff.rec is None and clone.run_dir == cb.run_dir and clone.every == 1


def test_import_freezeframe_imports_no_framework():
    frameworks = ('fastai', 'fastcore', 'lightning', 'transformers', 'peft', 'trl')
    code = f"import sys, freezeframe; print(sorted(m for m in {frameworks!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class UnfreezeAfterFirstEpoch(Callback):
    order = 50

    def after_epoch(self):
        if self.learn.epoch == 0:
            self.learn.unfreeze()


def test_unfreezing_inside_a_fit_continues_the_stage_as_part_two(tmp_path):
    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path, cbs=[watching(run_dir, every=1)])
    learn.freeze()
    fit = run_fit(learn, lambda: learn.fit(2, cbs=[UnfreezeAfterFirstEpoch()]))
    s = summary_of(run_dir)
    assert [st["name"] for st in s["stages"]] == ["fit(2)", "fit(2) (part 2)"]
    assert [st["steps"] for st in s["stages"]] == [4, 4] and fit.steps == 8
    assert [st["tensors_trainable"] for st in s["stages"]] == [9, 13]
    assert s["stages"][1]["starts_from_previous_end"] is True
    assert [st["forward_passes"] for st in s["stages"]] == [{"train": 4, "eval": 1}] * 2


def test_a_callback_given_to_fine_tune_names_both_halves(tmp_path):
    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path)
    learn.fine_tune(1, cbs=[watching(run_dir, every=1)])  # fastai attaches it to each half in turn
    s = summary_of(run_dir)
    assert [st["name"] for st in s["stages"]] == ["fine_tune(1) · frozen", "fine_tune(1) · unfrozen"]
    assert len(s["run"]["sessions"]) == 2
    assert s["stages"][1]["starts_from_previous_end"] is True


def test_optimizer_state_of_an_optim_wrapper_is_the_torch_optimizers(tmp_path):
    """fastai's OptimWrapper around torch's AdamW: the stages' optimizer-state counts are the torch
    optimizer's own, and fine_tune's unfreeze() (OptimWrapper.clear_state: a new empty state) is
    the optimizer-state-reset finding."""
    from functools import partial

    from fastai.optimizer import OptimWrapper

    counts = []

    class Counts(Callback):
        order = 101  # after FreezeFrame

        def before_fit(self):
            counts.append([None, None])

        def before_step(self):
            if counts[-1][0] is None:
                counts[-1][0] = sum(1 for st in self.learn.opt.opt.state.values() if st)

        def after_fit(self):
            counts[-1][1] = sum(1 for st in self.learn.opt.opt.state.values() if st)

    run_dir = tmp_path / "run"
    learn = custom_learner(tmp_path, opt_func=partial(OptimWrapper, opt=torch.optim.AdamW),
                           cbs=[watching(run_dir, every=1), Counts()])
    learn.fine_tune(1)
    collect()
    run = freezeframe.load(run_dir)
    stages = run.manifest["stages"]
    assert [(s["optimizer_state_start"], s["optimizer_state_end"]) for s in stages] == \
        [([a], [b]) for a, b in counts]
    assert counts[0][1] > 0 and counts[1][0] == 0
    found = [f for f in run.findings() if f["code"] == "optimizer-state-reset"]
    assert [f["stage"] for f in found] == [1]


def test_every_and_mode_are_checked_when_the_callback_is_built(tmp_path):
    for bad in ({"every": 0}, {"every": True}, {"every": 1.5}, {"mode": "replace"}, {"no_such_option": 1}):
        with pytest.raises(FreezeFrameError):
            FreezeFrame(tmp_path / "run", **bad)
