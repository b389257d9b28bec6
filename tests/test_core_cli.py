"""The `freezeframe` command line: summary (text and --json), check --json, and a clear exit 2
for a directory that is not a run."""

from __future__ import annotations

import subprocess

import pytest
import torch

import freezeframe
import oracle
from freezeframe import cli
from models import SmallCNN, build, train


def _run_with_a_frozen_tensor_edited(run_dir):
    """A run whose stage 0 has a frozen tensor that changed: an error finding."""
    model = build(SmallCNN)
    model.features.requires_grad_(False)
    opt = torch.optim.SGD(model.classifier.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("head only"):
            train(model, opt, 2)
            with torch.no_grad():
                model.features[0].weight.add_(0.01)
            train(model, opt, 1, start=2)


def _clean_run(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("all"):
            train(model, opt, 2)


def test_summary_of_a_directory_that_is_not_a_run_exits_2_naming_it(tmp_path, freezeframe_exe, cli_env):
    d = tmp_path / "holiday photos"
    d.mkdir()
    (d / "beach.jpg").write_bytes(b"\xff\xd8")
    out = subprocess.run([freezeframe_exe, "summary", str(d), "--json"], capture_output=True, text=True,
                         env=cli_env, timeout=120)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert str(d) in lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("command", [["summary"], ["summary", "--json"], ["check"], ["check", "--json"]])
@pytest.mark.parametrize("what", ["missing", "empty-dir", "file"])
def test_every_command_on_a_non_run_exits_2_with_one_line(tmp_path, capsys, command, what):
    target = tmp_path / "x"
    if what == "empty-dir":
        target.mkdir()
    elif what == "file":
        target.write_text("hello")
    argv = [command[0], str(target), *command[1:]]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0], captured.err


def test_check_json_prints_the_findings_schema_and_exits_1_on_an_error(run_dir, capsys):
    _run_with_a_frozen_tensor_edited(run_dir)
    assert cli.main(["check", str(run_dir), "--json"]) == 1
    doc = oracle.strict_json(capsys.readouterr().out)
    assert set(doc) >= {"schema", "findings"}
    assert doc["schema"] == "freezeframe.check/1"
    assert isinstance(doc["findings"], list)
    for i, f in enumerate(doc["findings"]):
        oracle.check_finding(f, f"findings[{i}]")
    frozen = [f for f in doc["findings"] if f["code"] == "frozen-param-changed"]
    assert len(frozen) == 1
    assert frozen[0]["severity"] == "error" and frozen[0]["stage"] == 0
    assert frozen[0]["params"] == ["features.0.weight"]
    # the same findings as the summary's
    assert doc["findings"] == freezeframe.load(run_dir).summary()["findings"]


def test_check_json_on_a_clean_run_exits_0(run_dir, capsys):
    _clean_run(run_dir)
    assert cli.main(["check", str(run_dir), "--json"]) == 0
    doc = oracle.strict_json(capsys.readouterr().out)
    assert doc["schema"] == "freezeframe.check/1"
    for i, f in enumerate(doc["findings"]):
        oracle.check_finding(f, f"findings[{i}]")
        assert f["severity"] != "error"


def test_summary_json_in_process_equals_the_api_and_validates(run_dir, capsys):
    _run_with_a_frozen_tensor_edited(run_dir)
    assert cli.main(["summary", str(run_dir), "--json"]) == 0
    doc = oracle.strict_json(capsys.readouterr().out)
    oracle.check_summary_schema(doc)
    assert doc == oracle.strict_json(__import__("json").dumps(freezeframe.load(run_dir).summary(), allow_nan=False))
    e = next(p for p in doc["params"] if p["name"] == "features.0.weight")["stages"][0]
    assert e["trainable"] is False and e["changed"] is True


def test_summary_text_shows_modules_and_stages(run_dir, capsys):
    _clean_run(run_dir)
    assert cli.main(["summary", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "all" in out and "classifier" in out and "features" in out


def _cli(exe, env, *argv):
    return subprocess.run([exe, *map(str, argv)], capture_output=True, text=True, env=env, timeout=300)


def test_report_over_the_runs_own_manifest_is_refused_and_the_run_survives(run_dir, freezeframe_exe, cli_env):
    """`freezeframe report RUN -o RUN/manifest.json`: one line, exit 2, the run byte for byte as it was."""
    _clean_run(run_dir)
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    out = _cli(freezeframe_exe, cli_env, "report", run_dir, "-o", run_dir / "manifest.json")
    assert out.returncode == 2 and out.stdout == "", (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "manifest.json" in lines[0] and "inside the run directory" in lines[0], lines[0]
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before
    assert freezeframe.load(run_dir).summary()["run"]["steps"] == 2


def test_record_report_record_again_with_overwrite_replaces_the_run_and_its_outputs(run_dir, freezeframe_exe, cli_env):
    """The documented flow: record, `freezeframe report`, `--png`, record again with
    mode="overwrite": the new run is there, with the new steps; the old run's report and PNGs,
    part of the old run, are gone with it."""
    _clean_run(run_dir)
    assert _cli(freezeframe_exe, cli_env, "report", run_dir).returncode == 0
    assert _cli(freezeframe_exe, cli_env, "report", run_dir, "--png", run_dir / "png").returncode == 0
    assert (run_dir / "report.html").exists() and list((run_dir / "png").glob("*.png"))
    model = build(SmallCNN, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1, mode="overwrite") as rec:
        with rec.stage("again"):
            train(model, opt, 5)
    run = freezeframe.load(run_dir)
    s = run.summary()
    assert run.steps().column("step").to_pylist() == [0, 1, 2, 3, 4]
    assert [st["name"] for st in s["stages"]] == ["again"] and len(s["run"]["sessions"]) == 1
    ref = run.reference()
    start = build(SmallCNN, seed=1)
    assert all(oracle.same_bytes(ref[n], p) for n, p in start.named_parameters())  # W_ref is the new model's
    assert sorted(p.name for p in run_dir.iterdir()) == ["manifest.json", "reference.safetensors", "scalars",
                                                         "steps", "tensors"]
