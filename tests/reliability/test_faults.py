"""Fault injection: an error at any entry point of the recorder — its hooks, the metrics, the
hashing, the writer thread, a flush, a full disk — or a model changed under it mid-run (another
dtype, a parameter's data of another shape, a deleted parameter) never changes the training it
watches: the weights, buffers, gradients, optimizer state, every loss and the RNG come out bit for
bit as in the same training unwatched, and the user gets ONE warning, not one per step.

Complements tests/test_core_safety.py (norms, content_hash at a stage end, snapshot, the first
write of the writer thread): here every other entry point, faults that start mid-run (keyed to the
step the training loop has reached, not to call counts), and what the interrupted record holds.
"""

from __future__ import annotations

import errno
import sys
import threading
import time
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freezeframe
import freezeframe.capture.metrics as ff_metrics
import freezeframe.hashing as ff_hashing
import freezeframe.store.writer as ff_writer
from freezeframe.capture.columns import Columns
from freezeframe.capture.recorder import Recorder


STEPS = 9  # stage "warm": steps 0-2; automatic stages: 3-4 and 5; stage "last": 6-8 (a tracked optimizer)
STAGES = ["warm", "stage 1", "stage 2", "last"]
TRACK, CLOSE = 5.5, float("inf")  # phase["step"] while the new optimizer is tracked, and while closing


