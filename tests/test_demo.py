"""`freezeframe demo` as a user runs it: a subprocess, a cold cache in a temporary directory."""

from __future__ import annotations

import json
import subprocess

import pytest

import freezeframe


def run_demo(tmp_path, freezeframe_exe, cli_env, out_name, *extra):
    env = dict(cli_env, FREEZEFRAME_CACHE=str(tmp_path / "cache"), COLUMNS="120")
    out = tmp_path / out_name
    proc = subprocess.run([freezeframe_exe, "demo", "--out", str(out), "--epochs", "2,3", "--pretrain-epochs", "4",
                           *extra], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import os
    import sys
    from pathlib import Path

    tmp = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    exe = str(Path(sys.executable).parent / "freezeframe")
    out, stdout = run_demo(tmp, exe, env, "run")
    return tmp, exe, env, out, stdout


def test_demo_writes_run_report_and_pngs(demo):
    tmp, _, _, out, stdout = demo
    assert (out / "manifest.json").exists()
    assert (out / "report.html").stat().st_size > 100_000
    for name in ("freeze_map", "update_heatmap", "learning_rates", "drift", "loss"):
        assert (out / "png" / f"{name}.png").stat().st_size > 5_000, name
    for text in ("Freeze map", "The three questions", "Accuracy on held-out digits", "report.html",
                 "pretraining on digits 0-4", "trained now and cached"):
        assert text in stdout, text


def _oracle_structure(model):
    """Counted from the module tree itself: BasicBlocks per stage, main-path convolutions, Linear
    layers, and convolutions inside a block's `downsample` (the projection shortcuts)."""
    from torch import nn

    named = dict(model.named_modules())
    convs = [n for n, m in named.items() if isinstance(m, nn.Conv2d)]
    return {"blocks": [len(named[f"layer{i}"]) for i in range(1, 5)],
            "main_convs": [n for n in convs if ".downsample." not in n],
            "shortcut_convs": [n for n in convs if ".downsample." in n],
            "linear": [n for n, m in named.items() if isinstance(m, nn.Linear)]}


def test_demo_network_has_resnet34s_structure_at_an_eighth_of_its_widths():
    """Checked against torchvision's resnet34 itself: the same parameterised modules under the same
    names and types, the same kernel sizes and strides in the blocks, 1/8 the channels."""
    import torch
    from torch import nn
    from torchvision.models import resnet34

    from freezeframe.demo_model import DigitResNet34

    ours, real = DigitResNet34(), resnet34()
    st = _oracle_structure(ours)
    assert st["blocks"] == [3, 4, 6, 3]
    assert len(st["main_convs"]) == 33 and st["linear"] == ["fc"]
    assert st["shortcut_convs"] == ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    assert _oracle_structure(real) == st
    own = lambda m: {n: x for n, x in m.named_modules() if list(x.parameters(recurse=False))}  # noqa: E731
    a, b = own(ours), own(real)
    assert list(a) == list(b) and len(a) == 73
    for name, m in a.items():
        assert type(m) is type(b[name]), name
        if isinstance(m, nn.Conv2d) and name != "conv1":
            assert (m.kernel_size, m.stride) == (b[name].kernel_size, b[name].stride), name
            assert (8 * m.in_channels, 8 * m.out_channels) == (b[name].in_channels, b[name].out_channels), name
    assert (ours.conv1.kernel_size, ours.conv1.stride) == ((3, 3), (1, 1))  # 8x8 images: no 7x7/2 stem
    assert "maxpool" in dict(real.named_modules()) and "maxpool" not in dict(ours.named_modules())
    n_ours, n_real = (sum(p.numel() for p in m.parameters()) for m in (ours, real))
    assert 60 < n_real / n_ours < 70, (n_real, n_ours)
    assert ours(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    # 3 layer groups as fastai splits a resnet: conv1, bn1, layer1, layer2 | layer3, layer4 | fc
    ids = {id(p): n for n, p in ours.named_parameters()}
    groups = [[ids[id(p)] for p in g] for g in ours.layer_groups()]
    assert sorted(sum(groups, [])) == sorted(ids.values())
    assert {n.split(".")[0] for n in groups[0]} == {"conv1", "bn1", "layer1", "layer2"}
    assert {n.split(".")[0] for n in groups[1]} == {"layer3", "layer4"}
    assert groups[2] == ["fc.weight", "fc.bias"]


def test_demo_run_shows_the_34_layer_structure(demo):
    """The recorded run states the structure the module tree has: 34 weight layers on the main path
    (33 convolutions + fc), 3 shortcut convolutions, BasicBlocks [3, 4, 6, 3] in forward order."""
    import torch

    from freezeframe.demo_model import DigitResNet34

    s = freezeframe.load(demo[3]).summary()
    st = _oracle_structure(DigitResNet34())
    counts = s["run"]["layer_counts"]
    assert (counts["weight_layers"], counts["shortcut_weight_layers"], counts["head_weight_layers"]) == (34, 3, 1)
    weight = [x for x in s["layers"] if x["type"] in ("Conv2d", "Linear")]
    assert [x["module"] for x in weight if x["branch"] == "main"] == st["main_convs"] + ["fc"]
    assert [x["weight_layer"] for x in weight if x["branch"] == "main"] == list(range(1, 35))
    assert [x["module"] for x in weight if x["branch"] == "shortcut"] == st["shortcut_convs"]
    blocks = [x["block"] for x in s["layers"] if x["block"].startswith("layer")]
    assert [len({b for b in blocks if b.startswith(f"layer{i}.")}) for i in range(1, 5)] == [3, 4, 6, 3]
    # forward order, from forward pre-hooks on a fresh copy of the network
    order, model = [], DigitResNet34()
    for name, m in model.named_modules():
        if list(m.parameters(recurse=False)):
            m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name) if name not in order else None)
    model(torch.zeros(2, 1, 8, 8))
    assert [x["module"] for x in s["layers"]] == order
    assert all(x["ran"] is True for x in s["layers"])
    assert {x["part"] for x in s["layers"] if x["module"].startswith("fc")} == {"head"}
    assert {x["part"] for x in s["layers"] if not x["module"].startswith("fc")} == {"body"}


