"""Crash safety: a training process killed with SIGKILL — before its first step, early, mid-stage,
right after a stage boundary, while a chunk is being written, or at a random point of a fast loop —
leaves a run that `freezeframe.load` reads, marked interrupted, with every step flushed before the
kill and the recovered count reported; a truncated or corrupted Parquet chunk is skipped with a
warning naming it, never a crash of the reader.

The killed trainings are forked from one server process that imported torch once (one import
instead of six on a small machine); each writes its markers to its own file, and the test kills it
`flush_seconds` and more after the marker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import freezeframe
from freezeframe import cli


TESTS_DIR = Path(__file__).resolve().parents[1]
FLUSH_S = 0.2
SLOW_FLUSH_S = 1.5  # the "mid-stage" training's flush_seconds
MARGIN_S = 1.0  # how long after a marker the kill comes: five times flush_seconds (or SLOW_FLUSH_S + MARGIN_S)

SERVER = r"""
import json, os, sys, threading, time
import pyarrow.parquet as pq
import torch
from torch import nn
import freezeframe
import freezeframe.capture.recorder  # noqa: F401 - imported once, before forking
import oracle
import pandas  # noqa: F401 - pyarrow imports it when the first rows are handed over: once, here

FLUSH_S, SLOW_FLUSH_S = float(sys.argv[1]), float(sys.argv[2])

# torch's first operations are slow in a forked child (lazy initialisation): make them here, once
_m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
_o = torch.optim.SGD(_m.parameters(), lr=0.05, momentum=0.9)
nn.functional.cross_entropy(_m(torch.randn(2, 4)), torch.tensor([0, 1])).backward()
_o.step()
oracle.content_hash(_m[0].weight)


def hang():
    while True:
        time.sleep(60)


def scenario(mode, run_dir, marker_path):
    out = open(marker_path, "w", buffering=1)

    def say(msg):
        out.write(msg + "\n")
        out.flush()

    trap = {"armed": False}
    if mode == "flush":
        real_write = pq.write_table

        def trapped(table, where, *args, **kwargs):
            real_write(table, where, *args, **kwargs)
            if trap["armed"]:  # the chunk is written under its temporary name, not yet renamed
                say(f"ready 3 {where}")
                hang()

        pq.write_table = trapped
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # mid-stage: a long flush interval, so that only the writer's timer flushes the steps of stage "a"
    flush_s = SLOW_FLUSH_S if mode == "mid-stage" else FLUSH_S
    rec = freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=flush_s)

    def step(s):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        rec.log(loss=loss)

    if mode == "start":
        say("ready 0")
        hang()
    if mode == "early":
        step(0)
        say("ready 1")
        hang()
    if mode == "mid-stage":
        with rec.stage("a"):
            for s in range(6):
                step(s)
            say("ready 6")
            hang()
    if mode == "boundary":
        with rec.stage("a"):
            for s in range(10):
                step(s)
        say("ready 10 " + json.dumps([oracle.content_hash(p) for _, p in model.named_parameters()]))
        hang()
    if mode == "flush":
        for s in range(3):
            step(s)
            time.sleep(2.5 * FLUSH_S)
        time.sleep(2.5 * FLUSH_S)
        trap["armed"] = True
        step(3)
        hang()
    if mode == "running":
        s = 0
        with rec.stage("fast"):
            while True:
                step(s)
                say(f"step {s}")
                s += 1