class Net(nn.Module):
    """Linear-BatchNorm-ReLU-Dropout body (float and integer buffers, the global RNG used every
    step), a middle layer and a head; `fc2` takes over if `fc` is deleted."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2))
        self.mid = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.mid(self.body(x)))
        head = self.fc if "fc" in self._modules else self.fc2
        return head(h)


def _batch(step: int, k: int = 0):
    g = torch.Generator().manual_seed(1000 * step + k)
    return torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)


def training(run_dir=None, *, mutate=None, phase=None, after_watch=None, **options) -> dict:
    """The same training, watched (run_dir given) or not. `mutate(step, model)` runs before each
    step's forward; `phase["step"]` follows the step the loop is in (TRACK, CLOSE in between);
    `after_watch(model, rec)` runs once watching has begun."""
    phase = phase if phase is not None else {}
    torch.manual_seed(5)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=0.01)  # no state: shapes may change
    torch.manual_seed(17)
    losses = []
    rec = None
    if run_dir is not None:
        options.setdefault("every", 1)
        options.setdefault("flush_seconds", 0.05)  # flushes between steps: the writer is busy throughout
        rec = freezeframe.watch(model, opt, run_dir, **options)
        if after_watch is not None:
            after_watch(model, rec)

    def one_step(step, optimizer):
        phase["step"] = step
        if mutate is not None:
            mutate(step, model)
        optimizer.zero_grad()
        dtype = next(model.parameters()).dtype
        for k in range(2 if step == 1 else 1):  # gradient accumulation at step 1
            x, y = _batch(step, k)
            loss = F.cross_entropy(model(x.to(dtype)).float(), y)
            loss.backward()
            losses.append(loss.detach().clone())
        optimizer.step()
        if rec is not None:
            rec.log(loss=loss)
        del loss

    try:
        with rec.stage("warm") if rec is not None else _null():
            for s in range(3):
                one_step(s, opt)
        model.body[0].requires_grad_(False)  # automatic stages: a boundary after a stage end...
        for s in range(3, 5):
            one_step(s, opt)
        model.mid.requires_grad_(False)      # ... and one discovered only at the next step
        one_step(5, opt)
        model.eval()
        with torch.no_grad():
            x, _ = _batch(99)
            losses.append(model(x.to(next(model.parameters()).dtype)).float().sum())
        model.train()
        model.body[0].requires_grad_(True)
        model.mid.requires_grad_(True)
        opt2 = torch.optim.Adam(model.parameters(), lr=1e-2)
        if rec is not None:
            phase["step"] = TRACK
            rec.track(opt2)
        with rec.stage("last") if rec is not None else _null():
            for s in range(6, 9):
                one_step(s, opt2)
    finally:
        phase["step"] = CLOSE
        if rec is not None:
            rec.close()
    return {"model": model, "opts": [opt, opt2], "losses": losses, "rng": torch.get_rng_state(), "rec": rec}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------ comparisons


def _bytes(t: torch.Tensor) -> tuple:
    t = t.detach().cpu().contiguous()
    return (str(t.dtype), tuple(t.shape), t.numpy().tobytes() if t.dtype != torch.bfloat16 else
            t.view(torch.int16).numpy().tobytes())


def _state_bytes(obj) -> object:
    """Every tensor of a (nested) state dict as (dtype, shape, bytes)."""
    if isinstance(obj, torch.Tensor):
        return _bytes(obj)
    if isinstance(obj, dict):
        return {k: _state_bytes(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_state_bytes(v) for v in obj]
    return obj


def assert_same_training(plain: dict, watched: dict) -> None:
    """Bit for bit: every parameter and buffer (state_dict), gradient, optimizer state, loss, RNG."""
    sa, sb = plain["model"].state_dict(), watched["model"].state_dict()
    assert list(sa) == list(sb)
    for n in sa:
        assert _bytes(sa[n]) == _bytes(sb[n]), f"{n} differs from the unwatched training"
    for (n, pa), (_, pb) in zip(plain["model"].named_parameters(), watched["model"].named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), f"{n}.grad"
        assert pa.grad is None or _bytes(pa.grad) == _bytes(pb.grad), f"{n}.grad differs"
    for k, (oa, ob) in enumerate(zip(plain["opts"], watched["opts"])):
        assert _state_bytes(oa.state_dict()) == _state_bytes(ob.state_dict()), f"optimizer {k} state differs"
    assert [_bytes(x) for x in plain["losses"]] == [_bytes(x) for x in watched["losses"]], "a loss differs"
    assert torch.equal(plain["rng"], watched["rng"]), "the global RNG was used differently"


def assert_no_hooks_left(model: nn.Module, opts) -> None:
    for name, m in model.named_modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, f"hook left on module {name!r}"
    for k, opt in enumerate(opts):
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks, f"hook left on optimizer {k}"
    for n, p in model.named_parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None), f"grad hook left on {n}"


def _assert_writer_thread_ended(threads_before: set) -> None:
    """A recorder that stopped leaves no background thread behind."""
    deadline = time.monotonic() + 3
    while True:
        left = [t.name for t in threading.enumerate() if t not in threads_before and t.name.startswith("freezeframe")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"threads still running after the recorder stopped: {left}"


def freezeframe_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "freezeframe" in str(w.message)]


@pytest.fixture(scope="module")
def plain():
    return training()


def _fail_from_step(monkeypatch, owner, attr, phase: dict, when, exc):
    """Make `owner.attr` raise `exc` once the training loop reaches `when(phase["step"])`.
    A module-level function is replaced in every freezeframe module that imported it by name."""
    real = getattr(owner, attr)
    fired = {"n": 0}

    def failing(*args, **kwargs):
        if when(phase.get("step")):
            fired["n"] += 1
            raise exc
        return real(*args, **kwargs)

    targets = [owner]
    if isinstance(owner, types.ModuleType):
        targets = [m for name, m in list(sys.modules.items())
                   if name.startswith("freezeframe") and isinstance(m, types.ModuleType)
                   and getattr(m, attr, None) is real]
    for t in targets:
        monkeypatch.setattr(t, attr, failing)
    return fired


def _at(k):
    return lambda s: s is not None and s >= k


def _closing(s):
    return s == CLOSE


ENOSPC = OSError(errno.ENOSPC, "No space left on device")

# name: (owner, attribute, when, exception, how many steps the record keeps: "prefix" (any prefix) or a
# range). Faults in the write path cannot write the manifest that names the error.
WRITE_PATH = {"flush", "writer queue", "column hand-over", "disk full mid-run", "disk full on the manifest",
              "disk full at close"}
FAULTS = {
    "step pre-hook": (Recorder, "_pre_step", _at(4), RuntimeError("injected"), (4, 4)),
    "step post-hook": (Recorder, "_post_step", _at(4), RuntimeError("injected"), (4, 4)),
    "forward pre-hook": (Recorder, "_forward_pre", _at(4), RuntimeError("injected"), (4, 4)),
    "forward hook": (Recorder, "_forward_post", _at(4), RuntimeError("injected"), (4, 4)),
    "step metrics": (ff_metrics, "step_metrics", _at(4), RuntimeError("injected"), (4, 5)),
    # the end of stage 1, discovered at step 5
    "stage-end metrics": (ff_metrics, "state_metrics", _at(5), FloatingPointError("injected"), (5, 5)),
    "norms mid-run": (ff_metrics, "norms", _at(7), RuntimeError("injected"), (7, 8)),
    # the automatic boundary at step 3 hashes every tensor; so do the stage ends
    "hashing": (ff_hashing, "content_hash", _at(3), ValueError("injected"), (3, 3)),
    # a failed flush loses the steps it carried (never flushed), the earlier ones are kept
    "flush": (Recorder, "_flush", _at(4), RuntimeError("injected"), "prefix"),
    "writer queue": (ff_writer.RunWriter, "submit", _at(4), RuntimeError("injected"), "prefix"),
    "column hand-over": (Columns, "take", _at(4), MemoryError("injected"), (0, 5)),
    "disk full mid-run": (ff_writer.RunWriter, "_write_table", _at(4), ENOSPC, "prefix"),
    "disk full on the manifest": (ff_writer, "atomic_write_bytes", _at(4), ENOSPC, "prefix"),
    # what the writer thread had not yet written when the disk filled is lost, the rest kept
    "disk full at close": (ff_writer.RunWriter, "_write_table", _closing, ENOSPC, "prefix"),
    "log()": (Recorder, "_log", _at(2), TypeError("injected"), (2, 3)),
    "track()": (Recorder, "_check_structure", lambda s: s == TRACK, RuntimeError("injected"), (6, 6)),
}


@pytest.mark.parametrize("where", list(FAULTS))
def test_a_fault_is_one_warning_and_training_is_bitwise_unchanged(plain, run_dir, monkeypatch, where):
    owner, attr, when, exc, kept = FAULTS[where]
    phase: dict = {}
    fired = _fail_from_step(monkeypatch, owner, attr, phase, when, exc)
    threads_before = set(threading.enumerate())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = training(run_dir, phase=phase)
    monkeypatch.undo()
    assert fired["n"] >= 1, f"the injected fault in {attr} never fired"
    ours = freezeframe_warnings(caught)
    assert len(ours) == 1, ours
    assert str(exc) in ours[0] and "Training is not affected" in ours[0], ours[0]
    assert_same_training(plain, watched)
    assert_no_hooks_left(watched["model"], watched["opts"])
    assert not (run_dir / "writer.lock").exists(), "the lock outlived the failed recorder"

    run = freezeframe.load(run_dir)  # whatever reached the disk still reads
    summary = run.summary()
    assert summary["run"]["complete"] is False
    if where not in WRITE_PATH:
        assert summary["run"]["error"] and str(exc) in summary["run"]["error"], summary["run"]["error"]
    steps = run.steps().column("step").to_pylist()
    assert steps == list(range(len(steps))), f"the record is not a prefix of the steps: {steps}"
    assert summary["run"]["recovered_steps"] == len(steps)
    if kept != "prefix":
        lo, hi = kept
        assert lo <= len(steps) <= hi, f"{len(steps)} steps kept, expected {lo}..{hi}"
    _assert_writer_thread_ended(threads_before)


def test_gradient_marks_that_cannot_be_taken_do_not_break_training(plain, run_dir):
    """The post-accumulate-grad hooks run inside the user's `loss.backward()`; they only store
    their index in a dict (a C call that cannot raise), and the step takes those marks
    (docs/recording.md, "The step path"). From step 4 on a mark no tensor has is among them, so
    taking them fails on every step: that must be one warning, not an error in the user's loop."""
    fired = {"n": 0}
    holder: dict = {}

    def keep(model, rec):
        assert any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters()), \
            "freezeframe placed no grad hook"
        holder["rec"] = rec

    def bad_mark(step, model):
        if _at(4)(step):
            fired["n"] += 1
            holder["rec"]._got[10**6] = None  # the dict the hooks write into

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = training(run_dir, mutate=bad_mark, after_watch=keep)  # an exception here is the bug
    assert fired["n"] >= 1
    ours = freezeframe_warnings(caught)
    assert len(ours) == 1, ours
    assert_same_training(plain, watched)
    assert_no_hooks_left(watched["model"], watched["opts"])


