"""Bad places to write get a one-line error (exit 2, no traceback) and change nothing: `report`
over a file of a run, over a directory or an existing non-HTML file, `--png` onto a file or into a
run's own folders, a read-only run directory; `watch()` on a directory it cannot write; a run
directory deleted while recording (one warning, training unchanged); `mode="overwrite"` on a run
directory holding a user's file (refused before anything is moved) or failing to start (the old run
comes back); nonsense command-line values (refused by the argument parser).

Complements tests/reliability/test_bad_input.py (the reading side: directories that are not runs)
and tests/test_core_cli.py (record, report, record again with mode="overwrite").
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import freezeframe
import oracle
from freezeframe import cli


def _train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        opt.zero_grad()
        model(torch.randn(2, 3, generator=g)).sum().backward()
        opt.step()


def _model(width=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _tiny_run(run_dir: Path, steps: int = 3, width: int = 4, mode: str = "append") -> nn.Module:
    model, opt = _model(width)
    with freezeframe.watch(model, opt, run_dir, every=1, mode=mode):
        _train(model, opt, steps)
    return model


def _tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under `path` (dot-files included), with the bytes of files."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def _one_line_error(capsys, code, *fragments):
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("freezeframe"), captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@contextmanager
def _read_only(path: Path):
    """`path` made read-only in a way that holds for root too (the tests may run as root, whom
    permission bits do not stop): chmod for other users; for root the immutable attribute, else a
    read-only bind mount. Skips when none can be made here."""
    undo = None
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        undo = lambda: os.chmod(path, 0o755)  # noqa: E731
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(path)], check=True)  # noqa: E731
    elif shutil.which("mount") and subprocess.run(["mount", "--bind", str(path), str(path)],
                                                  capture_output=True).returncode == 0:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode == 0:
            undo = lambda: subprocess.run(["umount", str(path)], check=True)  # noqa: E731
        else:
            subprocess.run(["umount", str(path)], check=True)
    if undo is None:
        pytest.skip("cannot make a directory read-only here (root without chattr or a bind mount)")
    try:
        try:
            (path / ".can-i-write").touch()
        except OSError:
            pass
        else:
            (path / ".can-i-write").unlink()
            pytest.skip(f"{path} stayed writable")
        yield path
    finally:
        undo()


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "run"
    _tiny_run(run_dir)
    return run_dir


# --------------------------------------------------------------- report: places it must not write

def _inside(name):
    return lambda run, tmp: run / name


def _a_chunk(run, tmp):
    return next((run / "steps").glob("*.parquet"))


def _existing_dir(run, tmp):
    (tmp / "reports").mkdir()
    return tmp / "reports"


def _existing_text(run, tmp):
    (tmp / "notes.txt").write_text("my notes")
    return tmp / "notes.txt"


REPORT_TARGETS = {
    "the manifest": (_inside("manifest.json"), "inside the run directory"),
    "the reference": (_inside("reference.safetensors"), "inside the run directory"),
    "the lock's name": (_inside("writer.lock"), "inside the run directory"),
    "a chunk": (_a_chunk, "inside the run directory"),
    "the demo's marker": (_inside("demo.json"), "inside the run directory"),
    "a new html file in the run": (_inside("mine.html"), "inside the run directory"),
    "a table folder": (_inside("steps"), "inside the run directory"),
    "an existing directory": (_existing_dir, "is a directory"),
    "an existing text file": (_existing_text, "not an HTML file"),
}


@pytest.mark.parametrize("case", list(REPORT_TARGETS))
def test_report_refuses_to_write_over_a_run_or_a_file_that_is_not_html(tmp_path, run, capsys, case):
    where, says = REPORT_TARGETS[case]
    target = where(run, tmp_path)
    before = _tree(tmp_path)
    _one_line_error(capsys, cli.main(["report", str(run), "-o", str(target)]), says)
    assert _tree(tmp_path) == before, "a refused report changed or left something"
    assert freezeframe.load(run).summary()["run"]["steps"] == 3


PNG_TARGETS = {
    "an existing file": (lambda run, tmp: _existing_text(run, tmp), "is a file"),
    "the run directory": (lambda run, tmp: run, "is a run directory"),
    "a table folder": (_inside("steps"), "inside the run directory"),
    "a new folder in the run": (_inside("figures"), "inside the run directory"),
}


@pytest.mark.parametrize("case", list(PNG_TARGETS))
def test_report_png_refuses_a_file_or_a_folder_of_a_run(tmp_path, run, capsys, case):
    where, says = PNG_TARGETS[case]
    target = where(run, tmp_path)
    before = _tree(tmp_path)
    code = cli.main(["report", str(run), "-o", str(tmp_path / "out.html"), "--png", str(target)])
    _one_line_error(capsys, code, says)
    assert _tree(tmp_path) == before, "a refused report changed or left something"


def test_report_writes_where_it_may(tmp_path, run, capsys):
    """The places that stay allowed: RUN/report.html, RUN/png/, an existing .html elsewhere."""
    (tmp_path / "old.html").write_text("<p>an older report</p>")
    assert cli.main(["report", str(run), "--png", str(run / "png")]) == 0
    assert cli.main(["report", str(run), "-o", str(tmp_path / "old.html")]) == 0
    capsys.readouterr()
    assert (run / "report.html").stat().st_size > 10_000 and len(list((run / "png").glob("*.png"))) >= 4
    assert "freezeframe" in (tmp_path / "old.html").read_text()
    assert not [p for p in tmp_path.rglob(".*tmp*")], "a temporary file was left behind"


def test_report_on_a_read_only_run_directory_is_one_line_and_leaves_nothing(tmp_path, run, capsys):
    before = _tree(tmp_path)
    with _read_only(run):
        _one_line_error(capsys, cli.main(["report", str(run)]), "cannot write", "report.html")
        _one_line_error(capsys, cli.main(["report", str(run), "-o", str(tmp_path / "r.html"), "--png",
                                          str(run / "png")]), "cannot write", "png")
    assert _tree(tmp_path) == before


def test_report_into_an_existing_directory_as_the_user_types_it(tmp_path, run, freezeframe_exe, cli_env):
    """`freezeframe report RUN -o EXISTING_DIR`, a real process: one line, no traceback, no
    temporary file left beside the directory."""
    (tmp_path / "site").mkdir()
    before = _tree(tmp_path)
    out = subprocess.run([freezeframe_exe, "report", str(run), "-o", str(tmp_path / "site")], capture_output=True,
                         text=True, env=cli_env, timeout=300)
    assert out.returncode == 2 and out.stdout == "", (out.returncode, out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "is a directory" in out.stderr
    assert _tree(tmp_path) == before


# --------------------------------------------------------------- watch: where it cannot write

@pytest.mark.parametrize("where", ["the directory", "a folder to create in it"])
def test_watch_on_a_directory_it_cannot_write_raises_one_error_naming_it(tmp_path, where):
    locked = tmp_path / "locked"
    locked.mkdir()
    run_dir = locked if where == "the directory" else locked / "run"
    model, opt = _model()
    with _read_only(locked):
        with pytest.raises(freezeframe.FreezeFrameError) as e:
            freezeframe.watch(model, opt, run_dir)
    msg = str(e.value)
    assert str(run_dir) in msg and "cannot write" in msg and "\n" not in msg, msg
    assert not isinstance(e.value, OSError)
    assert list(locked.iterdir()) == []
    _train(model, opt, 1)  # no hook of the refused recorder is left on the model


def test_a_run_directory_deleted_while_recording_is_one_warning_and_training_goes_on(tmp_path):
    model, opt = _model()
    run_dir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=0.05):
            _train(model, opt, 4)
            while run_dir.exists():  # `rm -rf` while the writer may be adding a chunk: again until gone
                shutil.rmtree(run_dir, ignore_errors=True)
            for s in range(4, 12):
                _train(model, opt, 1, start=s)
                torch.randn(1)  # the RNG stream is the user's: the same as unwatched
                __import__("time").sleep(0.06)
    mine = [w for w in caught if "freezeframe" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    assert "was deleted" in str(mine[0].message) and str(run_dir) in str(mine[0].message)
    assert "took over" not in str(mine[0].message)
    assert "nothing of this run is kept" in str(mine[0].message)  # not "steps recorded so far are kept"
    assert not run_dir.exists(), "the recorder re-created the directory that was deleted"
    plain, popt = _model()  # the same training unwatched, with the same RNG draws
    _train(plain, popt, 4)
    for s in range(4, 12):
        _train(plain, popt, 1, start=s)
        torch.randn(1)
    assert all(oracle.same_bytes(a, b) for a, b in zip(oracle.state(model).values(), oracle.state(plain).values()))


def test_a_file_vanishing_under_a_write_while_the_lock_is_still_there_is_told_as_the_deletion(tmp_path, monkeypatch):
    """`rm -rf` midway: it removed the file a flush was writing but not yet the lock. By the time
    the error is reported the directory is gone, and the one warning says so, not a bare
    FileNotFoundError."""
    from freezeframe.store import writer as ff_writer

    model, opt = _model()
    run_dir = tmp_path / "run"
    real = ff_writer.RunWriter._write_all
    hits = []

    def vanishing(self, tables, manifest):
        if hits:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(run_dir / "manifest.json"))
        hits.append(1)
        return real(self, tables, manifest)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=60) as rec:
            _train(model, opt, 2)
            monkeypatch.setattr(ff_writer.RunWriter, "_write_all", vanishing)
            rec._flush()
            rec._writer.drain()
            assert isinstance(rec._writer.error, FileNotFoundError) and (run_dir / "writer.lock").exists()
            shutil.rmtree(run_dir)
            _train(model, opt, 2, start=2)
    mine = [str(w.message) for w in caught if "freezeframe" in str(w.message)]
    assert len(mine) == 1, mine
    assert "was deleted" in mine[0] and str(run_dir) in mine[0] and "FileNotFoundError" not in mine[0], mine[0]
    assert "nothing of this run is kept" in mine[0]


# --------------------------------------------------------------- mode="overwrite": decide first

def test_overwrite_refuses_a_run_directory_holding_a_users_file_before_touching_anything(tmp_path):
    run_dir = tmp_path / "run"
    _tiny_run(run_dir)
    (run_dir / "notes.txt").write_text("my notes on this run")
    before = _tree(run_dir)
    model, opt = _model(width=6)
    with pytest.raises(freezeframe.FreezeFrameError) as e:
        freezeframe.watch(model, opt, run_dir, mode="overwrite")
    assert "notes.txt" in str(e.value) and "changed nothing" in str(e.value), str(e.value)
    assert _tree(run_dir) == before
    assert freezeframe.load(run_dir).summary()["run"]["steps"] == 3


def test_an_overwrite_that_cannot_start_gives_the_old_run_back(tmp_path, monkeypatch):
    """The new recording fails after the old run was set aside (the disk is full when the new
    reference is saved): the old run is put back, whole, and still loads."""
    import safetensors.torch

    run_dir = tmp_path / "run"
    _tiny_run(run_dir)
    assert cli.main(["report", str(run_dir)]) == 0
    before = {k: v for k, v in _tree(run_dir).items() if not k.startswith("writer.lock")}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    model, opt = _model(width=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = freezeframe.watch(model, opt, run_dir, mode="overwrite")
        _train(model, opt, 2)
        rec.close()
    assert any("could not start recording" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert _tree(run_dir) == before
    assert freezeframe.load(run_dir).summary()["run"]["steps"] == 3


def test_an_overwrite_interrupted_before_the_new_manifest_keeps_the_old_run(tmp_path):
    """A process killed between setting the old run aside and writing the new manifest: the next
    recorder on the directory finds the old run back, and appends to it."""
    from freezeframe.store.writer import prepare_run_dir

    run_dir = tmp_path / "run"
    _tiny_run(run_dir)
    prepare_run_dir(run_dir, "overwrite")  # what a killed overwrite leaves: the old run set aside
    assert not (run_dir / "manifest.json").exists()
    model, opt = _model()
    with freezeframe.watch(model, opt, run_dir, every=1, mode="append"):
        _train(model, opt, 2, start=3)
    run = freezeframe.load(run_dir)
    assert run.steps().column("step").to_pylist() == [0, 1, 2, 3, 4]
    assert not (run_dir / ".replaced").exists()


# --------------------------------------------------------------- command-line values

BAD_VALUES = {
    "summary --depth -1": (["summary", "RUN", "--depth", "-1"], "--depth"),
    "summary --depth 0": (["summary", "RUN", "--depth", "0"], "--depth"),
    "summary --depth 1.5": (["summary", "RUN", "--depth", "1.5"], "--depth"),
    "report --depth -1": (["report", "RUN", "--depth", "-1"], "--depth"),
    "report --depth 0": (["report", "RUN", "--depth", "0"], "--depth"),
    "demo --pretrain-epochs -1": (["demo", "--pretrain-epochs", "-1"], "--pretrain-epochs"),
    "demo --pretrain-epochs 0": (["demo", "--pretrain-epochs", "0"], "--pretrain-epochs"),
    "demo --seed 1.5": (["demo", "--seed", "1.5"], "--seed"),
    "demo --seed abc": (["demo", "--seed", "abc"], "--seed"),
    "demo --seed -1": (["demo", "--seed", "-1"], "--seed"),
    "demo --epochs 3": (["demo", "--epochs", "3"], "--epochs"),
    "demo --epochs 0,2": (["demo", "--epochs", "0,2"], "--epochs"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_nonsense_command_line_values_are_refused_in_one_line(tmp_path, run, capsys, monkeypatch, case):
    import freezeframe.demo

    def must_not_run(**kwargs):
        raise AssertionError(f"the demo ran with {kwargs}")

    monkeypatch.setattr(freezeframe.demo, "run_demo", must_not_run)
    argv, names = BAD_VALUES[case]
    argv = [str(run) if a == "RUN" else a for a in argv]
    if argv[0] == "demo":
        argv += ["--out", str(tmp_path / "demo")]
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    _one_line_error(capsys, e.value.code, names)
    assert _tree(tmp_path) == before