for line in sys.stdin:
    mode, run_dir, marker_path = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            scenario(mode, run_dir, marker_path)
        finally:
            os._exit(0)
    print(f"pid {mode} {pid}", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""

MODES = ["start", "early", "mid-stage", "boundary", "flush", "running"]


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [ln for ln in text.split("\n")[:-1]]  # complete lines only


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Run every scenario, kill each at its point; returns {mode: {"dir", "lines", "killed_at", "seen"}}."""
    root = tmp_path_factory.mktemp("killed")
    script = root / "server.py"
    script.write_text(SERVER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    server = subprocess.Popen([sys.executable, str(script), str(FLUSH_S), str(SLOW_FLUSH_S)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    cases = {m: {"dir": root / m / "run", "markers": root / f"{m}.txt", "seen": {}} for m in MODES}
    try:
        for m, c in cases.items():
            c["dir"].parent.mkdir()
            server.stdin.write(f"{m} {c['dir']} {c['markers']}\n")
        server.stdin.close()
        for _ in MODES:
            line = server.stdout.readline()
            assert line.startswith("pid "), (line, server.stderr.read() if server.poll() is not None else "")
            _, m, pid = line.split()
            cases[m]["pid"] = int(pid)
        pending = set(MODES)
        deadline = time.monotonic() + 120
        while pending and time.monotonic() < deadline:
            now = time.monotonic()
            for m in sorted(pending):
                c = cases[m]
                lines = _lines(c["markers"])
                for ln in lines[len(c["seen"]):]:  # when each line was first seen
                    c["seen"][len(c["seen"])] = (now, ln)
                ready = [t for t, ln in c["seen"].values() if ln.startswith("ready") or ln.startswith("step 0")]
                wait = {"running": 2.5, "mid-stage": SLOW_FLUSH_S + MARGIN_S}.get(m, MARGIN_S)
                if ready and now - ready[0] > wait:
                    os.kill(c["pid"], signal.SIGKILL)
                    c["killed_at"] = time.monotonic()
                    pending.discard(m)
            time.sleep(0.02)
        assert not pending, f"no marker from {sorted(pending)}; server stderr: " + (
            server.stderr.read() if server.poll() is not None else "(running)")
    finally:
        for c in cases.values():
            if "pid" in c and "killed_at" not in c:
                try:
                    os.kill(c["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            server.wait(timeout=60)  # it exits once every child it forked is gone
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
    for c in cases.values():
        c["lines"] = [ln for _, (_, ln) in sorted(c["seen"].items())]
        c["lines"] += _lines(c["markers"])[len(c["lines"]):]
    return cases


def _ready(case) -> tuple[int, list[str]]:
    words = next(ln for ln in case["lines"] if ln.startswith("ready")).split(" ", 2)
    return int(words[1]), words[2:]


def _loads_interrupted(run_dir: Path):
    run = freezeframe.load(run_dir)
    summary = run.summary()
    json.dumps(summary, allow_nan=False)
    steps = run.steps().column("step").to_pylist()
    assert summary["run"]["complete"] is False
    assert steps == list(range(len(steps))), f"the recovered steps are not a prefix: {steps}"
    assert summary["run"]["recovered_steps"] == summary["run"]["steps"] == len(steps)
    assert sum(s["steps"] for s in summary["stages"]) == len(steps)
    assert run.warnings == []
    return run, summary


@pytest.mark.parametrize("mode", ["start", "early", "mid-stage", "boundary"])
def test_a_killed_training_keeps_every_step_flushed_before_the_kill(killed, mode):
    case = killed[mode]
    n, _ = _ready(case)
    assert (case["dir"] / "writer.lock").exists()  # the killed process could not clean up
    run, summary = _loads_interrupted(case["dir"])
    assert summary["run"]["recovered_steps"] == n, (mode, summary["run"])
    # every=1: a metrics row for every tensor of every recovered step, and every logged loss
    assert sorted(set(run.tensors().column("step").to_pylist())) == list(range(n))
    assert run.tensors().num_rows == 4 * n
    assert run.scalars().column("step").to_pylist() == list(range(n))
    assert len(summary["stages"]) == (0 if n == 0 else 1)


def test_a_stage_killed_midway_is_recovered_with_its_name_and_facts(killed):
    """The stage the killed steps belong to keeps what the recorder knew when they were flushed:
    its name, its trainable set and groups (not an anonymous placeholder)."""
    run, summary = _loads_interrupted(killed["mid-stage"]["dir"])
    (stage,) = summary["stages"]
    assert (stage["name"], stage["steps"], stage["complete"]) == ("a", 6, False), stage
    assert stage["tensors_trainable"] == 4 and [g["name"] for g in stage["groups"]] == ["pg0"], stage
    for p in summary["params"]:
        assert p["stages"][0]["trainable"] is True and p["stages"][0]["grad_steps"] == 6, p


def test_a_kill_right_after_a_stage_boundary_keeps_the_stage_end_hashes(killed):
    case = killed["boundary"]
    n, rest = _ready(case)
    hashes = json.loads(rest[0])
    run, summary = _loads_interrupted(case["dir"])
    (stage,) = summary["stages"]
    assert (stage["name"], stage["steps"], stage["complete"]) == ("a", 10, True)
    (manifest_stage,) = run.manifest["stages"]
    assert manifest_stage["end_hashes"] == hashes  # the end state, exactly as the child saw it
    assert all(e["changed"] is True for p in summary["params"] for e in p["stages"])


def test_a_kill_while_a_chunk_is_being_written_loses_only_that_chunk(killed):
    case = killed["flush"]
    n, rest = _ready(case)
    tmp = Path(rest[0])
    assert tmp.exists() and tmp.name.startswith("."), tmp  # killed between the write and the rename
    run, summary = _loads_interrupted(case["dir"])
    assert summary["run"]["recovered_steps"] == n == 3
    assert run.tensors().num_rows == 4 * 3


def test_a_kill_at_a_random_point_of_a_fast_loop_keeps_every_step_older_than_the_flush_interval(killed):
    case = killed["running"]
    steps_seen = [(t, int(ln.split()[1])) for t, ln in case["seen"].values() if ln.startswith("step ")]
    old = [s for t, s in steps_seen if t < case["killed_at"] - MARGIN_S]
    assert old, "the loop made no step a second before the kill"
    done = max(s for _, s in steps_seen)
    run, summary = _loads_interrupted(case["dir"])
    recovered = summary["run"]["recovered_steps"]
    assert max(old) + 1 <= recovered <= done + 2, (max(old), recovered, done)
    (stage,) = summary["stages"]
    assert stage["name"] == "fast" and stage["steps"] == recovered


def test_the_cli_summary_of_a_killed_run_says_how_much_was_recovered(killed, capsys):
    case = killed["mid-stage"]
    assert cli.main(["summary", str(case["dir"])]) == 0
    out = capsys.readouterr().out
    assert "INTERRUPTED" in out and "6 steps recovered" in out, out
    assert cli.main(["summary", str(case["dir"]), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["run"]["complete"] is False and doc["run"]["recovered_steps"] == 6


# ------------------------------------------------------------------------------ damaged chunks


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """An interrupted run whose steps and tensors tables are in four chunks each (a copy of the
    directory taken while the recorder was still open: nothing compacted)."""
    root = tmp_path_factory.mktemp("chunked")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    live, copy = root / "live", root / "interrupted"
    rec = freezeframe.watch(model, opt, live, every=1, flush_seconds=3600)
    try:
        for s in range(12):
            opt.zero_grad()
            model(torch.randn(5, 4)).sum().backward()
            opt.step()
            rec.log(loss=float(s))
            if s % 3 == 2:
                rec._flush()  # a flush as the timer would make one
                rec._writer.drain()
        shutil.copytree(live, copy)
    finally:
        rec.close()
    return copy


def _chunk_steps(path: Path) -> list[int]:
    return sorted(set(pq.read_table(path).column("step").to_pylist()))


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "garbled page header": lambda b: b[:4] + bytes(x ^ 0xFF for x in b[4:80]) + b[80:],
    "zeroed middle": lambda b: b[:8] + b"\0" * (len(b) // 2) + b[8 + len(b) // 2:],
    "empty": lambda b: b"",
    "not parquet": lambda b: b"<html>404 not found</html>",
}


@pytest.mark.parametrize("table", ["steps", "tensors", "scalars"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_chunk_is_skipped_with_a_warning_naming_it(chunked, tmp_path, table, damage, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(chunked, run_dir)
    chunks = sorted((run_dir / table).glob("s000-*.parquet"))
    assert len(chunks) == 4, chunks
    victim = chunks[1]
    lost = _chunk_steps(victim)
    kept_steps = {t: sorted(s for f in sorted((run_dir / t).glob("s000-*.parquet")) if f != victim or t != table
                            for s in _chunk_steps(f)) for t in ("steps", "tensors", "scalars")}
    victim.write_bytes(DAMAGE[damage](victim.read_bytes()))

    run = freezeframe.load(run_dir)
    assert len(run.warnings) == 1 and victim.name in run.warnings[0], run.warnings
    summary = run.summary()
    assert summary["run"]["warnings"] == run.warnings
    json.dumps(summary, allow_nan=False)
    assert sorted(run.steps().column("step").to_pylist()) == kept_steps["steps"]
    assert sorted(set(run.tensors().column("step").to_pylist())) == kept_steps["tensors"]
    assert sorted(run.scalars().column("step").to_pylist()) == kept_steps["scalars"]
    assert summary["run"]["recovered_steps"] == len(kept_steps["steps"])
    assert lost and not set(lost) & set(kept_steps[table])
    # the command line shows the warning and still answers
    assert cli.main(["summary", str(run_dir)]) == 0
    assert victim.name in capsys.readouterr().out.replace("\n", "")


def test_a_damaged_compacted_file_and_a_foreign_parquet_file_are_skipped_by_name(tmp_path):
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=0.05) as rec:
        for s in range(4):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
            time.sleep(0.1)  # several chunks, compacted at close
    with freezeframe.watch(model, opt, run_dir, every=1, mode="append") as rec:  # a second session
        for s in range(2):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
    compact = run_dir / "tensors" / "s000-compact.parquet"
    assert compact.exists(), sorted(p.name for p in (run_dir / "tensors").iterdir())
    compact.write_bytes(compact.read_bytes()[:100])
    foreign = run_dir / "steps" / "s007-000001.parquet"
    pq.write_table(pa.table({"epoch": [1, 2], "acc": [0.5, 0.7]}), foreign)
    run = freezeframe.load(run_dir)
    assert len(run.warnings) == 2, run.warnings
    assert any("s000-compact.parquet" in w for w in run.warnings)
    assert any("s007-000001.parquet" in w for w in run.warnings)
    assert run.steps().column("step").to_pylist() == list(range(6))
    assert sorted(set(run.tensors().column("step").to_pylist())) == [4, 5]  # session 1's rows only
    run.summary()


# ------------------------------------------------------------------------------ the crash window

WINDOW_S = 1.0  # README "Reliability": every step recorded more than this long before a kill -9 is kept

WINDOW_CHILD = r"""
import os, sys, time
import torch
from torch import nn
import freezeframe

run_dir, times_path = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
side = open(times_path, "w")
step = 0
with freezeframe.watch(model, opt, run_dir) as rec:  # the default options: the default flush interval
    with rec.stage("train"):  # one long stage: no stage end flushes for the steps
        while True:
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            rec.log(loss=loss)
            side.write(f"{step} {time.time()!r}\n")  # when the step ended, on disk before the next one
            side.flush()
            os.fsync(side.fileno())
            step += 1
            if step % 100 == 50:
                time.sleep(1.3)  # a long pause (a validation, a slow batch): only the writer's timer flushes
"""


def _step_times(path: Path) -> dict[int, float]:
    times = {}
    for ln in _lines(path):
        s, t = ln.split()
        times[int(s)] = float(t)
    return times


@pytest.mark.parametrize("after_s", [2.5, 4.0])
def test_a_kill_9_loses_nothing_recorded_more_than_a_second_before_it(tmp_path, after_s):
    """A real training process with freezeframe's default options, killed with SIGKILL `after_s`
    seconds after its first step: every step that ended more than 1 s before the kill (the child
    logs each step's end time to a side file, fsynced) is in the run it leaves."""
    script = tmp_path / "train.py"
    script.write_text(WINDOW_CHILD)
    run_dir, times_path = tmp_path / "run", tmp_path / "steps.txt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), str(run_dir), str(times_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while 0 not in _step_times(times_path):
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the training made no step"
            time.sleep(0.01)
        first = _step_times(times_path)[0]
        time.sleep(max(first + after_s - time.time(), 0))
        killed_at = time.time()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
    times = _step_times(times_path)
    old = sorted(s for s, t in times.items() if t < killed_at - WINDOW_S)
    assert len(old) > 20, f"too few steps before the window to test it: {len(old)} of {len(times)}"
    run = freezeframe.load(run_dir)
    kept = run.steps().column("step").to_pylist()
    assert kept == list(range(len(kept))), "the recovered steps are not a prefix"
    missing = sorted(set(old) - set(kept))
    assert not missing, (f"{len(missing)} steps ended more than {WINDOW_S} s before the kill but are not in the run "
                         f"(first {missing[0]}, which ended {killed_at - times[missing[0]]:.2f} s before it); "
                         f"{len(kept)} of {len(times)} steps kept")
    scalars = set(run.scalars().column("step").to_pylist())
    assert set(old) <= scalars, "a logged loss older than the window is missing"
    summary = run.summary()
    assert summary["run"]["complete"] is False and summary["run"]["steps"] == len(kept)
