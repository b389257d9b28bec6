"""Bad input gets a one-line error naming the thing at fault: a run directory that is not a run, of
a newer schema, empty, partly written or hand-edited (the API raises RunError; every CLI command
exits 2 with one stderr line and no traceback); `watch` given something that is not a model, an
optimizer, a run directory or a valid option (refused before anything is written); `mode="append"`
on another model; two writers of one run directory (refused, never interleaved); names with
spaces, unicode, HTML and rich markup, recorded and shown literally; hand-edited manifests
(out-of-range indices, wrong types, any schema_version but a whole number, JSON nested 100,000
deep) refused naming the field; a run that cannot be fully read never checked green nor called
complete; files that are no checkpoint named for what they are; escape sequences in names never
written raw to the terminal.

Complements tests/test_core_store.py (the API's errors for missing / no manifest / empty /
truncated / newer / a file), tests/test_core_cli.py (missing / empty dir / file) and
tests/test_core_safety.py (no parameters, a model as the optimizer, an unknown option, a bad mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import freezeframe
from freezeframe import cli


TESTS_DIR = Path(__file__).resolve().parents[1]


def _tiny_run(run_dir: Path, steps: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir, every=1):
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
    return model


def _train_in_stage(model: nn.Module, opt, run_dir: Path, stage: str, steps: int = 2) -> None:
    """Two steps of `model` on random (2, 3) inputs inside one explicit stage named `stage`."""
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage(stage):
            for _ in range(steps):
                opt.zero_grad()
                model(torch.randn(2, 3)).sum().backward()
                opt.step()


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------- run directories that are not runs


def _edit_manifest(edit):
    def damage(run_dir: Path) -> None:
        _tiny_run(run_dir)
        m = run_dir / "manifest.json"
        m.write_text(edit(m.read_text()))
    return damage


def _json_edit(fn):
    def edit(text):
        doc = json.loads(text)
        fn(doc)
        return json.dumps(doc)
    return edit


def _notes_only(run_dir: Path) -> None:
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("not a run")
    (run_dir / "steps").mkdir()


def _del(key):
    return lambda doc: doc.pop(key)


def _set(key, value):
    return lambda doc: doc.__setitem__(key, value)


BROKEN = {
    "not a run": _notes_only,
    "newer schema": _edit_manifest(_json_edit(_set("schema_version", 2))),
    "schema version not a number": _edit_manifest(_json_edit(_set("schema_version", "2"))),
    "empty manifest": _edit_manifest(lambda text: ""),
    "whitespace manifest": _edit_manifest(lambda text: "\n  \n"),
    "manifest cut in half": _edit_manifest(lambda text: text[: len(text) // 2]),
    "manifest is a list": _edit_manifest(lambda text: "[1, 2, 3]"),
    "manifest of another tool": _edit_manifest(lambda text: json.dumps({"schema": "wandb.run/3", "id": 1})),
    "manifest without its model": _edit_manifest(_json_edit(_del("model"))),
    "manifest not utf-8": lambda d: (_tiny_run(d), (d / "manifest.json").write_bytes(b"\xff\xfe{\x00")),
}


def _stage0(key, value):
    return lambda doc: doc["stages"][0].__setitem__(key, value)


def _nested(text: str) -> str:
    doc = json.loads(text)
    doc["model"]["params"][0]["module"] = "PLACEHOLDER"
    return json.dumps(doc).replace('"PLACEHOLDER"', "[" * 100_000 + "]" * 100_000)


# hand-edited or damaged manifests: one line naming the field at fault (schema check on load)
MANIFEST_FIELD = {
    "a stage's trainable index 999": (_stage0("trainable", [0, 999]), "stages[0].trainable[1]"),
    "group params -5 and 1e9": (lambda doc: doc["stages"][0]["groups"][0].__setitem__("params", [-5, 10**9]),
                                "stages[0].groups[0].params[0]"),
    "group params 1e9": (lambda doc: doc["stages"][0]["groups"][0].__setitem__("params", [0, 10**9]),
                         "stages[0].groups[0].params[1]"),
    "empty model.params": (lambda doc: doc["model"].__setitem__("params", []), "model.params"),
    "a stage name that is a number": (_stage0("name", 5), "stages[0].name"),
    "a stage index that is text": (_stage0("index", "0"), "stages[0].index"),
    "a parameter's shape of text": (lambda doc: doc["model"]["params"][0].__setitem__("shape", "4x3"),
                                    "model.params[0].shape"),
    "ref_norms of another length": (lambda doc: doc.__setitem__("ref_norms", [1.0]), "ref_norms"),
    "schema_version '1' (a string)": (_set("schema_version", "1"), "schema_version"),
    "schema_version null": (_set("schema_version", None), "schema_version"),
    "schema_version 0": (_set("schema_version", 0), "schema_version"),
    "schema_version -3": (_set("schema_version", -3), "schema_version"),
    "schema_version true": (_set("schema_version", True), "schema_version"),
}
for _case, (_fn, _field) in MANIFEST_FIELD.items():
    BROKEN[_case] = _edit_manifest(_json_edit(_fn))
BROKEN["JSON nested 100,000 deep"] = _edit_manifest(_nested)
MANIFEST_FIELD["JSON nested 100,000 deep"] = (None, "nests deeper")


@pytest.mark.parametrize("what", list(MANIFEST_FIELD))
def test_a_hand_edited_manifest_is_refused_naming_the_field(tmp_path, capsys, what):
    run_dir = tmp_path / "edited"
    BROKEN[what](run_dir)
    with pytest.raises(freezeframe.RunError) as e:
        freezeframe.load(run_dir)
    field_named = MANIFEST_FIELD[what][1]
    assert field_named in str(e.value) and "newer than" not in str(e.value), str(e.value)
    for command in (["summary"], ["check"], ["report", "-o", str(tmp_path / "r.html")]):
        assert cli.main([command[0], str(run_dir), *command[1:]]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and field_named in err, (command, err)
    assert not (tmp_path / "r.html").exists()


def test_manifests_written_by_this_version_pass_the_schema_check(tmp_path):
    """The check is strict on the fields it declares: a run with every optional feature in use
    (two optimizers, stages, logged scalars, buffers) loads and its summary builds."""
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opts = [torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.Adam(model[2].parameters(), lr=1e-3)]
    with freezeframe.watch(model, opts, run_dir, every=1) as rec:
        with rec.stage("both"):
            for _ in range(3):
                for o in opts:
                    o.zero_grad()
                model(torch.randn(4, 3)).sum().backward()
                for o in opts:
                    o.step()
                rec.log(loss=1.0)
        model[0].requires_grad_(False)
        opts[1].zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opts[1].step()
    run = freezeframe.load(run_dir)
    assert run.fully_read() and run.unreadable == [] and run.steps_expected == 7 and not run.live
    assert [s["steps"] for s in run.summary()["stages"]] == [6, 1]


@pytest.mark.parametrize("what", list(BROKEN))
def test_a_broken_run_directory_is_one_clear_error_from_the_api(tmp_path, what):
    run_dir = tmp_path / "my run"
    BROKEN[what](run_dir)
    with pytest.raises(freezeframe.RunError) as e:
        freezeframe.load(run_dir).summary()
    msg = str(e.value)
    assert str(run_dir) in msg and "\n" not in msg, msg


@pytest.mark.parametrize("command", [["summary"], ["summary", "--json"], ["check", "--json"], ["report"]])
@pytest.mark.parametrize("what", list(BROKEN))
def test_every_cli_command_on_a_broken_run_exits_2_with_one_line(tmp_path, capsys, what, command):
    run_dir = tmp_path / "my run"
    BROKEN[what](run_dir)
    code = cli.main([command[0], str(run_dir), *command[1:]])  # an exception escaping here is the bug
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(run_dir) in lines[0] and lines[0].startswith("freezeframe: error:"), err


def test_the_cli_process_prints_no_traceback_for_a_run_of_a_newer_schema(tmp_path, freezeframe_exe, cli_env):
    run_dir = tmp_path / "from the future"
    BROKEN["newer schema"](run_dir)
    out = subprocess.run([freezeframe_exe, "summary", str(run_dir)], capture_output=True, text=True,
                         env=cli_env, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert str(run_dir) in lines[0] and "schema version 2" in lines[0] and "upgrade freezeframe" in lines[0]


# -------------------------------------------------------------------------------- watch() input


def _model_and_opt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _no_hooks(model, opt):
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


# case: (model, optimizer, run_dir, options) -> (args, kwargs); words the message must hold
WATCH_CASES = {
    "a state_dict as the model": (lambda m, o, d: ((m.state_dict(), o, d), {}), ["torch.nn.Module", "OrderedDict"]),
    "a function as the model": (lambda m, o, d: ((lambda x: x, o, d), {}), ["torch.nn.Module", "function"]),
    "None as the model": (lambda m, o, d: ((None, o, d), {}), ["torch.nn.Module", "NoneType"]),
    "a list of modules as the model": (lambda m, o, d: (([m[0], m[2]], o, d), {}), ["torch.nn.Module", "list"]),
    "a string as the optimizer": (lambda m, o, d: ((m, "adam", d), {}), ["Optimizer", "str"]),
    "the optimizer class": (lambda m, o, d: ((m, torch.optim.SGD, d), {}), ["Optimizer", "type"]),
    "param groups as the optimizer": (lambda m, o, d: ((m, o.param_groups, d), {}), ["Optimizer", "dict"]),
    "a model inside the optimizer list": (lambda m, o, d: ((m, [o, m], d), {}), ["Optimizer", "Sequential"]),
    "None as the run directory": (lambda m, o, d: ((m, o, None), {}), ["run_dir", "None"]),
    "a number as the run directory": (lambda m, o, d: ((m, o, 3), {}), ["run_dir", "3"]),
    "a scaler that is not a GradScaler": (lambda m, o, d: ((m, o, d), {"scaler": "yes"}), ["scaler", "str"]),
    "a negative flush interval": (lambda m, o, d: ((m, o, d), {"flush_seconds": -1}), ["flush_seconds", "-1"]),
    "a flush interval as text": (lambda m, o, d: ((m, o, d), {"flush_seconds": "5"}), ["flush_seconds", "'5'"]),
    "an unknown reference device": (lambda m, o, d: ((m, o, d), {"reference_device": "nope"}),
                                    ["reference_device", "nope"]),
    "every as text": (lambda m, o, d: ((m, o, d), {"every": "5"}), ["every", "'5'"]),
    "a budget above 1": (lambda m, o, d: ((m, o, d), {"budget": 5}), ["budget", "5"]),
}


@pytest.mark.parametrize("case", list(WATCH_CASES))
def test_watch_refuses_bad_input_naming_it_before_anything_is_written(tmp_path, case):
    make, words = WATCH_CASES[case]
    model, opt = _model_and_opt()
    run_dir = tmp_path / "run"
    args, kwargs = make(model, opt, run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning instead of the refusal is not a refusal
        with pytest.raises((freezeframe.FreezeFrameError, ValueError)) as e:
            rec = freezeframe.watch(*args, **kwargs)
            rec.close()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), (case, msg)
    assert not run_dir.exists(), f"a refused watch() left {sorted(p.name for p in run_dir.iterdir())}"
    _no_hooks(model, opt)
    # the corrected call works on the same directory
    with freezeframe.watch(model, opt, run_dir, every=1):
        opt.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
    assert freezeframe.load(run_dir).summary()["run"]["steps"] == 1


@pytest.mark.parametrize("other", ["another dtype", "a parameter more", "a parameter renamed"])
def test_append_refuses_another_model_and_leaves_the_run_untouched(tmp_path, other):
    run_dir = tmp_path / "run"
    _tiny_run(run_dir)
    before = _tree(run_dir)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    if other == "another dtype":
        model.double()
        named = "0.weight"
    elif other == "a parameter more":
        model.register_parameter("scale", nn.Parameter(torch.ones(())))
        named = "scale"
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Identity(), nn.Linear(4, 2))
        named = "3.weight"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(freezeframe.FreezeFrameError) as e:
        freezeframe.watch(model, opt, run_dir, mode="append")
    msg = str(e.value)
    assert str(run_dir) in msg and "different model" in msg and named in msg and "\n" not in msg, msg
    assert _tree(run_dir) == before  # no file added, removed or changed (no lock left either)
    _no_hooks(model, opt)


# ------------------------------------------------------------------ two writers of one run directory

HOLDER = r"""
import sys, time
from pathlib import Path
from freezeframe.store.writer import acquire_lock  # the lock a recording process holds (no torch needed)