def test_disk_full_when_watching_begins_is_one_warning_and_training_goes_on(plain, run_dir, monkeypatch):
    """The reference weights are the first thing written: a full disk at `watch()` must not stop
    the user's script before its first step (the rule is the same as for a full disk later)."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = training(run_dir)  # an OSError out of watch() here is the bug
    monkeypatch.undo()
    ours = freezeframe_warnings(caught)
    assert len(ours) == 1, ours
    assert_same_training(plain, watched)
    assert_no_hooks_left(watched["model"], watched["opts"])


def test_a_failed_compaction_at_close_keeps_a_complete_readable_run(plain, run_dir, monkeypatch):
    """Compaction is an optimisation: when it fails (disk full) the chunks stay and the run is complete."""
    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ff_writer.RunWriter, "_compact", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = training(run_dir)
    monkeypatch.undo()
    assert len(freezeframe_warnings(caught)) <= 1
    assert_same_training(plain, watched)
    run = freezeframe.load(run_dir)
    summary = run.summary()
    assert summary["run"]["complete"] is True and summary["run"]["error"] is None
    assert run.steps().column("step").to_pylist() == list(range(STEPS))
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert run.warnings == []


# ----------------------------------------------------------------- the model changed under the recorder


def _to_double(step, model):
    if step == 4:
        model.double()


def _to_half(step, model):
    if step == 4:
        model.half()


def _reshape_head_data(step, model):
    """A parameter's `.data` replaced by a tensor of another shape (the same Parameter object)."""
    if step == 4:
        with torch.no_grad():
            model.fc.weight.data = torch.full((5, 8), 0.01)
            model.fc.bias.data = torch.zeros(5)


