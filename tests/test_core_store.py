"""The run directory: manifest hashes, reference weights, Parquet chunks any reader can open,
flushing, interrupted runs (an exception, kill -9) and clear errors for what is not a run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

import freezeframe
import oracle
from models import BodyHead, SmallCNN, batch, build, loss_of, train


def _explicit_two_stages(run_dir):
    model = build(BodyHead)
    model.freeze_body()
    opt = torch.optim.SGD([{"params": g} for g in model.layer_groups()], lr=0.05, momentum=0.9)
    snaps = {"ref": oracle.state(model)}
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("head"):
            train(model, opt, 2)
        snaps["E0"] = oracle.state(model)
        with torch.no_grad():
            model.head[0].bias.add_(1.0)  # written between the stages
        snaps["S1"] = oracle.state(model)
        with rec.stage("all"):
            model.unfreeze()
            train(model, opt, 2, start=2)
        snaps["E1"] = oracle.state(model)
    return model, snaps


def test_manifest_hashes_are_blake2b_of_dtype_shape_bytes_at_each_stage_start_and_end(run_dir):
    model, snaps = _explicit_two_stages(run_dir)
    names = oracle.param_names(model) + oracle.float_buffer_names(model)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [p["name"] for p in manifest["model"]["params"]] + [b["name"] for b in manifest["model"]["buffers"]] == names
    s0, s1 = manifest["stages"]
    assert s0["start_hashes"] == [oracle.content_hash(snaps["ref"][n]) for n in names]
    assert s0["end_hashes"] == [oracle.content_hash(snaps["E0"][n]) for n in names]
    assert s1["start_hashes"] == [oracle.content_hash(snaps["S1"][n]) for n in names]
    assert s1["end_hashes"] == [oracle.content_hash(snaps["E1"][n]) for n in names]
    summary = freezeframe.load(run_dir).summary()
    assert summary["stages"][1]["changed_since_previous_end"] == ["head.0.bias"]


def test_reference_weights_are_the_model_as_watching_began(run_dir):
    model = build(SmallCNN)
    ref = oracle.state(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2)
    from safetensors.torch import load_file

    stored = load_file(str(run_dir / "reference.safetensors"))
    assert set(stored) == set(ref)
    for n, t in ref.items():
        assert oracle.same_bytes(stored[n], t), n
    run_ref = freezeframe.load(run_dir).reference()
    assert all(oracle.same_bytes(run_ref[n], ref[n]) for n in ref)


def test_stored_parquet_is_read_directly_by_pyarrow_pandas_polars_duckdb(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=0.0):
        train(model, opt, 4)
    run = freezeframe.load(run_dir)
    steps_dir = run_dir / "steps"
    tensors_dir = run_dir / "tensors"
    assert pq.read_table(steps_dir).num_rows == 4
    assert pq.read_table(tensors_dir).num_rows == run.tensors().num_rows
    import pandas as pd

    assert sorted(pd.read_parquet(steps_dir)["step"].tolist()) == [0, 1, 2, 3]
    import polars as pl

    assert pl.read_parquet(str(steps_dir / "*.parquet")).height == 4
    import duckdb

    assert duckdb.sql(f"select count(*) from '{steps_dir}/*.parquet'").fetchall() == [(4,)]


def test_log_attaches_scalars_to_the_most_recent_applied_step(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        rec.log(loss=123.0)  # before any step: nothing to attach to
        for s in range(3):
            x, y = batch(model, s)
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            opt.step()
            rec.log(loss=loss)
            losses.append(loss.item())
    run = freezeframe.load(run_dir)
    steps = run.steps()
    assert steps.column("step").to_pylist() == [0, 1, 2]
    assert steps.column("loss").to_pylist() == losses
    scalars = run.scalars()
    assert scalars.column("step").to_pylist() == [0, 1, 2]


def test_every_stage_end_is_flushed_while_recording(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=3600) as rec:
        with rec.stage("a"):
            train(model, opt, 3)
        # no further step, and flush_seconds far away: only the stage end can have written these
        # (the step chunks and the manifest are separate files: wait until both are there)
        deadline = time.monotonic() + 10
        seen = None
        while time.monotonic() < deadline:
            run = freezeframe.load(run_dir)
            summary = run.summary()
            seen = (run.steps().num_rows, [(s["name"], s["steps"], s["complete"]) for s in summary["stages"]])
            if seen == (3, [("a", 3, True)]):
                break
            time.sleep(0.05)
        assert seen == (3, [("a", 3, True)])
        assert summary["run"]["complete"] is False  # the run itself is still being recorded


def test_an_exception_in_the_training_loop_keeps_every_step(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyError):
        with freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=3600):
            train(model, opt, 3)
            raise KeyError("the user's own bug")
    summary = freezeframe.load(run_dir).summary()
    assert summary["run"]["complete"] is False
    assert summary["run"]["recovered_steps"] == 3 and summary["run"]["steps"] == 3
    assert not (run_dir / "writer.lock").exists()


KILL_SCRIPT = r"""
import sys, time
import torch
import freezeframe
from models import SmallCNN, build, train