acquire_lock(Path(sys.argv[1]))
print("holding", flush=True)
time.sleep(300)
"""


def test_a_second_process_cannot_write_a_run_another_live_process_is_writing(tmp_path, cli_env):
    """The run's lock is held by another live process (here a light one that took it the way a
    recorder does): every mode of watch() is refused naming that process, and nothing changes."""
    run_dir = tmp_path / "shared run"
    _tiny_run(run_dir)
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    env = dict(cli_env, PYTHONPATH=os.pathsep.join([str(TESTS_DIR.parent / "src"), cli_env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "holding", (line, proc.stderr.read() if proc.poll() is not None else "")
        before = _tree(run_dir)
        model, opt = _model_and_opt()
        for mode in ("append", "overwrite", "new"):
            with pytest.raises(freezeframe.FreezeFrameError) as e:
                freezeframe.watch(model, opt, run_dir, mode=mode)
            msg = str(e.value)
            assert str(run_dir) in msg and "\n" not in msg, (mode, msg)
            if mode != "new":
                assert "another process" in msg and str(proc.pid) in msg, (mode, msg)
            _no_hooks(model, opt)
        assert _tree(run_dir) == before, "a refused writer changed the run"
        assert freezeframe.load(run_dir).summary()["run"]["steps"] == 2  # reading it meanwhile is fine
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_second_recorder_in_the_same_process_does_not_interleave_with_the_first(run_dir):
    """A notebook cell that calls watch() again without closing the first recorder: refused, or
    made safe — the run never holds two sessions' steps under the same numbers."""
    model, opt = _model_and_opt()

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()

    first = freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=0.05)
    try:
        steps(3)
        try:
            second = freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=0.05)
        except freezeframe.FreezeFrameError as e:
            assert str(run_dir) in str(e) and "\n" not in str(e)
            second = None
        steps(3)
        if second is not None:
            second.close()
        steps(2)
    finally:
        first.close()
    run = freezeframe.load(run_dir)
    summary = run.summary()
    steps_col = run.steps().column("step").to_pylist()
    assert len(steps_col) == len(set(steps_col)), f"step numbers recorded twice: {steps_col}"
    assert summary["run"]["steps"] == sum(s["steps"] for s in summary["stages"])
    sessions_seen = set(run.steps().column("session").to_pylist())
    assert sessions_seen <= {s["index"] for s in summary["run"]["sessions"]}, "rows of a session the manifest lost"
    assert summary["run"]["error"] is None


