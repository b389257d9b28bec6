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
    for text in ("Freeze map", "The three questions", "Accuracy on held-out digits", "report.html"):
        assert text in stdout, text


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
        body_conv = not p["name"].startswith("head") and not p["is_norm"]
        assert st1["trainable"] is (not body_conv), p["name"]
        assert st1["changed"] is (not body_conv), p["name"]  # frozen: bitwise unchanged
        assert st2["trainable"] is True and st2["changed"] is True, p["name"]
    assert not [f for f in s["findings"] if f["severity"] != "info"]


def test_demo_is_deterministic_and_uses_the_cache(demo):
    tmp, exe, env, out, _ = demo
    again, _ = run_demo(tmp, exe, env, "again")
    a = json.loads((out / "demo.json").read_text())
    b = json.loads((again / "demo.json").read_text())
    assert b["pretrained_from_cache"] is True
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
        body_conv = not p["name"].startswith("head") and not p["is_norm"]
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
