"""The summary's `layers[]` and `run.layer_counts` (docs/summary-format.md, "layers[]"), from runs
written by the real Recorder, against forward pre-hooks and the models' own modules; and, on a
stored run whose manifest the test edits, the rules for an unobserved order (`forward_order`
null) and an order given by hand."""

from __future__ import annotations

import json

import torch
import torchvision
from torch import nn

import freezeframe
from freezeframe.analyse.layers import build_layers
from models import BodyHead, TiedLM, batch, build, loss_of


def forward_order(model: nn.Module, run) -> list[str]:
    """Oracle: the modules owning parameters directly, in the order of their first call in `run()`."""
    seen: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if next(m.parameters(recurse=False), None) is not None:
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.append(name) if name not in seen else None))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def _steps(model, opt, n, *, x=None, y=None, **kw):
    for s in range(n):
        xb, yb = (x, y) if x is not None else batch(model, s)
        opt.zero_grad()
        loss_of(model, xb, yb, **kw).backward()
        opt.step()


def test_a_torchvision_resnet34_reads_as_its_34_layers(run_dir):
    torch.manual_seed(0)
    model = torchvision.models.resnet34(weights=None)
    model.fc = nn.Linear(512, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    with torch.no_grad():
        model.eval()(x)  # a pass with autograd off: it is not the forward order
    model.train()
    order = forward_order(model, lambda: model(x).sum())  # the same first forward the run makes
    with freezeframe.watch(model, opt, run_dir, every=1):
        with torch.no_grad():
            model.eval()(x)
        model.train()
        _steps(model, opt, 2, x=x, y=y)
    s = freezeframe.load(run_dir).summary()
    layers = s["layers"]
    mods = dict(model.named_modules())
    assert [x["module"] for x in layers] == order and len(order) == 73
    assert [x["index"] for x in layers] == list(range(1, 74)) and all(x["ran"] is True for x in layers)
    assert all(x["type"] == type(mods[x["module"]]).__name__ for x in layers)
    assert all(x["params"] == [f"{x['module']}.{n}" for n, _ in mods[x["module"]].named_parameters(recurse=False)]
               for x in layers)
    convs = [n for n in order if isinstance(mods[n], (nn.Conv2d, nn.Linear)) and "downsample" not in n]
    assert len(convs) == 34 and {x["module"]: x["weight_layer"] for x in layers if x["weight_layer"]} == {
        n: i + 1 for i, n in enumerate(convs)}
    assert s["run"]["layer_counts"] == {"modules": 73, "weight_layers": 34, "shortcut_weight_layers": 3,
                                        "head_weight_layers": 1}
    by = {x["module"]: x for x in layers}
    assert (by["conv1"]["block"], by["layer1.0.conv1"]["block"], by["layer2.0.downsample.0"]["block"]) == (
        "conv1", "layer1.0", "layer2.0")
    assert by["layer2.0.downsample.1"]["branch"] == "shortcut" and by["layer2.0.conv1"]["branch"] == "main"
    assert by["fc"]["part"] == "head" and {x["part"] for x in layers if x["module"] != "fc"} == {"body"}
    assert {x["group"] for x in layers} == {0}


def test_modules_that_never_ran_follow_in_model_order_and_a_reused_module_counts_once(run_dir):
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(4, 4)  # defined, never called
            self.block = nn.Linear(4, 4)   # called twice
            self.stem = nn.Linear(4, 4)
            self.spare = nn.Conv1d(1, 1, 1)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.block(self.block(self.stem(x))))

    model = build(Reuse)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    order = forward_order(model, lambda: model(x))
    assert order == ["stem", "block", "out"]
    with freezeframe.watch(model, opt, run_dir, every=1):
        _steps(model, opt, 2, x=x, y=y)
    layers = freezeframe.load(run_dir).summary()["layers"]
    assert [(x["module"], x["ran"]) for x in layers] == [
        ("stem", True), ("block", True), ("out", True), ("unused", False), ("spare", False)]
    # numbered in forward order, those that ran first
    assert [x["weight_layer"] for x in layers] == [1, 2, 3, 4, 5]
    assert {x["part"] for x in layers} == {None}  # no head-like child, not fastai's layout


def _edit_manifest(run_dir, change) -> dict:
    path = run_dir / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))
    return m


def _body_head_run(run_dir):
    model = build(BodyHead)
    opt = torch.optim.SGD([{"params": ps} for ps in model.layer_groups()], lr=0.1)
    x, y = batch(model, 0)
    order = forward_order(model, lambda: model(x))
    with freezeframe.watch(model, opt, run_dir, every=1):
        _steps(model, opt, 2)
    assert freezeframe.load(run_dir).manifest["model"]["forward_order"] == order
    return model, order