# ------------------------------------------------------------------------- names from the user's model

ODD = ["çé <b>", "two words", "<script>alert('x')</script>", "[bold red]not markup[/]", "émoji 🚀", "q\"u'o&te"]


def _odd_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    for k, name in enumerate(ODD):
        model.add_module(name, nn.Linear(3, 3))

    def forward(x):
        for name in ODD:
            x = torch.tanh(getattr(model, name)(x))
        return x

    model.forward = forward
    return model


def test_names_with_spaces_unicode_html_and_markup_are_recorded_and_shown_literally(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run <odd> & ünïcode"
    model = _odd_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stage = "<i>stage</i> [b]one[/b] ✓"
    _train_in_stage(model, opt, run_dir, stage)
    run = freezeframe.load(run_dir)
    summary = run.summary()
    expected = [f"{name}.{t}" for name in ODD for t in ("weight", "bias")]
    assert [p["name"] for p in summary["params"]] == expected
    assert [m["name"] for m in summary["modules"]] == ODD
    assert [s["name"] for s in summary["stages"]] == [stage]
    assert all(e["changed"] is True and e["grad_steps"] == 2 for p in summary["params"] for e in p["stages"])
    tensors = run.tensors()
    assert set(tensors.column("name").to_pylist()) == set(expected)

    # the JSON and the text summary show each name as written (no markup interpreted)
    assert cli.main(["summary", str(run_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in doc["params"]] == expected
    monkeypatch.setenv("COLUMNS", "250")
    assert cli.main(["summary", str(run_dir), "--depth", "1"]) == 0
    text = capsys.readouterr().out
    for name in ODD + ["<i>stage</i> [b]one[/b] ✓"]:
        assert name in text, (name, text)

    # the HTML report escapes every one of them
    report = tmp_path / "report.html"
    assert cli.main(["report", str(run_dir), "-o", str(report)]) == 0
    capsys.readouterr()
    page = report.read_text(encoding="utf-8")
    for raw in ["<script>alert('x')</script>", "<b>", "<i>stage</i>"]:
        assert raw not in page, f"{raw!r} is in the HTML unescaped"
    assert "çé" in page or "\\u00e7\\u00e9" in page


# ------------------------------------------------------- damaged data: never read as a clean run

def _nan_run(run_dir: Path) -> nn.Module:
    """Real training whose learning rate is far too high: the weights become NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        for _ in range(20):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            rec.log(loss=loss)
    return model


def _truncate(folder: Path) -> list[Path]:
    chunks = sorted(folder.glob("s*.parquet"))
    for f in chunks:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return chunks


# case: the table whose chunks are truncated -> words the summary header must hold
DAMAGED_DATA = {
    "tensors chunk truncated (the NaN's rows)": ("tensors", ["DAMAGED", "1 chunk could not be read"]),
    "steps chunk truncated": ("steps", ["0 of 20 steps read", "the manifest expects 20 steps, 0 could be read"]),
}


@pytest.mark.parametrize("case", list(DAMAGED_DATA))
def test_a_run_that_cannot_be_fully_read_is_never_checked_green_nor_called_complete(
        tmp_path, case, freezeframe_exe, cli_env):
    run_dir = tmp_path / "nan run"
    model = _nan_run(run_dir)
    assert any(torch.isnan(p).any() for p in model.state_dict().values())  # the program's own state
    intact = subprocess.run([freezeframe_exe, "check", str(run_dir)], capture_output=True, text=True,
                            env=cli_env, timeout=120)
    assert intact.returncode == 1 and "nonfinite" in intact.stdout, intact.stdout + intact.stderr
    table, words = DAMAGED_DATA[case]
    victims = _truncate(run_dir / table)
    for command in (["check"], ["check", "--json"]):
        out = subprocess.run([freezeframe_exe, *command, str(run_dir)], capture_output=True, text=True,
                             env=cli_env, timeout=120)
        assert out.returncode == 2 and out.stdout == "", (command, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot be fully read" in lines[0] and victims[0].name in lines[0], out.stderr
    out = subprocess.run([freezeframe_exe, "summary", str(run_dir)], capture_output=True, text=True,
                         env=dict(cli_env, COLUMNS="400"), timeout=120)
    head = out.stdout.splitlines()[0]
    assert out.returncode == 0 and "complete" not in head and all(w in head for w in words), head
    run = freezeframe.load(run_dir)
    assert not run.fully_read() and len(run.unreadable) == 1 and victims[0].name in run.unreadable[0]
    assert run.summary()["run"]["complete"] is False and run.steps_expected == 20


# ----------------------------------------------------- files given to `diff` that are no checkpoint

NOT_CHECKPOINTS = {
    "ordinary text notes": (lambda p: p.write_text("epoch 3: loss 0.12\nremember to unfreeze\n"), "a text file"),
    "a JSON file": (lambda p: p.write_text(json.dumps({"lr": 1e-3, "layers": [1, 2]})), "a JSON file"),
    "random bytes": (lambda p: p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                                           dtype=torch.uint8).numpy().tobytes()), "not a checkpoint"),
    "random bytes after a pickle header": (lambda p: p.write_bytes(b"\x80\x02\xee\xee" + bytes(range(256)) * 8),
                                           "not a readable checkpoint"),
    "a NumPy array file": (lambda p: __import__("numpy").save(p, __import__("numpy").zeros(3)), "NumPy"),
}


@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
def test_diff_of_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, case, freezeframe_exe, cli_env):
    good = tmp_path / "a.pth"
    torch.save(nn.Linear(3, 2).state_dict(), good)
    make, words = NOT_CHECKPOINTS[case]
    other = tmp_path / "notes.txt"
    make(other)
    other = other if other.exists() else tmp_path / "notes.txt.npy"
    out = subprocess.run([freezeframe_exe, "diff", str(good), str(other)], capture_output=True, text=True,
                         env=cli_env, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and out.stdout == "" and len(lines) == 1, out.stderr
    assert str(other) in lines[0] and words in lines[0] and "other than tensors" not in lines[0], lines[0]


# ------------------------------------------------ names holding terminal escape sequences (untrusted)

HOSTILE = {
    "clear": "\x1b[2J\x1b[H", "red": "\x1b[31mred", "title": "\x1b]0;pwned\x07t",
    "link": "\x1b]8;;http://evil/\x1b\\click\x1b]8;;\x1b\\", "c1": "\x9b31mcsi", "bell": "b\x07\x08\x0d",
    "bidi": "\u202egnp\u2066x\u2069",
}


def _hostile_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    for name in HOSTILE.values():
        model.add_module(name, nn.Linear(3, 3))
    return model


def _no_control_bytes(raw: bytes, command) -> str:
    assert b"\x1b" not in raw and b"\x07" not in raw, (command, raw[:2000])
    text = raw.decode("utf-8")  # strict: a lone 0x9b (an 8-bit CSI) is not UTF-8
    for bad in ("\x9b", "\u202e", "\u2066", "\x08", "\r"):
        assert bad not in text, (command, bad)
    return text


def test_escape_sequences_in_module_parameter_and_stage_names_never_reach_the_terminal(
        tmp_path, freezeframe_exe, cli_env):
    run_dir = tmp_path / "run"
    model = _hostile_model()
    left_out = (HOSTILE["red"] + ".", HOSTILE["c1"] + ".")  # trainable, in no optimizer: a finding names them
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith(left_out)], lr=0.1)
    stage = "\x1b]0;owned\x07\x1b[2Jstage\u202e"
    torch.save(model.state_dict(), tmp_path / "a.pth")
    _train_in_stage(model, opt, run_dir, stage)
    torch.save(model.state_dict(), tmp_path / "b.pth")
    env = dict(cli_env, COLUMNS="400")
    for command in (["summary", str(run_dir), "--depth", "1"], ["check", str(run_dir)],
                    ["diff", str(tmp_path / "a.pth"), str(tmp_path / "b.pth")]):
        out = subprocess.run([freezeframe_exe, *command], capture_output=True, env=env, timeout=120)
        assert out.returncode == (1 if command[0] == "check" else 0), out.stderr
        text = _no_control_bytes(out.stdout, command)
        assert "\\x1b[31mred" in text and "\\x9b31mcsi" in text, (command, text)
        if command[0] == "summary":
            assert "\\x1b]0;owned\\x07\\x1b[2Jstage\\u202e" in text, text
    # --json carries every name exactly, as JSON escapes (no raw control byte on stdout)
    for command in (["summary", str(run_dir), "--json"], ["diff", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"),
                                                          "--json"]):
        out = subprocess.run([freezeframe_exe, *command], capture_output=True, env=env, timeout=120)
        _no_control_bytes(out.stdout, command)
        assert "\\u001b[31mred" in out.stdout.decode()
        doc = json.loads(out.stdout)
        names = {p["name"] for p in doc["params"]}
        assert {f"{n}.weight" for n in HOSTILE.values()} <= names
        if command[0] == "summary":
            assert doc["stages"][0]["name"] == stage
