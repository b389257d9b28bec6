"""A model that gains parameters under new names after watch(): the new tensors are recorded
from the next stage on, earlier stages and rows stay as they were, and a later process can
append to the grown run. Oracle: the program's own tensors (oracle.Tape, state dicts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pyarrow.parquet as pq
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freezeframe
import oracle
from freezeframe.errors import FreezeFrameError

NEW = ["adapter.weight", "adapter.bias"]


class Net(nn.Module):
    """A body with a BatchNorm (buffers), a head; `adapter` (between them in the forward pass)
    may be added later, or declared at build time (`adapter_first`: then named_parameters()
    lists it before the head, unlike a model that gained it while recording)."""

    def __init__(self, adapter_first: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        if adapter_first:
            self.adapter = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x)
        if hasattr(self, "adapter"):
            h = h + self.adapter(h)
        return self.head(h)


def _batch(step: int):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(model, opt, steps, start, tape=None, opt_index=0):
    for s in range(start, start + steps):
        x, y = _batch(s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if tape is not None:
            tape.step(opt, opt_index=opt_index)
        else:
            opt.step()


def _first_stage_only(run_dir):
    """The same training as `_grow`, stopped before the model changes."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("without adapter"):
            _train(model, opt, 3, 0)
    return freezeframe.load(run_dir).summary()


def _grow(run_dir, how):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = oracle.state(model)
    with pytest.warns(RuntimeWarning, match=r"new: adapter.weight, adapter.bias \(recorded from the next step\)"):
        with freezeframe.watch(model, opt, run_dir, every=1) as rec:
            with rec.stage("without adapter"):
                _train(model, opt, 3, 0)
            model.adapter = nn.Linear(6, 6)
            first = oracle.state(model)
            tape = oracle.Tape(model, first_step=3, ref={**start, **{n: first[n] for n in NEW}})
            with rec.stage("with adapter"):
                if how == "add_param_group":
                    opt.add_param_group({"params": list(model.adapter.parameters()), "lr": 0.1})
                    _train(model, opt, 4, 3, tape)
                else:
                    opt2 = torch.optim.Adam(model.parameters(), lr=1e-2)
                    rec.track(opt2)
                    _train(model, opt2, 4, 3, tape, opt_index=1)
    return model, start, first, tape, oracle.state(model)


@pytest.mark.parametrize("how", ["add_param_group", "track"])
def test_parameters_added_after_watch_are_recorded_from_the_next_stage(run_dir, tmp_path, how):
    model, start, first, tape, end = _grow(run_dir, how)
    run = freezeframe.load(run_dir)
    m = run.manifest
    names = [p["name"] for p in m["model"]["params"]]
    assert names == oracle.param_names(Net()) + NEW
    assert [p.get("from_stage") for p in m["model"]["params"]][-2:] == [1, 1]
    st = m["stages"]
    assert [s["steps"] for s in st] == [3, 4]
    assert st[1]["model_changes"] == {"replaced": [], "added": NEW, "removed": []}
    # the tensors that were there go on bitwise; the new ones had no previous end
    assert st[1]["starts_from_previous_end"] is True and st[1]["changed_since_previous_end"] == []

    # every metric row of the second stage, new tensors and buffers included, against the tape
    # (float64 recomputation of the program's own tensors; drift of the new ones from their first value)
    tensors = run.tensors()
    assert oracle.compare_with_tape(tensors.filter(pc.greater_equal(tensors.column("step"), 3)), tape) == []
    assert set(NEW) <= set(tensors.column("name").to_pylist())

    summary = run.summary()
    oracle.check_summary_schema(oracle.strict_json(json.dumps(summary, allow_nan=False)))
    by_name = {p["name"]: p for p in summary["params"]}
    for n in NEW:
        p = by_name[n]
        assert p["present_from_stage"] == 1
        e0, e1 = p["stages"]
        assert e0["trainable"] is None and e0["changed"] is None and e0["drift_rel"] is None
        assert e1["trainable"] is True and e1["in_optimizer"] is True
        assert e1["grad_steps"] == 4  # every step's backward reached them
        assert e1["changed"] == (not oracle.same_bytes(end[n], first[n])) is True
        assert oracle.isclose(e1["drift_abs"], oracle.dist(end[n], first[n]))
        assert oracle.isclose(p["ref_norm"], oracle.norm(first[n]))
        assert oracle.isclose(e1["update_ratio_median"], tape.update_ratio_median(n, list(range(3, 7))))
    s1 = run.manifest["stages"][1]
    for n in NEW:
        i = names.index(n)
        assert s1["start_hashes"][i] == oracle.content_hash(first[n])
        assert s1["end_hashes"][i] == oracle.content_hash(end[n])
        assert s1["grad_steps"][i] == 4
    assert summary["run"]["params_total"] == sum(p.numel() for p in model.parameters())
    (f,) = [f for f in summary["findings"] if f["code"] == "model-changed"]
    assert f["stage"] == 1 and f["params"] == NEW
    # W_ref of the new tensors is their first value, in the run's reference file
    ref = run.reference()
    for n in NEW:
        assert oracle.same_bytes(ref[n], first[n])
    assert oracle.same_bytes(ref["head.weight"], start["head.weight"])

    # the stage before the change is what a run stopped before it says, to the byte
    alone = _first_stage_only(tmp_path / "alone")
    assert summary["stages"][0] == alone["stages"][0]
    for p in alone["params"]:
        assert by_name[p["name"]]["stages"][0] == p["stages"][0]
    assert [b["stages"][0] for b in summary["buffers"]] == [b["stages"][0] for b in alone["buffers"]]

    # on disk the indices are append-only: old rows keep theirs (buffers right after the first
    # parameters), the new parameters come after the buffers
    raw = pq.read_table(run_dir / "tensors").to_pydict()
    P0, B = len(names) - len(NEW), len(m["model"]["buffers"])
    assert json.loads((run_dir / "manifest.json").read_text())["model"]["buffers_at"] == P0
    early = {t for s, t in zip(raw["step"], raw["tensor"]) if s < 3}
    assert early == set(range(P0 + B))
    late = {t for s, t in zip(raw["step"], raw["tensor"]) if s >= 3}
    assert {P0 + B, P0 + B + 1} <= late