def test_demo_logs_loss_and_accuracy_per_epoch(demo):
    """One entry per epoch with train_loss, valid_loss, accuracy; the last epoch's accuracy is the
    held-out accuracy the demo reports after that stage (the same weights, the same data)."""
    s = freezeframe.load(demo[3]).summary()
    acc = json.loads((demo[3] / "demo.json").read_text())["accuracy"]
    for st, after in zip(s["stages"], list(acc.values())[1:]):
        em = st["epoch_metrics"]
        assert [e["epoch"] for e in em] == list(range(st["epochs"]))
        assert [e["first_step"] for e in em] == st["epoch_starts"]
        assert all(set(e["values"]) == {"train_loss", "valid_loss", "accuracy"} for e in em)
        assert em[-1]["values"]["accuracy"] == pytest.approx(after, abs=1e-6)
        assert all(0 < e["values"]["train_loss"] < 5 and 0 < e["values"]["valid_loss"] < 5 for e in em)


def test_demo_accuracy_rises_stage_by_stage(demo):
    acc = json.loads((demo[3] / "demo.json").read_text())["accuracy"]
    before, stage1, stage2 = acc.values()
    assert before < stage1 < stage2, acc
    assert not json.loads((demo[3] / "demo.json").read_text())["pretrained_from_cache"]


def test_demo_records_the_two_stages_with_the_expected_freeze_facts(demo):
    s = freezeframe.load(demo[3]).summary()
    assert [st["name"] for st in s["stages"]] == ["head only, 2 epochs", "unfrozen, 3 epochs"]
    first, second = s["stages"]
    # each stage states its epochs and the step each began at: the batches per epoch are equal
    per_epoch = first["steps"] // 2
    assert (first["epochs"], first["epoch_starts"]) == (2, [0, per_epoch])
    assert (second["epochs"], second["epoch_starts"]) == (3, [2 * per_epoch + k * per_epoch for k in range(3)])
    assert second["steps"] == 3 * per_epoch
    assert second["starts_from_previous_end"] is True and second["continuity"] == "bitwise"
    assert [g["lr_max"] for g in second["groups"]] == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-12)
    for p in s["params"]:
        st1, st2 = p["stages"]
        body_conv = not p["name"].startswith("fc.") and not p["is_norm"]
        assert st1["trainable"] is (not body_conv), p["name"]
        assert st1["changed"] is (not body_conv), p["name"]  # frozen: bitwise unchanged
        assert st2["trainable"] is True and st2["changed"] is True, p["name"]
    assert not [f for f in s["findings"] if f["severity"] != "info"]


