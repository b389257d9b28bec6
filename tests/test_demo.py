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
