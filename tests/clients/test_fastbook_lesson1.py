"""fastbook's first lesson (is it a cat?), as the book writes it: `ImageDataLoaders.from_name_func`
over image files named after their breed (cats capitalised), `vision_learner(dls, resnet34,
metrics=error_rate)`, `learn.lr_find()`, then `learn.fine_tune(1)`, under the freezeframe callback.
Every fact freezeframe states about each stage is compared with what the program itself saw: the
steps and epochs fastai ran, and fastai's own optimizer state (`learn.opt.state`).

Differences from the book, forced by this machine: `pretrained=False` (no hub), 15 random 32x32
PNG files instead of the Oxford-IIIT Pet images, `bs=4` (3 training batches: lr_find asks for
100 // 3 + 1 = 34 epochs, as on the pets with bs=64 it asks for 1 + 100 // 92).

With pretrained=False, lr_find trains every tensor and fastai's `zero_grad()` leaves their
gradients zero-filled; fine_tune then freezes the body, and decoupled weight decay still moves
the "frozen" body in its frozen epoch. The last tests show the trap and its fix
(docs/fastai.md).
"""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("fastai")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # lr_find() plots, as in the notebook

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.vision.all import (ImageDataLoaders, Resize, error_rate, get_image_files, resnet34,  # noqa: E402
                               set_seed, vision_learner)
from PIL import Image  # noqa: E402

import freezeframe  # noqa: E402
from freezeframe.fastai import FreezeFrame  # noqa: E402

BREEDS = ["Abyssinian", "Bengal", "Persian", "beagle", "boxer"]  # cats upper case, dogs lower
LR_FIND_EPOCHS = 100 // 3 + 1


def is_cat(x): return x[0].isupper()


class Truth(Callback):
    """What fastai ran, per fit: applied steps, the epochs they fell in, and fastai's optimizer
    state (tensors with an Adam step count) before the fit's first step and as the fit returns."""

    order = 101  # after FreezeFrame (100): the state it reads at each event is the one seen here
    run_valid = False

    def __init__(self):
        self.fits: list[dict] = []

    def _with_state(self) -> int:
        return sum(1 for st in self.learn.opt.state.values() if "step" in st)

    def before_fit(self):
        self.fits.append({"steps": 0, "epochs": [], "state_start": None, "state_end": None,
                          "frozen_grads": sum(1 for p in self.learn.model.parameters()
                                              if not p.requires_grad and p.grad is not None)})
        self.fits[-1]["trainable"] = sum(1 for pl in self.learn.opt.param_lists for p in pl if p.requires_grad)
        self._frozen = {n: p.detach().clone() for n, p in self.learn.model.named_parameters() if not p.requires_grad}

    def before_step(self):
        fit = self.fits[-1]
        if fit["steps"] == 0:
            fit["state_start"] = self._with_state()

    def after_step(self):
        fit = self.fits[-1]
        fit["steps"] += 1
        if not fit["epochs"] or fit["epochs"][-1][0] != self.epoch:
            fit["epochs"].append([self.epoch, fit["steps"] - 1])

    def after_fit(self):
        self.fits[-1]["state_end"] = self._with_state()
        now = dict(self.learn.model.named_parameters())
        self.fits[-1]["frozen_changed"] = sorted(n for n, w in self._frozen.items() if not torch.equal(w, now[n]))


def _images(path, seed=0):
    rng = np.random.default_rng(seed)
    for breed in BREEDS:
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path / f"{breed}_{i}.png")
    return path


def lesson(tmp_path, fix: bool):
    path = _images(tmp_path)
    run_dir = tmp_path / "run"
    set_seed(42)
    torch.set_num_threads(1)
    dls = ImageDataLoaders.from_name_func(
        path, get_image_files(path), valid_pct=0.2, seed=42,
        label_func=is_cat, item_tfms=Resize(32), bs=4, num_workers=0)
    truth = Truth()
    cb = FreezeFrame(run_dir, every=1)
    learn = vision_learner(dls, resnet34, pretrained=False, metrics=error_rate, cbs=[cb, truth])
    learn.lr_find()
    if fix:  # the fix docs/fastai.md gives: no gradient left on any tensor before fine_tune
        for p in learn.model.parameters():
            p.grad = None
    learn.fine_tune(1)
    cb.close()
    return {"learn": learn, "truth": truth, "run": freezeframe.load(run_dir)}


def _module_lesson(tmp_path_factory, name: str, fix: bool):
    threads = torch.get_num_threads()
    try:
        yield lesson(tmp_path_factory.mktemp(name), fix=fix)
    finally:
        torch.set_num_threads(threads)
        gc.collect()


@pytest.fixture(scope="module")
def lesson1(tmp_path_factory):
    yield from _module_lesson(tmp_path_factory, "fastbook", fix=False)


