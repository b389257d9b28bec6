"""`freezeframe diff` on checkpoints written by the real tools, against an oracle computed here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from freezeframe.analyse.diff import diff_state_dicts
from freezeframe.store.checkpoint import CheckpointError, load_checkpoint
from models import SmallCNN, build


def oracle_rel(a: torch.Tensor, b: torch.Tensor):
    a, b = a.double().flatten().tolist(), b.double().flatten().tolist()
    na = math.sqrt(sum(x * x for x in a))
    d = math.sqrt(sum((y - x) ** 2 for x, y in zip(a, b)))
    nb = math.sqrt(sum(y * y for y in b))
    cos = sum(x * y for x, y in zip(a, b)) / (na * nb) if na and nb else None
    return (d / na if na else None), (1 - cos if cos is not None else None)


def check_against_oracle(result: dict, a: dict, b: dict) -> None:
    by_name = {p["name"]: p for p in result["params"]}
    assert set(by_name) == set(a) & set(b)
    for name, p in by_name.items():
        assert p["changed"] == (not (a[name].dtype == b[name].dtype and a[name].shape == b[name].shape and
                                     a[name].numpy().tobytes() == b[name].numpy().tobytes())), name
        rel, cos = oracle_rel(a[name], b[name])
        if rel is None:
            assert p["drift_rel"] is None
        else:
            assert p["drift_rel"] == pytest.approx(rel, rel=1e-9, abs=1e-12), name
        if cos is not None:
            assert p["cosine_distance"] == pytest.approx(cos, rel=1e-6, abs=1e-9), name


def perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
        model.features[0].weight.mul_(1.01)
    return model


def test_state_dict_vs_safetensors(tmp_path, freezeframe_exe, cli_env):
    from safetensors.torch import save_file

    model = build(SmallCNN)
    torch.save(model.state_dict(), tmp_path / "a.pth")
    a = {k: v.clone() for k, v in model.state_dict().items()}
    perturbed(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "b.safetensors")
    b = {k: v.clone() for k, v in model.state_dict().items()}
    out = subprocess.run([freezeframe_exe, "diff", str(tmp_path / "a.pth"), str(tmp_path / "b.safetensors"), "--json"],
                         capture_output=True, text=True, env=cli_env, check=True)
    result = json.loads(out.stdout)
    assert result["schema"] == "freezeframe.diff/1"
    check_against_oracle(result, a, b)
    assert {p["name"] for p in result["params"] if p["changed"]} == {"classifier.weight", "features.0.weight"}
    assert result["only_in_a"] == [] and result["only_in_b"] == []


def test_ddp_and_compile_prefixes_are_normalised(tmp_path):
    model = build(SmallCNN)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    torch.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, tmp_path / "compiled.pth")
    r = diff_state_dicts(load_checkpoint(tmp_path / "ddp.pth"), load_checkpoint(tmp_path / "compiled.pth"))
    assert r["totals"]["changed"] == 0 and r["only_in_a"] == [] and len(r["params"]) == len(model.state_dict())


def test_shape_change_and_keys_on_one_side(tmp_path):
    a = build(SmallCNN).state_dict()
    b = build(SmallCNN, n_classes=5).state_dict()
    b["extra.weight"] = torch.ones(2)
    r = diff_state_dicts(a, b)
    fc = next(p for p in r["params"] if p["name"] == "classifier.weight")
    assert fc["shape_a"] == [3, 6] and fc["shape_b"] == [5, 6] and fc["changed"] and fc["drift_rel"] is None
    assert r["only_in_b"] == ["extra.weight"]


def test_fastai_learn_save_with_optimizer_state(tmp_path):
    fastai_data = pytest.importorskip("fastai.data.core")
    import fastai.callback.progress  # noqa: F401 - Learner.no_bar
    import fastai.callback.schedule  # noqa: F401 - Learner.fit_one_cycle
    from fastai.learner import Learner
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,)))
    dls = fastai_data.DataLoaders.from_dsets(ds, ds, bs=8, device="cpu")
    model = build(SmallCNN)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    learn.save("before", with_opt=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-2)
    learn.save("after", with_opt=True)
    raw = torch.load(tmp_path / "models" / "after.pth", map_location="cpu", weights_only=False)
    assert "opt" in raw  # the file really holds optimizer state (hypers with numpy scalars)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    r = diff_state_dicts(load_checkpoint(tmp_path / "models" / "before.pth"),
                         load_checkpoint(tmp_path / "models" / "after.pth"))
    check_against_oracle(r, before, after)
    assert r["totals"]["changed"] > 0


def test_lightning_checkpoint(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"lr": 0.1, "where": tmp_path})
            self.net = build(SmallCNN)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    mod = Module()
    start = {k: v.clone() for k, v in mod.state_dict().items()}
    torch.save(mod.state_dict(), tmp_path / "start.pth")
    dl = DataLoader(TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))), batch_size=8)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(mod, dl)
    ckpt = tmp_path / "end.ckpt"
    trainer.save_checkpoint(ckpt)
    r = diff_state_dicts(load_checkpoint(tmp_path / "start.pth"), load_checkpoint(ckpt))
    check_against_oracle(r, start, {k: v.clone() for k, v in mod.state_dict().items()})
    assert r["totals"]["changed"] > 0


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, freezeframe_exe, cli_env):
    marker = tmp_path / "ran"
    evil = _RunsCode()
    evil.marker = marker
    torch.save({"w": torch.ones(3), "x": evil}, tmp_path / "evil.pth")
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pth")
    with pytest.raises(CheckpointError, match="evil.pth.*(refused|would run code)"):
        load_checkpoint(tmp_path / "evil.pth")
    out = subprocess.run([freezeframe_exe, "diff", str(tmp_path / "ok.pth"), str(tmp_path / "evil.pth")],
                         capture_output=True, text=True, env=cli_env)
    assert out.returncode == 2 and "evil.pth" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no-tensors", "missing"])
def test_damaged_files_give_one_line(tmp_path, damage, freezeframe_exe, cli_env):
    good = tmp_path / "good.pth"
    torch.save(build(SmallCNN).state_dict(), good)
    bad = tmp_path / "bad.pth"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00\x01not a checkpoint" * 10)
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "no-tensors":
        torch.save({"epoch": 3, "name": "x"}, bad)
    out = subprocess.run([freezeframe_exe, "diff", str(good), str(bad)], capture_output=True, text=True, env=cli_env)
    assert out.returncode == 2, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.pth" in lines[0] and "Traceback" not in out.stderr, out.stderr