run_dir, paced, fast = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = build(SmallCNN)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
rec = freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=0.2)
for s in range(paced):          # slower than flush_seconds: each step finds the last flush old
    train(model, opt, 1, start=s)
    time.sleep(0.3)
print(f"paced {paced}", flush=True)
train(model, opt, fast, start=paced)   # then quick steps, and nothing more
print(f"done {paced + fast}", flush=True)
time.sleep(120)
"""


def test_kill_9_leaves_a_run_that_loads_with_its_flushed_steps(run_dir, tmp_path, cli_env):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    paced, fast = 3, 4
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(paced), str(fast)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith("done"):
                break
        assert lines[-1:] == [f"done {paced + fast}"], (lines, proc.stderr.read() if proc.poll() is not None else "")
        time.sleep(1.2)  # every step is now older than flush_seconds (0.2 s) by a second
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "writer.lock").exists()  # the killed process could not clean up
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)

    run = freezeframe.load(run_dir)
    summary = run.summary()
    assert summary["run"]["complete"] is False
    recovered = summary["run"]["recovered_steps"]
    steps = run.steps().column("step").to_pylist()
    assert steps == list(range(len(steps))) and recovered == len(steps) == summary["run"]["steps"]
    assert sorted(set(run.tensors().column("step").to_pylist())) == steps  # every=1: rows for each
    # the paced steps were each followed by a flush: on disk whatever happened next
    assert recovered >= paced, summary["run"]

    # a later session appends to the interrupted run, taking over the stale lock
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, copy, every=1, mode="append"):
        train(model, opt, 2)
    appended = freezeframe.load(copy)
    assert appended.steps().column("step").to_pylist() == list(range(recovered + 2))
    assert len(appended.summary()["run"]["sessions"]) == 2

    # flush_seconds is the longest a step waits in memory: a second later, every step is on disk
    assert recovered == paced + fast, summary["run"]


def test_a_half_written_or_damaged_chunk_does_not_stop_the_reader(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 2)
    (run_dir / "steps" / ".s000-000099.parquet.tmp").write_bytes(b"PAR1 half a file")
    (run_dir / "steps" / "s009-000001.parquet").write_bytes(b"not parquet at all")
    run = freezeframe.load(run_dir)
    assert run.steps().column("step").to_pylist() == [0, 1]
    assert any("s009-000001.parquet" in w for w in run.warnings)


def test_mode_overwrite_replaces_the_run(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3)
    ref = oracle.state(model)
    with freezeframe.watch(model, opt, run_dir, every=1, mode="overwrite"):
        train(model, opt, 1, start=3)
    run = freezeframe.load(run_dir)
    assert run.steps().column("step").to_pylist() == [0]
    assert len(run.summary()["run"]["sessions"]) == 1
    assert all(oracle.same_bytes(run.reference()[n], ref[n]) for n in ref)


def test_watch_refuses_a_directory_that_holds_something_else(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    model = build(SmallCNN)
    with pytest.raises(freezeframe.FreezeFrameError) as e:
        freezeframe.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), d)
    assert str(d) in str(e.value)
    assert sorted(p.name for p in d.iterdir()) == ["cat.jpg"]


def _valid_run(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 1)


@pytest.mark.parametrize("damage", ["missing", "no-manifest", "empty", "truncated", "newer", "file"])
def test_load_gives_a_clear_error_naming_what_is_not_a_run(run_dir, tmp_path, damage):
    target = run_dir
    if damage == "missing":
        target = tmp_path / "nowhere"
    elif damage == "no-manifest":
        run_dir.mkdir()
        (run_dir / "notes.txt").write_text("hello")
    elif damage == "file":
        target = tmp_path / "a-file"
        target.write_text("x")
    else:
        _valid_run(run_dir)
        m = run_dir / "manifest.json"
        text = m.read_text()
        if damage == "empty":
            m.write_text("")
        elif damage == "truncated":
            m.write_text(text[: len(text) // 2])
        elif damage == "newer":
            doc = json.loads(text)
            doc["schema_version"] = 99
            m.write_text(json.dumps(doc))
    with pytest.raises(freezeframe.RunError) as e:
        freezeframe.load(target)
    assert isinstance(e.value, freezeframe.FreezeFrameError)
    assert str(target) in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ reading a run that is being written

LIVE_TRAINING = r"""
import sys, time
from pathlib import Path
import torch
from torch import nn
import freezeframe

