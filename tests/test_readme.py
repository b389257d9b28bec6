"""Every code snippet of the README runs, as written, on small synthetic data (the test supplies what
a reader already has — `dls`, `model`, `train_loader` — and shortens fits; substitutions are listed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import freezeframe

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no snippet {name!r}"
    return m.group(1)


def substitute(code: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        assert old in code, f"the README snippet changed: {old!r} is no longer in it"
        code = code.replace(old, new)
    return code


def test_torch_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(snippet("torch"), "README.md:torch", "exec"), {})
    s = freezeframe.load(tmp_path / "runs" / "x").summary()
    assert [st["name"] for st in s["stages"]] == ["head only", "stage 1"]
    assert s["stages"][1]["starts_from_previous_end"] is True
    body = [p for p in s["params"] if int(p["name"].split(".")[0]) < 4]
    assert body and all(p["stages"][0]["trainable"] is False and p["stages"][0]["changed"] is False for p in body)
    assert all(p["stages"][1]["changed"] is True for p in s["params"])
    assert [g["lr_max"] for g in s["stages"][1]["groups"]] == [1e-4, 1e-3]


def test_fastai_snippet(tmp_path, monkeypatch):
    pytest.importorskip("fastai")
    from fastai_helpers import collect, image_dls, one_thread

    monkeypatch.chdir(tmp_path)
    code = substitute(snippet("fastai"), [
        # a reader's pretrained=True downloads ImageNet weights and freezes the body; here: offline,
        # and synthetic tensors carry no label type for fastai to infer the loss from
        ("resnet34, metrics=error_rate,",
         "resnet34, pretrained=False, metrics=error_rate, loss_func=CrossEntropyLossFlat(),"),
        ('cbs=FreezeFrame("runs/pets"))', 'cbs=FreezeFrame("runs/pets")); learn.freeze()'),
        ("learn.fit_one_cycle(4)", "learn.fit_one_cycle(1)"),
        ("learn.fit_one_cycle(10, lr_max", "learn.fit_one_cycle(1, lr_max"),
    ])
    ns = {"dls": image_dls(8, bs=4)}
    try:
        with one_thread():
            exec(compile(code, "README.md:fastai", "exec"), ns)
    finally:
        for cb in (ns["learn"].cbs if "learn" in ns else []):
            if type(cb).__name__ == "FreezeFrame":
                cb.close()
        collect()
    s = freezeframe.load(tmp_path / "runs" / "pets").summary()
    assert [st["name"] for st in s["stages"]] == ["fit_one_cycle(1)", "fit_one_cycle(1, lr_max=[1e-05, 0.0001, 0.001])"]
    assert [g["lr_max"] for g in s["stages"][1]["groups"]] == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)
    assert s["stages"][1]["starts_from_previous_end"] is True


def test_lightning_snippet(tmp_path, monkeypatch):
    pl = pytest.importorskip("lightning.pytorch")
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
            self.head = nn.Linear(16, 2)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

        def configure_optimizers(self):
            return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-3)

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,))), batch_size=8)
    code = substitute(snippet("lightning"), [
        ("pl.Trainer(max_epochs=2,", "pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, "
                                     "enable_checkpointing=False, enable_model_summary=False,"),
    ])
    exec(compile(code, "README.md:lightning", "exec"), {"model": Model(), "train_loader": loader})
    s = freezeframe.load(tmp_path / "runs" / "lit").summary()
    assert [st["name"] for st in s["stages"]] == ["fit", "fit (part 2)"]
    backbone = [p for p in s["params"] if p["name"].startswith("backbone")]
    assert all(p["stages"][0]["trainable"] is False and p["stages"][0]["changed"] is False for p in backbone)
    assert all(p["stages"][1]["trainable"] is True and p["stages"][1]["changed"] is True for p in backbone)
