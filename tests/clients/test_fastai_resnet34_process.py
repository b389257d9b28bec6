"""The process of a fastai fine-tune, as the summary tells it, against what the program itself saw:
`vision_learner(dls, resnet34, pretrained=False, metrics=accuracy)` and `fine_tune(2,
freeze_epochs=1)` (fastai freezes the body, fits 1 epoch, unfreezes, fits 2 epochs with
`slice(1e-5, 1e-3)`), on random 32x32 images in 4 training batches of 4.

The oracles are the test's own: forward pre-hooks on every module owning parameters during the
first training batch (the forward order), the model's modules (types, tensors, blocks), the
state dicts and requires_grad around each fit, fastai's optimizer (param lists, state, frozen
groups), a callback counting applied steps per epoch, and `learn.recorder.values`."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

pytest.importorskip("fastai")

import torch  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.vision.all import CrossEntropyLossFlat, accuracy, resnet34, set_seed, vision_learner  # noqa: E402
from torch import nn  # noqa: E402

import freezeframe  # noqa: E402
from fastai_helpers import collect, differs, image_dls, one_thread, quiet, run_fit, watching  # noqa: E402

WEIGHT_TYPES = (nn.Conv2d, nn.Linear)


class Process(Callback):
    """What fastai did, seen after every other callback: the forward order of the modules that own
    parameters in the first training batch, the applied steps and the epoch each began in, the
    optimizer at each fit's first step, and the Recorder's values as each fit returns."""

    order = 101

    def __init__(self):
        self.forward: list[str] = []
        self.handles: list = []
        self.steps = 0
        self.epoch_starts: list[list[int]] = []
        self.opt: list[dict] = []
        self.values: list[dict] = []
        self._cancel = False
        self._first = self._new_epoch = False

    def hook_forward(self, model):
        def hook_for(name):
            def pre(module, args):
                if torch.is_grad_enabled() and name not in self.forward:
                    self.forward.append(name)
            return pre
        for name, m in model.named_modules():
            if next(m.parameters(recurse=False), None) is not None:
                self.handles.append(m.register_forward_pre_hook(hook_for(name)))

    def before_fit(self):
        self.epoch_starts.append([])
        self._first = True

    def before_epoch(self):
        self._new_epoch = True

    def before_step(self):
        if self._first:
            opt = self.learn.opt
            self.opt.append({"id": id(opt), "lists": [[id(p) for p in pl] for pl in opt.param_lists],
                             "state": sum(1 for st in opt.state.values() if "step" in st),
                             "frozen_idx": opt.frozen_idx})
            self._first = False

    def after_cancel_step(self):
        self._cancel = True

    def after_step(self):
        for h in self.handles:  # the order of the first training forward, before the first step
            h.remove()
        self.handles = []
        if self._cancel:
            self._cancel = False
            return
        if self._new_epoch:
            self.epoch_starts[-1].append(self.steps)
            self._new_epoch = False
        self.steps += 1

    def after_fit(self):
        rec = self.learn.recorder
        names = [n for n in rec.metric_names if n not in ("epoch", "time")]
        self.values.append({"names": names, "values": [list(v) for v in rec.values],
                            "state_end": sum(1 for st in self.learn.opt.state.values() if "step" in st)})


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resnet34")
    with one_thread():
        set_seed(0)
        process = Process()
        run_dir = tmp / "run"
        learn = quiet(vision_learner(image_dls(16, bs=4, size=32), resnet34, pretrained=False, metrics=accuracy,
                                     loss_func=CrossEntropyLossFlat(), path=tmp,
                                     cbs=[watching(run_dir, every=1), process]))
        process.hook_forward(learn.model)
        fit = run_fit(learn, lambda: learn.fine_tune(2, freeze_epochs=1))
        summary = freezeframe.load(run_dir).summary()
    yield {"learn": learn, "process": process, "fit": fit, "s": summary}
    collect()


def _block(model, name: str) -> str:
    """The nearest enclosing module that is not a Sequential (nor the root), read off the model."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc = ".".join(parts[:i])
        if not isinstance(model.get_submodule(anc), (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return anc
    return parts[0]


def test_layers_are_the_modules_in_the_order_the_forward_pass_ran_them(fine_tuned):
    model, order, s = fine_tuned["learn"].model, fine_tuned["process"].forward, fine_tuned["s"]
    mods = dict(model.named_modules())
    owning = [n for n, m in mods.items() if next(m.parameters(recurse=False), None) is not None]
    assert len(order) == len(owning) == 76  # every parameterised module of fastai's resnet34 ran
    layers = s["layers"]
    assert [x["module"] for x in layers] == order
    assert [x["index"] for x in layers] == list(range(1, 77))
    assert all(x["ran"] is True for x in layers)
    for x in layers:
        m = mods[x["module"]]
        assert x["type"] == type(m).__name__
        assert x["params"] == [f"{x['module']}.{n}" for n, _ in m.named_parameters(recurse=False)]
        assert x["block"] == _block(model, x["module"])
        assert x["part"] == ("body" if x["module"].startswith("0.") else "head")
        assert x["branch"] == ("shortcut" if ".downsample." in x["module"] else "main")
    # the last fit's optimizer groups, from fastai's own param lists
    group = {pid: g for g, pl in enumerate(fine_tuned["process"].opt[-1]["lists"]) for pid in pl}
    for x in layers:
        assert x["group"] == group[id(mods[x["module"]].weight)], x["module"]


def test_weight_layers_are_numbered_as_the_network_counts_them(fine_tuned):
    model, order, s = fine_tuned["learn"].model, fine_tuned["process"].forward, fine_tuned["s"]
    mods = dict(model.named_modules())
    weights = [n for n in order if isinstance(mods[n], WEIGHT_TYPES)]
    main = [n for n in weights if "downsample" not in n]
    shortcut = [n for n in weights if "downsample" in n]
    head = [n for n in main if n.startswith("1.")]
    assert (len(main), len(shortcut), len(head)) == (35, 3, 2)  # 33 main-path convs + fastai's 2 Linear
    numbered = {x["module"]: x["weight_layer"] for x in s["layers"]}
    assert {n: numbered[n] for n in main} == {n: i + 1 for i, n in enumerate(main)}
    assert all(v is None for n, v in numbered.items() if n not in main)
    assert s["run"]["layer_counts"] == {"modules": 76, "weight_layers": 35, "shortcut_weight_layers": 3,
                                        "head_weight_layers": 2}


def test_the_transition_is_what_unfreeze_did(fine_tuned):
    fit, process, s = fine_tuned["fit"], fine_tuned["process"], fine_tuned["s"]
    frozen, unfrozen = fit.parts
    assert [st["name"] for st in s["stages"]] == ["fine_tune(2) · frozen", "fine_tune(2) · unfrozen"]
    (t,) = s["transitions"]
    assert (t["stage"], t["from_stage"], t["event"]) == (1, 0, "unfreeze()")
    names = [n for n, _ in fine_tuned["learn"].model.named_parameters()]
    assert t["became_trainable"] == [n for n in names if not frozen.trainable[n] and unfrozen.trainable[n]]
    assert len(t["became_trainable"]) > 0
    assert t["became_frozen"] == [n for n in names if frozen.trainable[n] and not unfrozen.trainable[n]] == []
    # unfreeze() writes no value: every parameter and buffer at the second fit's start is the first's end
    kept = [k for k in frozen.after if differs(frozen.after[k], unfrozen.before[k])]
    assert t["values_changed"] == kept == [] and t["values_kept"] is True
    a, b = process.opt
    assert a["id"] == b["id"] and a["lists"] == b["lists"] and t["optimizer"] == "same"
    assert process.values[0]["state_end"] > 0 and b["state"] == 0 and t["optimizer_state_reset"] is True
    assert len(t["groups"]) == len(b["lists"]) == 3
    for g, row in enumerate(t["groups"]):
        assert (row["index"], row["name"], row["optimizer"]) == (g, f"pg{g}", 0)
        assert row["lr_before"] == pytest.approx(frozen.lrs[-1][g], rel=1e-12)
        assert row["lr_after"] == pytest.approx(unfrozen.lrs[0][g], rel=1e-12)
        assert row["tensors_before"] == len(a["lists"][g]) and row["tensors_after"] == len(b["lists"][g])
    # fine_tune halves base_lr (2e-3) and fits slice(base_lr / 100, base_lr): geometric over 3 groups
    assert [row["lr_max_after"] for row in t["groups"]] == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-9)


def test_the_first_fit_starts_from_the_freeze_fine_tune_made(fine_tuned):
    fit, process, s = fine_tuned["fit"], fine_tuned["process"], fine_tuned["s"]
    frozen = fit.parts[0]
    init = s["stages"][0]["initial_state"]
    names = [n for n, _ in fine_tuned["learn"].model.named_parameters()]
    assert init["frozen"] == [n for n in names if not frozen.trainable[n]]
    assert init["trainable"] == [n for n in names if frozen.trainable[n]]
    assert init["frozen_groups"] == list(range(process.opt[0]["frozen_idx"])) == [0, 1]
    assert "fine_tune" in init["note"] and "freeze()" in init["note"]
    assert s["stages"][1]["initial_state"] is None


def test_epochs_and_their_values_are_fastais(fine_tuned):
    process, s = fine_tuned["process"], fine_tuned["s"]
    assert [st["epoch_starts"] for st in s["stages"]] == process.epoch_starts == [[0], [4, 8]]
    for st, rec in zip(s["stages"], process.values):
        assert len(st["epoch_metrics"]) == len(rec["values"]) == len(st["epoch_starts"])
        assert rec["names"] == ["train_loss", "valid_loss", "accuracy"]
        for k, (entry, row) in enumerate(zip(st["epoch_metrics"], rec["values"])):
            assert (entry["epoch"], entry["first_step"]) == (k, st["epoch_starts"][k])
            assert list(entry["values"]) == rec["names"]
            for name, v in zip(rec["names"], row):
                assert math.isclose(entry["values"][name], float(v), rel_tol=1e-12), (name, k)


def _kinds(types: list[str]) -> str:
    c = Counter(types)
    order = sorted(c, key=lambda t: (t != "Linear" and not t.startswith("Conv"), types.index(t)))
    words = [f"{c[t]} {t}" for t in order]
    return (words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}") + " layers"


def test_the_answers_speak_in_epochs_and_name_what_trained(fine_tuned):
    learn, fit, process, s = fine_tuned["learn"], fine_tuned["fit"], fine_tuned["process"], fine_tuned["s"]
    a1 = s["answers"][0]["answer"]
    batches = len(learn.dls.train)
    frozen, unfrozen = fit.parts
    assert batches == 4 and (frozen.steps, unfrozen.steps) == (4, 8)
    assert (f"Stage 0 (fine_tune(2) · frozen) ran 1 epoch = 1 pass over the {batches} training batches = "
            f"{frozen.steps} optimizer steps") in a1
    assert (f"Stage 1 (fine_tune(2) · unfrozen) ran 2 epochs = 2 passes over the {batches} training batches = "
            f"{unfrozen.steps} optimizer steps") in a1
    # which kinds of layers trained while the body was frozen: requires_grad at the frozen fit's start
    mods = dict(learn.model.named_modules())
    trained = [n for n in process.forward if any(frozen.trainable[f"{n}.{p}"] for p, _ in
                                                 mods[n].named_parameters(recurse=False))]
    head = [type(mods[n]).__name__ for n in trained if n.startswith("1.")]
    body = [type(mods[n]).__name__ for n in trained if n.startswith("0.")]
    assert head == ["BatchNorm1d", "Linear", "BatchNorm1d", "Linear"] and set(body) == {"BatchNorm2d"}
    assert (f"While the body was frozen, these layers trained: the head's {_kinds(head)}, and {_kinds(body)} of "
            "the body (fastai's train_bn).") in a1
    assert "the head's 2 Linear and 2 BatchNorm1d layers, and 36 BatchNorm2d layers of the body" in a1
    # BatchNorm running statistics per stage, from the state dicts; the largest from W_ref (the start)
    ref = frozen.before
    for k, part in enumerate(fit.parts):
        moved = {n.rpartition(".")[0] for n in part.before if n.endswith(("running_mean", "running_var"))
                 and differs(part.before[n], part.after[n])}
        owners = {n.rpartition(".")[0] for n in part.before if n.endswith("running_mean")}
        assert len(moved) == len(owners) == 38
        rel = {n: float((part.after[n].double() - ref[n].double()).norm() / ref[n].double().norm())
               for n in part.after if n.endswith(("running_mean", "running_var")) and ref[n].norm() > 0}
        top = max(rel, key=rel.get)
        said = re.findall(r"The running statistics \(running_mean, running_var\) of all 38 BatchNorm layers moved"
                          r"[^;]*; largest: (\S+), ([0-9.e+-]+) % from its value when watching began", a1)
        assert len(said) == 2, a1
        name, pct = said[k]
        assert name == top and math.isclose(float(pct), 100 * rel[top], rel_tol=5e-3)