def _delete_head(step, model):
    """`del model.fc` mid-stage; the forward falls back to fc2 (the optimizer still holds fc)."""
    if step == 4:
        del model.fc


def _plain_with(mutate):
    return training(mutate=mutate)


@pytest.mark.parametrize("mutate", [_to_double, _to_half], ids=["double", "half"])
def test_a_dtype_change_mid_run_leaves_training_unchanged_and_is_recorded_or_one_warning(run_dir, mutate):
    plain = _plain_with(mutate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = training(run_dir, mutate=mutate)
    assert_same_training(plain, watched)
    assert_no_hooks_left(watched["model"], watched["opts"])
    ours = freezeframe_warnings(caught)
    run = freezeframe.load(run_dir)
    summary = run.summary()
    steps = run.steps().column("step").to_pylist()
    assert steps == list(range(len(steps)))
    if ours:  # recording stopped: one warning, an interrupted record
        assert len(ours) == 1, ours
        assert summary["run"]["complete"] is False and summary["run"]["error"]
    else:     # recorded through: every step, and the dtype change is a change of bytes
        assert summary["run"]["complete"] is True and len(steps) == STEPS
        dt = torch.float64 if mutate is _to_double else torch.float16
        fc2 = next(p for p in summary["params"] if p["name"] == "fc2.weight")
        # fc2 never gets a gradient: the cast at step 4 alone rewrites its bytes, in stage 1
        assert [e["changed"] for e in fc2["stages"]] == [False, True, False, False], (dt, fc2["stages"])
        assert fc2["shape"] == [3, 8]


def test_a_parameter_data_of_another_shape_mid_run(run_dir):
    plain = _plain_with(_reshape_head_data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = training(run_dir, mutate=_reshape_head_data)
    assert_same_training(plain, watched)
    assert_no_hooks_left(watched["model"], watched["opts"])
    assert len(freezeframe_warnings(caught)) <= 1, freezeframe_warnings(caught)
    run = freezeframe.load(run_dir)
    steps = run.steps().column("step").to_pylist()
    assert steps == list(range(len(steps))) and len(steps) >= 4
    run.summary()  # builds


def test_a_parameter_deleted_mid_run_is_one_warning_and_the_rest_is_recorded(run_dir):
    plain = _plain_with(_delete_head)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = training(run_dir, mutate=_delete_head)
    assert_same_training(plain, watched)
    assert_no_hooks_left(watched["model"], watched["opts"])
    ours = freezeframe_warnings(caught)
    assert len(ours) == 1, ours
    assert "fc.weight" in ours[0] and "fc.bias" in ours[0]
    run = freezeframe.load(run_dir)
    summary = run.summary()
    assert summary["run"]["complete"] is True
    assert run.steps().column("step").to_pylist() == list(range(STEPS))
    by_name = {p["name"]: p for p in summary["params"]}
    assert set(by_name) == {n for n, _ in Net().named_parameters()}  # the map of the watched model
    # fc trains until it is deleted at step 4 (stage 1 holds steps 3-4), then never again
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert [e["grad_steps"] for e in by_name["fc.weight"]["stages"]] == [3, 1, 0, 0]
    assert [e["grad_steps"] for e in by_name["fc2.weight"]["stages"]] == [0, 1, 1, 3]
    assert [e["changed"] for e in by_name["fc.weight"]["stages"]][2:] == [False, False]


def test_after_a_failed_write_nothing_later_reaches_the_disk(run_dir, monkeypatch):
    """The writer fails on the chunk of step 2; the recorder learns of it at step 3's flush and
    stops. Step 3 must not be written after the lost step 2: the record stays a prefix."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = freezeframe.watch(model, opt, run_dir, every=1, flush_seconds=0)
    real = ff_writer.RunWriter._write_table
    state = {"fail": False}

    def write_table(self, final, table):
        if state["fail"]:
            state["fail"] = False
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(self, final, table)

    monkeypatch.setattr(ff_writer.RunWriter, "_write_table", write_table)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            state["fail"] = step == 2
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            rec._writer.drain()  # the writer has met (or not) its fault before the next step
        rec.close()
    assert len(freezeframe_warnings(caught)) == 1
    steps = freezeframe.load(run_dir).steps().column("step").to_pylist()
    assert steps == [0, 1], steps