def test_an_unobserved_order_is_model_order_with_ran_null(run_dir):
    model, order = _body_head_run(run_dir)
    assert order == ["", "body.0", "body.1", "body.3", "body.4", "head.0", "head.2"]  # the root's call comes first
    assert [x["module"] for x in freezeframe.load(run_dir).summary()["layers"]] == order
    _edit_manifest(run_dir, lambda m: m["model"].update(forward_order=None))  # e.g. a run written before it
    s = freezeframe.load(run_dir).summary()
    owning = [n for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    assert [x["module"] for x in s["layers"]] == owning == ["", "body.0", "body.1", "body.3", "body.4",
                                                             "head.0", "head.2"]
    assert [x["index"] for x in s["layers"]] == [1, 2, 3, 4, 5, 6, 7]
    assert all(x["ran"] is None for x in s["layers"])
    by = {x["module"]: x for x in s["layers"]}
    assert (by[""]["block"], by[""]["type"], by[""]["params"]) == ("", "BodyHead", ["temperature"])
    assert by["body.3"]["block"] == "body" and by["head.2"]["block"] == "head"
    assert [by[n]["weight_layer"] for n in ("body.0", "body.3", "head.0", "head.2")] == [1, 2, 3, 4]
    assert by["body.1"]["weight_layer"] is None
    assert {n: x["part"] for n, x in by.items()} == {"": None, "body.0": "body", "body.1": "body", "body.3": "body",
                                                    "body.4": "body", "head.0": "head", "head.2": "head"}
    # the group of each module: the param group holding its tensors (the model's own 3 groups)
    groups = {id(p): g for g, ps in enumerate(model.layer_groups()) for p in ps}
    mods = dict(model.named_modules())
    assert {n: x["group"] for n, x in by.items()} == {
        n: groups[id(next(mods[n].parameters(recurse=False)))] for n in by}
    assert s["run"]["layer_counts"] == {"modules": 7, "weight_layers": 4, "shortcut_weight_layers": 0,
                                        "head_weight_layers": 2}


def test_a_stored_order_is_followed_and_the_rest_come_after(run_dir):
    _body_head_run(run_dir)
    _edit_manifest(run_dir, lambda m: m["model"].update(forward_order=["head.2", "body.3", "head.0"]))
    s = freezeframe.load(run_dir).summary()
    assert [(x["module"], x["ran"]) for x in s["layers"]] == [
        ("head.2", True), ("body.3", True), ("head.0", True),
        ("", False), ("body.0", False), ("body.1", False), ("body.4", False)]
    assert [x["weight_layer"] for x in s["layers"]] == [1, 2, 3, None, 4, None, None]
    # the layers function alone, on the summary and the manifest's model map
    m = freezeframe.load(run_dir).manifest
    layers, counts = build_layers({**m["model"], "forward_order": ["body.0"]}, s["params"], s["stages"])
    assert [x["module"] for x in layers][:2] == ["body.0", ""] and counts["weight_layers"] == 4


def test_a_tied_weight_belongs_to_both_modules(run_dir):
    model = build(TiedLM)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1):
        _steps(model, opt, 1)
    by = {x["module"]: x for x in freezeframe.load(run_dir).summary()["layers"]}
    assert list(by) == ["emb", "proj", "out"]  # the forward order
    assert by["out"]["params"] == ["out.weight", "out.bias"] and by["emb"]["params"] == ["emb.weight"]
    assert by["out"]["group"] == by["emb"]["group"] == 0


def test_fastais_layout_and_shortcut_names(run_dir):
    """A Sequential of body "0" and head "1" (fastai's vision_learner layout), with a residual block
    whose projection is named `shortcut`."""
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.shortcut = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            return torch.relu(self.conv(x) + self.shortcut(x))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 1), Res()),
                          nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 6, 6), torch.tensor([0, 1])
    order = forward_order(model, lambda: model(x))
    with freezeframe.watch(model, opt, run_dir, every=1):
        _steps(model, opt, 1, x=x, y=y)
    s = freezeframe.load(run_dir).summary()
    assert [x["module"] for x in s["layers"]] == order
    by = {x["module"]: x for x in s["layers"]}
    assert {n: (x["part"], x["block"], x["branch"], x["weight_layer"]) for n, x in by.items()} == {
        "0.0": ("body", "0", "main", 1), "0.1.conv": ("body", "0.1", "main", 2),
        "0.1.shortcut.0": ("body", "0.1", "shortcut", None), "0.1.shortcut.1": ("body", "0.1", "shortcut", None),
        "1.2": ("head", "1", "main", 3)}
    assert s["run"]["layer_counts"] == {"modules": 5, "weight_layers": 3, "shortcut_weight_layers": 1,
                                        "head_weight_layers": 1}


def test_lora_factors_are_layers_but_not_weight_layers(run_dir):
    import pytest

    peft = pytest.importorskip("peft")

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = peft.get_peft_model(build(Two), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    order = forward_order(model, lambda: model(x))
    with freezeframe.watch(model, opt, run_dir, every=1):
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    s = freezeframe.load(run_dir).summary()
    assert [x["module"] for x in s["layers"]] == order
    numbered = {x["module"].rpartition("model.")[2]: x["weight_layer"] for x in s["layers"]}
    assert numbered == {"a.base_layer": 1, "a.lora_A.default": None, "a.lora_B.default": None, "b": 2}
    assert s["run"]["layer_counts"]["weight_layers"] == 2 and s["run"]["layer_counts"]["modules"] == 4