def test_demo_is_deterministic_and_uses_the_cache(demo):
    """The second run loads the pretrained network from the cache (a file naming the network, its
    version, seed and epochs) and does no pretraining."""
    import torch

    from freezeframe.demo import CACHE_VERSION
    from freezeframe.demo_model import DigitResNet34

    tmp, exe, env, out, _ = demo
    cached = sorted((tmp / "cache").iterdir())
    assert [p.name for p in cached] == [f"demo-resnet34-narrow-v{CACHE_VERSION}-seed0-e4.pt"]
    before = cached[0].read_bytes()
    state = torch.load(cached[0], weights_only=True)
    assert set(state) == set(DigitResNet34().state_dict())
    again, stdout = run_demo(tmp, exe, env, "again")
    assert "pretraining on digits 0-4" not in stdout and "from the cache" in stdout
    assert sorted((tmp / "cache").iterdir()) == cached and cached[0].read_bytes() == before
    a = json.loads((out / "demo.json").read_text())
    b = json.loads((again / "demo.json").read_text())
    assert a["pretrained_from_cache"] is False and b["pretrained_from_cache"] is True
    assert a["accuracy"] == b["accuracy"]
    sa, sb = freezeframe.load(out).summary(), freezeframe.load(again).summary()
    for key in ("params", "modules", "buffers", "findings"):
        assert sa[key] == sb[key], key
    strip = lambda st: {k: v for k, v in st.items() if k != "meta"}  # noqa: E731
    assert [strip(x) for x in sa["stages"]] == [strip(x) for x in sb["stages"]]


def test_demo_with_fastai(tmp_path, freezeframe_exe, cli_env):
    pytest.importorskip("fastai")
    out, stdout = run_demo(tmp_path, freezeframe_exe, cli_env, "fa", "--fastai", "--no-report")
    s = freezeframe.load(out).summary()
    assert s["run"]["framework"] == "fastai"
    assert [st["name"] for st in s["stages"]] == ["fit_one_cycle(2, lr_max=0.01)",
                                                 "fit_one_cycle(3, lr_max=[0.0001, 0.001, 0.01])"]
    assert [g["lr_max"] for g in s["stages"][1]["groups"]] == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-12)
    assert s["stages"][1]["starts_from_previous_end"] is True
    for p in s["params"]:
        body_conv = not p["name"].startswith("fc.") and not p["is_norm"]
        assert p["stages"][0]["trainable"] is (not body_conv) and p["stages"][0]["changed"] is (not body_conv)
        assert p["stages"][1]["changed"] is True
    acc = json.loads((out / "demo.json").read_text())["accuracy"]
    before, stage1, stage2 = acc.values()
    assert before < stage1 < stage2, acc


def _users_run(run_dir, mode="append"):
    """A user's own run (another model than the demo's), as a plain PyTorch loop records it."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with freezeframe.watch(model, opt, run_dir, every=1, mode=mode):
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(3, 5)).sum().backward()
            opt.step()


def _tree(path):
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("how", ["a new run of the user's", "the user's run over an earlier demo run"])
def test_demo_refuses_a_directory_holding_a_run_it_did_not_write(demo, tmp_path, how):
    """`freezeframe demo --out DIR` where DIR holds the user's run: one line, exit 2, the run as it
    was. The user's run may itself have replaced a demo run (mode="overwrite" over the demo's
    folder, its demo.json included): the demo's own files count as part of the run it replaced."""
    import shutil
    import subprocess

    _, exe, env, out, _ = demo
    mine = tmp_path / "mine"
    if how == "a new run of the user's":
        _users_run(mine)
    else:
        shutil.copytree(out, mine)
        _users_run(mine, mode="overwrite")
        assert not (mine / "demo.json").exists() and not (mine / "report.html").exists()
    assert freezeframe.load(mine).summary()["run"]["steps"] == 4
    before = _tree(mine)
    proc = subprocess.run([exe, "demo", "--out", str(mine), "--epochs", "1,1", "--pretrain-epochs", "1", "--no-report"],
                          capture_output=True, text=True, env=dict(env, FREEZEFRAME_CACHE=str(tmp_path / "cache")),
                          timeout=600)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(mine) in lines[0] and "did not write" in lines[0], lines[0]
    assert _tree(mine) == before
    assert freezeframe.load(mine).summary()["run"]["steps"] == 4


def test_demo_may_replace_its_own_earlier_run_and_nothing_else(demo, tmp_path):
    """What `--out` accepts before any work: a new or empty folder, an earlier demo run (its run,
    report, PNGs and demo.json); a demo run with a file of the user's added is refused."""
    import shutil

    from freezeframe.demo import check_out
    from freezeframe.errors import FreezeFrameError

    check_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty")
    earlier = tmp_path / "earlier"
    shutil.copytree(demo[3], earlier)
    check_out(earlier)
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(FreezeFrameError, match="notes.txt"):
        check_out(earlier)