@pytest.fixture(scope="module")
def lesson1_fixed(tmp_path_factory):
    yield from _module_lesson(tmp_path_factory, "fastbook_fixed", fix=True)


def test_every_stage_states_the_steps_and_epochs_it_ran(lesson1):
    stages = lesson1["run"].manifest["stages"]
    assert [(s["name"], s["kind"]) for s in stages] == [
        ("lr_find()", "trial"), ("fine_tune(1) · frozen", "train"), ("fine_tune(1) · unfrozen", "train")]
    assert len(lesson1["truth"].fits) == 3
    first = 0
    for st, fit in zip(stages, lesson1["truth"].fits):
        assert (st["first_step"], st["steps"]) == (first, fit["steps"]), st["name"]
        assert st["epochs"] == len(fit["epochs"]), st["name"]
        assert st["epoch_starts"] == [first + k for _, k in fit["epochs"]], st["name"]
        first += fit["steps"]
    lr_find = stages[0]
    # lr_find asked for 34 epochs and stopped early (loss diverged or num_it reached)
    assert lr_find["epochs_planned"] == LR_FIND_EPOCHS
    assert lr_find["epochs"] < LR_FIND_EPOCHS and lr_find["steps"] <= 100
    assert [s["epochs_planned"] for s in stages[1:]] == [1, 1]


def test_optimizer_state_counts_are_fastais_own(lesson1):
    stages = lesson1["run"].manifest["stages"]
    for st, fit in zip(stages, lesson1["truth"].fits):
        assert st["optimizer_state_start"] == [fit["state_start"]], st["name"]
        assert st["optimizer_state_end"] == [fit["state_end"]], st["name"]
    frozen, unfrozen = lesson1["truth"].fits[1:]
    assert frozen["state_end"] > 0 and unfrozen["state_start"] == 0  # unfreeze() -> opt.clear_state()


def test_unfreeze_clearing_adams_state_is_a_finding(lesson1):
    found = [f for f in lesson1["run"].findings() if f["code"] == "optimizer-state-reset"]
    stages = lesson1["run"].summary()["stages"]
    assert [stages[f["stage"]]["name"] for f in found] == ["fine_tune(1) · unfrozen"]


def test_zero_filled_gradients_move_the_frozen_body_and_the_stage_says_why(lesson1):
    learn, run = lesson1["learn"], lesson1["run"]
    frozen = run.manifest["stages"][1]
    fact = frozen["meta"]["fastai_zero_grads_frozen"]
    truth = lesson1["truth"].fits[1]
    assert fact["tensors"] == truth["frozen_grads"] > 0
    assert fact["zero_filled"] == fact["tensors"]
    assert fact["cause"] == "lr_find"
    assert fact["weight_decay"] == pytest.approx(learn.wd if learn.wd is not None else 0.01)
    assert fact["decoupled"] is True and 0 < fact["decayed"] <= fact["tensors"]
    # the truth: frozen tensors moved in the frozen half (the program's own tensors, compared)
    assert truth["frozen_changed"]
    found = [f for f in run.findings() if f["code"] == "frozen-param-changed"]
    assert [run.summary()["stages"][f["stage"]]["name"] for f in found] == ["fine_tune(1) · frozen"]
    assert sorted(found[0]["params"]) == truth["frozen_changed"]
    # the cause is named because every tensor that moved is one the integration saw holding a gradient
    assert len(fact["names"]) == fact["tensors"] and set(truth["frozen_changed"]) <= set(fact["names"])
    assert "lr_find left zero-filled gradients" in found[0]["message"]
    # no such fact where nothing frozen holds a gradient
    assert "fastai_zero_grads_frozen" not in run.manifest["stages"][0]["meta"]
    assert "fastai_zero_grads_frozen" not in run.manifest["stages"][2]["meta"]


def test_the_documented_fix_keeps_the_frozen_body_bitwise_unchanged(lesson1_fixed):
    run = lesson1_fixed["run"]
    frozen = run.manifest["stages"][1]
    assert "fastai_zero_grads_frozen" not in frozen["meta"]
    assert lesson1_fixed["truth"].fits[1]["frozen_grads"] == 0
    assert not [f for f in run.findings() if f["code"] == "frozen-param-changed"]
    assert lesson1_fixed["truth"].fits[1]["frozen_changed"] == []  # the program's own tensors
    # no step touched a frozen tensor: Adam holds state for the trainable ones only
    fit = lesson1_fixed["truth"].fits[1]
    assert frozen["optimizer_state_end"] == [fit["state_end"]] == [fit["trainable"]]
    k = 1
    summary = run.summary()
    frozen_params = [p for p in summary["params"] if p["stages"][k]["trainable"] is False]
    assert frozen_params and all(p["stages"][k]["changed"] is False for p in frozen_params)