_SECOND = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    sys.path.insert(0, {tests!r})
    from test_core_growth import Net, _batch
    import freezeframe
    model = Net(adapter_first=True)          # the adapter declared before the head this time
    model.load_state_dict(torch.load({weights!r}))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, {run!r}, every=1) as rec:
        with rec.stage("second process"):
            for s in range(7, 9):
                x, y = _batch(s)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    torch.save({{k: v.clone() for k, v in model.state_dict().items()}}, {final!r})
""")


def test_a_second_process_appends_to_the_grown_run(run_dir, tmp_path, cli_env):
    model, start, first, tape, end = _grow(run_dir, "add_param_group")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    script = _SECOND.format(tests=os.path.dirname(__file__), weights=str(tmp_path / "w.pt"), run=str(run_dir),
                            final=str(tmp_path / "final.pt"))
    done = subprocess.run([sys.executable, "-c", script], env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    final = torch.load(tmp_path / "final.pt")
    run = freezeframe.load(run_dir)
    names = [p["name"] for p in run.manifest["model"]["params"]]
    assert names == oracle.param_names(Net()) + NEW  # the stored order, not the new model's
    st = run.manifest["stages"]
    assert [s["name"] for s in st] == ["without adapter", "with adapter", "second process"]
    assert [s["session"] for s in st] == [0, 0, 1]
    assert st[2]["starts_from_previous_end"] is True and st[2]["continuity"] == "bitwise"
    for n in names:
        i = names.index(n)
        assert st[2]["end_hashes"][i] == oracle.content_hash(final[n]), n
        assert st[2]["grad_steps"][i] == 2, n
    summary = run.summary()
    by_name = {p["name"]: p for p in summary["params"]}
    for n in NEW:
        e2 = by_name[n]["stages"][2]
        assert e2["trainable"] is True and e2["changed"] is True
        assert oracle.isclose(e2["drift_abs"], oracle.dist(final[n], first[n]))  # still from their first value
    assert oracle.isclose(by_name["head.weight"]["stages"][2]["drift_abs"],
                          oracle.dist(final["head.weight"], start["head.weight"]))
    # the second session's rows land on the right names
    t = run.tensors()
    rows = oracle.stored_metrics(t.filter(pc.greater_equal(t.column("step"), 7)))
    assert set(rows[8]) == set(names) | set(oracle.float_buffer_names(model))
    assert oracle.isclose(rows[8]["adapter.weight"][3], oracle.dist(final["adapter.weight"], first["adapter.weight"]))
    assert oracle.isclose(rows[8]["body.1.running_mean"][2], oracle.norm(final["body.1.running_mean"]))


def test_a_model_without_the_added_parameters_is_refused_for_append(run_dir):
    _grow(run_dir, "add_param_group")
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(FreezeFrameError, match="adapter.weight"):
        freezeframe.watch(model, opt, run_dir)


def test_a_new_name_for_a_known_tensor_is_an_alias(run_dir):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with freezeframe.watch(model, opt, run_dir, every=1) as rec:
            _train(model, opt, 2, 0)
            model.tied = model.head  # the same tensors under more names
            with rec.stage("after"):
                _train(model, opt, 2, 2)
    m = freezeframe.load(run_dir).manifest
    params = m["model"]["params"]
    assert [p["name"] for p in params] == oracle.param_names(Net())
    assert next(p for p in params if p["name"] == "head.weight")["aliases"] == ["tied.weight"]
    assert "buffers_at" not in m["model"]


def test_under_torch_distributed_new_names_are_listed_not_recorded(run_dir, tmp_path):
    """Ranks could see a new module at different times: the run keeps the parameters watching
    began with, with one warning, and the finding says the new ones are not recorded."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with pytest.warns(RuntimeWarning, match=r"new: adapter.weight, adapter.bias \(not recorded"):
            with freezeframe.watch(model, opt, run_dir, every=1) as rec:
                _train(model, opt, 2, 0)
                model.adapter = nn.Linear(6, 6)
                opt.add_param_group({"params": list(model.adapter.parameters())})
                _train(model, opt, 2, 2)
    finally:
        dist.destroy_process_group()
    run = freezeframe.load(run_dir)
    assert [p["name"] for p in run.manifest["model"]["params"]] == oracle.param_names(Net())
    st = run.manifest["stages"]
    assert [s["steps"] for s in st] == [2, 2] and st[1]["model_changes"]["added"] == NEW
    (f,) = [f for f in run.summary()["findings"] if f["code"] == "model-changed"]
    assert "not recorded" in f["message"] and "recorded from this stage on" not in f["message"]


@pytest.mark.parametrize("field, value", [("buffers_at", 0), ("buffers_at", "6"), ("buffers_at", 99),
                                          ("from_stage", -1), ("from_stage", "1")])
def test_a_damaged_index_space_field_is_one_line_exit_2(run_dir, cli_env, freezeframe_exe, field, value):
    _grow(run_dir, "add_param_group")
    mpath = run_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    if field == "buffers_at":
        m["model"]["buffers_at"] = value
    else:
        m["model"]["params"][-1]["from_stage"] = value
    mpath.write_text(json.dumps(m))
    done = subprocess.run([freezeframe_exe, "summary", str(run_dir)], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert field in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