run_dir, stop = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=0.05) as rec:
    with rec.stage("training"):
        step = 0
        while not stop.exists():
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            step += 1
            if step == 5:
                print("ready", flush=True)
            time.sleep(0.02)
print("done", step, flush=True)
"""


def test_a_run_read_while_its_training_process_is_still_running_is_in_progress(tmp_path, freezeframe_exe, cli_env):
    run_dir, stop = tmp_path / "live", tmp_path / "stop"
    script = tmp_path / "train.py"
    script.write_text(LIVE_TRAINING)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(stop)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.poll() is not None else ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (run_dir / "manifest.json").exists() and freezeframe.load(run_dir).steps().num_rows >= 5:
                break
            time.sleep(0.1)
        env = dict(cli_env, COLUMNS="300")
        summary = subprocess.run([freezeframe_exe, "summary", str(run_dir)], capture_output=True, text=True,
                                 env=env, timeout=120)
        check = subprocess.run([freezeframe_exe, "check", str(run_dir)], capture_output=True, text=True,
                               env=env, timeout=120)
        assert proc.poll() is None, "training ended before it was read"
        head = summary.stdout.splitlines()[0]
        assert summary.returncode == 0 and "in progress (" in head and "steps so far)" in head, summary.stdout
        assert "INTERRUPTED" not in summary.stdout + check.stdout
        assert check.returncode == 0 and "in progress (" in check.stdout, check.stdout + check.stderr
        run = freezeframe.load(run_dir)
        assert run.live and proc.poll() is None
        assert run.summary()["run"]["in_progress"] is True and run.summary()["run"]["complete"] is False
    finally:
        stop.write_text("")
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.startswith("done"), err
    done = freezeframe.load(run_dir)
    assert not done.live and done.summary()["run"]["complete"] is True and done.fully_read()
    assert done.steps_read == int(out.split()[1])


def test_reading_during_the_end_of_session_compaction_reports_no_damage(run_dir, monkeypatch):
    """The reader lists the chunks, then the session closes (its real compaction merges and
    removes them) before the reader opens them: the vanished chunks are re-listed, never
    reported as damaged."""
    from freezeframe.store import reader

    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=0.01)
    for k in range(4):
        train(model, opt, 1, start=k)
        time.sleep(0.05)  # a chunk per step
    rec._writer.drain()
    chunks = sorted((run_dir / "steps").glob("s000-0*.parquet"))
    assert len(chunks) >= 2, chunks

    listing = reader._chunk_files
    closed = []

    def list_then_compact(folder):
        files = listing(folder)
        if not closed:
            rec.close()  # the end of the session, between listing and reading
            closed.append(True)
        return files

    monkeypatch.setattr(reader, "_chunk_files", list_then_compact)
    run = freezeframe.load(run_dir)
    assert closed and not any(f.exists() for f in chunks), "the compaction did not run in between"
    assert run.warnings == [] and run.unreadable == []
    assert run.steps().column("step").to_pylist() == [0, 1, 2, 3]
    assert len(run.tensors()) and run.fully_read()
