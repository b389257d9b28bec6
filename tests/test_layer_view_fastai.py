"""The layer view and the scrubber's frames of a real fastai vision_learner(resnet34, pretrained=False)
(docs/report.md, "Layer view"): the frozen body's BatchNorm layers (train_bn), unfreeze(), fastai's
layout (body stem, body[4]..body[7], the head), against fastai's own flags, state dicts and counts."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import freezeframe
from freezeframe.analyse.timeline import layer_view
from test_layer_view import NORM, _timeline


def test_a_fastai_resnet34_reads_as_its_body_stem_stages_and_head(tmp_path):
    """fastai's vision_learner(resnet34): frozen body with trainable BatchNorm (train_bn), then
    unfreeze(). States against fastai's own requires_grad and the state dicts around each fit;
    frames against the epochs and batches fastai counted."""
    from fastai.callback.core import Callback

    from fastai_helpers import Truth, collect, one_thread, resnet_learner, watching

    class Count(Callback):
        order = 102

        def __init__(self):
            self.seen = []

        def after_step(self):
            self.seen.append((self.learn.epoch + 1, self.learn.iter + 1))

    truth, count = Truth(), Count()
    try:
        with one_thread():
            learn = resnet_learner(tmp_path, cbs=[watching(tmp_path / "run"), truth, count])
            learn.freeze()
            learn.fit_one_cycle(2)
            learn.unfreeze()
            learn.fit_one_cycle(1, lr_max=slice(1e-5, 1e-3))
            model = learn.model
        run = freezeframe.load(tmp_path / "run")
        summary = run.summary()
        lv = layer_view(summary)
        body_weights = [n for n, m in model[0].named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for layer in lv["layers"]:
            module = model.get_submodule(layer["module"])
            names = [f"{layer['module']}.{n}" for n, _ in module.named_parameters(recurse=False)]
            expected = []
            for fit in truth.parts:
                trains = [fit.trainable[n] for n in names]
                changed = [not torch.equal(fit.before[n].view(-1).view(torch.uint8), fit.after[n].view(-1).view(torch.uint8))
                           for n in names]
                if any(trains):
                    body_frozen = not any(fit.trainable[f"0.{n}.weight"] for n in body_weights)
                    expected.append("bn-only" if isinstance(module, NORM) and layer["part"] == "body" and body_frozen
                                    else "trained")
                else:
                    expected.append("changed-while-frozen" if any(changed) else "frozen-unchanged")
            assert layer["states"] == expected, layer["module"]
        assert {tuple(x["states"]) for x in lv["layers"]} == {("bn-only", "trained"), ("frozen-unchanged", "trained"),
                                                              ("trained", "trained")}
        body, head = lv["parts"]
        assert (body["name"], head["name"]) == ("body", "head")
        assert body["blocks"][0]["label"] == "stem"
        assert [lv["layers"][i]["label"] for i in body["blocks"][0]["layers"]] == ["body[0]", "body[1]"]
        parents = [b["parent_label"] for b in body["blocks"][1:]]
        assert parents == [f"body[{4 + s}]" for s, n in enumerate((3, 4, 6, 3)) for _ in range(n)]
        assert body["blocks"][1]["label"] == "body[4][0]"
        assert [(lv["layers"][i]["type"], lv["layers"][i]["weight_layer"]) for i in head["blocks"][0]["layers"]] == [
            ("BatchNorm1d", None), ("Linear", 34), ("BatchNorm1d", None), ("Linear", 35)]
        assert lv["counts"] == {"modules": 76, "weight_layers": 35, "shortcut_weight_layers": 3, "head_weight_layers": 2}
        tl = _timeline(run)
        assert list(zip(tl["frames"]["epoch"], tl["frames"]["batch"])) == count.seen == [(1, 1), (1, 2), (2, 1), (2, 2),
                                                                                           (1, 1), (1, 2)]
        assert tl["frames"]["stage"] == [0, 0, 0, 0, 1, 1]
        assert [ev["label"] for ev in tl["events"]] == ["unfreeze()"]
        lrs = [lr for fit in truth.parts for lr in fit.lrs]
        assert np.allclose(tl["lr"][-3:], np.array(lrs).T, rtol=1e-6)   # the groups of the optimizer that stepped
    finally:
        collect()
