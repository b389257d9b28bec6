"""`Recorder.log_epoch()` and the stages' `epoch_metrics`, from a plain loop and from real fastai,
Lightning and transformers trainers, against the values the frameworks themselves hold
(docs/recording.md, "Values of an epoch"; docs/run-format.md, "Epoch values")."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import freezeframe
from freezeframe.errors import RunError
from test_forward_order import FirstCalls


def manifest(run_dir) -> dict:
    return freezeframe.load(run_dir).manifest


def loop(model, opt, rec, epochs: int, batches: int, log=None):
    g = torch.Generator().manual_seed(0)
    for e in range(epochs):
        rec.epoch()
        for _ in range(batches):
            x = torch.randn(4, 3, generator=g)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if log is not None:
            log(e, loss)


# ====================================================================================== plain
def test_log_epoch_aligns_with_epoch_starts_merges_and_stores_nonfinite_as_null(run_dir):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    given = {}

    def log(e, loss):
        if e == 1:
            return  # an epoch given no values
        rec.log_epoch(train_loss=loss, accuracy=0.25 * e)
        rec.log_epoch(accuracy=0.5 + e, valid_loss=torch.tensor(float("nan")) if e == 2 else 1.0 / (e + 1))
        given[e] = float(loss)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with freezeframe.watch(model, opt, run_dir) as rec:
            loop(model, opt, rec, epochs=3, batches=2, log=log)
            rec.log_epoch(note="text", other=[1.0])  # skipped: one warning per key and type
            rec.log_epoch(note="again")
            with rec.stage("no values"):
                loop(model, opt, rec, epochs=1, batches=1)
    st = manifest(run_dir)["stages"]
    assert st[0]["epoch_starts"] == [0, 2, 4]
    assert st[0]["epoch_metrics"] == [
        {"train_loss": given[0], "accuracy": 0.5, "valid_loss": 1.0},
        None,
        {"train_loss": given[2], "accuracy": 2.5, "valid_loss": None},
    ]
    assert st[1]["epoch_starts"] == [6] and st[1]["epoch_metrics"] is None
    ours = [str(w.message) for w in caught if "log_epoch" in str(w.message)]
    assert len(ours) == 2 and any("note=" in m for m in ours) and any("other=" in m for m in ours), ours
    # the summary is strict JSON (no NaN)
    json.dumps(freezeframe.load(run_dir).summary(), allow_nan=False)


def test_values_without_an_epoch_under_way_are_one_warning_and_not_recorded(run_dir):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with freezeframe.watch(model, opt, run_dir) as rec:
            rec.log_epoch(valid_loss=1.0)  # no step yet
            for _ in range(2):
                model(torch.randn(2, 3)).sum().backward()
                opt.step()
            rec.log_epoch(valid_loss=2.0)  # no epoch announced
            rec.epoch()
            rec.log_epoch(valid_loss=3.0)  # announced, but no step applied in it yet
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
            rec.log_epoch(valid_loss=4.0)
    ours = [str(w.message) for w in caught if "log_epoch" in str(w.message)]
    assert len(ours) == 1, ours
    st = manifest(run_dir)["stages"]
    assert st[0]["epoch_starts"] == [2] and st[0]["epoch_metrics"] == [{"valid_loss": 4.0}]


def test_a_stage_split_inside_an_epoch_gives_the_values_to_the_later_part_and_appending_keeps_them(run_dir):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with freezeframe.watch(model, opt, run_dir) as rec:
        rec.epoch()
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        model[0].requires_grad_(False)  # a new stage in the same epoch
        opt.zero_grad(set_to_none=True)
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        rec.log_epoch(valid_loss=0.5)
    with freezeframe.watch(model, opt, run_dir, mode="append") as rec:
        loop(model, opt, rec, epochs=1, batches=1, log=lambda e, loss: rec.log_epoch(valid_loss=0.25))
    st = manifest(run_dir)["stages"]
    assert [s["epoch_starts"] for s in st] == [[0], [1], [2]]
    assert [s["epoch_metrics"] for s in st] == [None, [{"valid_loss": 0.5}], [{"valid_loss": 0.25}]]


def test_damaged_epoch_metrics_and_forward_order_are_refused_on_load(run_dir):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with freezeframe.watch(model, opt, run_dir) as rec:
        loop(model, opt, rec, epochs=2, batches=1, log=lambda e, loss: rec.log_epoch(loss=loss))
    path = run_dir / "manifest.json"
    good = json.loads(path.read_text())
    assert good["model"]["forward_order"] == [""] and len(good["stages"][0]["epoch_metrics"]) == 2
    for damage, field in ((lambda m: m["stages"][0]["epoch_metrics"].pop(), "stages[0].epoch_metrics"),
                          (lambda m: m["stages"][0]["epoch_metrics"].__setitem__(0, {"loss": "x"}),
                           "stages[0].epoch_metrics[0].loss"),
                          (lambda m: m["model"].__setitem__("forward_order", ["nope"]), "model.forward_order[0]")):
        m = json.loads(json.dumps(good))
        damage(m)
        path.write_text(json.dumps(m))
        with pytest.raises(RunError, match=field.replace("[", r"\[").replace("]", r"\]")):
            freezeframe.load(run_dir)


# ====================================================================================== fastai
def test_fastai_epoch_metrics_are_the_recorders_values_and_forward_order_the_hooks(tmp_path):
    pytest.importorskip("fastai")
    from fastai.callback.core import Callback
    from fastai.metrics import accuracy

    import fastai_helpers as fh

    class Values(Callback):
        """After every other callback: fastai's Recorder values of each training fit, and the
        forward order of the first training forward (the oracle's hooks, until the first step)."""
        order = 101

        def __init__(self):
            self.fits, self.calls = [], None

        def before_fit(self):
            if self.calls is None and self.learn.training is not None:
                self.calls = FirstCalls(self.learn.model)

        def after_step(self):
            self.calls.stop()

        def after_fit(self):
            if self.learn.recorder.values:
                rec = self.learn.recorder
                self.fits.append((list(rec.metric_names), [list(v) for v in rec.values]))

    run_dir = tmp_path / "run"
    truth = Values()
    with fh.one_thread():
        learn = fh.resnet_learner(tmp_path, n_train=8, bs=4, metrics=accuracy,
                                  cbs=[fh.watching(run_dir), truth])
        try:
            learn.fit_one_cycle(2, 1e-3)
            learn.unfreeze()
            learn.fit_one_cycle(1, slice(1e-5, 1e-3))
        finally:
            fh.collect()
    m = manifest(run_dir)
    stages = [s for s in m["stages"] if s["kind"] == "train"]
    assert len(stages) == len(truth.fits) == 2
    for st, (names, values) in zip(stages, truth.fits):
        keys = [n for n in names if n not in ("epoch", "time")]
        assert keys == ["train_loss", "valid_loss", "accuracy"]
        assert len(st["epoch_starts"]) == len(values)
        assert st["epoch_metrics"] == [dict(zip(keys, map(float, v))) for v in values]
    order = m["model"]["forward_order"]
    assert order == truth.calls.order and order[0] == "0.0" and order[-1] == "1.8"  # body conv1 .. head's last Linear


def test_fastai_epoch_with_cancelled_training_keeps_the_validation_names(tmp_path):
    """A CancelTrainException ends epoch 1's training after one step: fastai's Recorder row for
    that epoch holds only valid_loss and accuracy, which keep their names."""
    pytest.importorskip("fastai")
    from fastai.callback.core import Callback, CancelTrainException
    from fastai.metrics import accuracy
    from fastai.vision.all import resnet18

    import fastai_helpers as fh

    class CutTraining(Callback):
        order = 60  # after the Recorder (50): reads the values it just took

        def __init__(self):
            self.truth: list[dict] = []

        def before_epoch(self):
            self.truth.append({})

        def after_train(self):
            if not self.learn.recorder.cancel_train:
                self.truth[-1]["train_loss"] = float(self.learn.recorder.smooth_loss.value)

        def after_validate(self):
            rec = self.learn.recorder
            self.truth[-1].update(valid_loss=float(rec.loss.value), accuracy=float(rec.metrics[0].value))

        def after_batch(self):
            if self.training and self.epoch == 1:
                raise CancelTrainException

    run_dir = tmp_path / "run"
    cut = CutTraining()
    with fh.one_thread():
        learn = fh.resnet_learner(tmp_path, arch=resnet18, n_train=8, bs=4, metrics=accuracy,
                                  cbs=[fh.watching(run_dir), cut])
        try:
            learn.fit(2, 1e-3)
        finally:
            fh.collect()
    (st,) = [s for s in manifest(run_dir)["stages"] if s["kind"] == "train"]
    assert [len(v) for v in learn.recorder.values] == [3, 2]  # the cancelled epoch's row is short
    assert len(st["epoch_starts"]) == 2 and set(cut.truth[1]) == {"valid_loss", "accuracy"}
    assert st["epoch_metrics"] == cut.truth


# ====================================================================================== Lightning
def test_lightning_epoch_metrics_are_the_epoch_level_callback_metrics(tmp_path):
    pytest.importorskip("lightning")
    import logging

    from lightning.pytorch import LightningModule, Trainer

    import freezeframe.lightning as ffl

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class Net(LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
            self.head = nn.Linear(5, 3)
            self.unused = nn.Linear(3, 3)
            self.losses, self.val_losses, self.snapshots, self.calls = {}, {}, [], None

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.head(self.backbone(x)), y)  # submodules, not self(x)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            self.log("step_only", loss * 2, on_step=True, on_epoch=False)
            self.losses.setdefault(self.current_epoch, []).append(float(loss))
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.head(self.backbone(x))
            loss = nn.functional.cross_entropy(logits, y)
            self.log("val_loss", loss)
            self.log("val_acc", (logits.argmax(1) == y).float().mean())
            if not self.trainer.sanity_checking:
                self.val_losses.setdefault(self.current_epoch, []).append(float(loss))

        def on_train_start(self):
            self.calls = FirstCalls(self)  # after the callbacks' on_train_start (ours hooks there)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.calls.stop()

        def on_train_epoch_end(self):
            self.log("custom", float(self.current_epoch) + 0.5)  # after every callback's epoch end
            self.snapshots.append({k: float(v) for k, v in self.trainer.callback_metrics.items()})

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    ds = torch.utils.data.TensorDataset
    train = torch.utils.data.DataLoader(ds(x[:16], y[:16]), batch_size=4)
    valid = torch.utils.data.DataLoader(ds(x[16:], y[16:]), batch_size=4)
    net = Net()
    run_dir = tmp_path / "run"
    trainer = Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, callbacks=[ffl.FreezeFrame(run_dir)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, train, valid)
    (st,) = manifest(run_dir)["stages"]
    assert len(st["epoch_starts"]) == 3
    names = ["train_loss", "val_loss", "val_acc", "custom"]
    assert st["epoch_metrics"] == [{n: snap[n] for n in names} for snap in net.snapshots]
    assert {"step_only", "train_loss_step", "train_loss_epoch"} <= set(net.snapshots[0])  # there, left out
    for k, em in enumerate(st["epoch_metrics"]):  # the slow oracle: equal batches, plain means
        assert math.isclose(em["train_loss"], sum(net.losses[k]) / len(net.losses[k]), rel_tol=1e-6)
        assert math.isclose(em["val_loss"], sum(net.val_losses[k]) / len(net.val_losses[k]), rel_tol=1e-6)
        assert em["custom"] == k + 0.5
    order = manifest(run_dir)["model"]["forward_order"]
    assert order == net.calls.order == ["backbone.0", "backbone.2", "head"]


# ====================================================================================== transformers
def test_transformers_epoch_metrics_are_the_last_logged_values_of_each_epoch(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainerCallback

    import hf_helpers as hf
    from freezeframe.transformers import FreezeFrame

    run_dir = tmp_path / "run"
    truth = hf.Oracle()
    events: list = []  # None at each epoch begin, then every log as the Trainer gave it

    class Seen(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            events.append(None)

        def on_log(self, args, state, control, logs=None, **kw):
            events.append(dict(logs))

    torch.manual_seed(0)
    trainer = Trainer(model=hf.gpt2(), args=hf.training_args(tmp_path / "out", num_train_epochs=2,
                                                              eval_strategy="epoch", logging_steps=2),
                      train_dataset=hf.token_data(16), eval_dataset=hf.token_data(8, seed=1),
                      callbacks=[FreezeFrame(run_dir), truth, Seen()])
    trainer.train()
    (st,) = manifest(run_dir)["stages"]
    assert st["epoch_starts"] == [0, 4]
    # the oracle: every log in order, split at each epoch begin, the last value of each name
    per_epoch, current = [], None
    for entry in events:
        if entry is None:
            current = {}
            per_epoch.append(current)
        elif "train_runtime" not in entry:  # the summary of the whole train() is no epoch's
            current.update({k: float(v) for k, v in entry.items() if k != "epoch" and isinstance(v, (int, float))})
    assert st["epoch_metrics"] == per_epoch
    assert all("eval_loss" in e and "loss" in e for e in per_epoch)
    assert [e["eval_loss"] for e in per_epoch] == [ev["eval_loss"] for _, ev in truth.call["evals"]]
