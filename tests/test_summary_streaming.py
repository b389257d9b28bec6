"""The summary's aggregates of the tensors table are streamed from its Parquet chunks: they equal
a slow obvious computation over `Run.tensors()` (plain Python, numpy's median), the table is not
loaded to build them, and a chunk whose data is damaged (or that is truncated) is left out and
named, the summary then being that of the other chunks. The run: two sessions (two chunk files),
parameters added in a later stage (the reader's index remap), a NaN injected in the second."""

from __future__ import annotations

import math
import shutil
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freezeframe
from oracle import aggregates_oracle


class Net(nn.Module):
    """A body with a BatchNorm (buffers) and a head; `adapter` is added while recording."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x)
        if hasattr(self, "adapter"):
            h = h + self.adapter(h)
        return self.head(h)


def _train(model, opt, steps, start, nan_at=None):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(700 + s)
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if s == nan_at:
            model.head.bias.grad[0] = float("nan")  # a non-finite update from here on
        opt.step()


def _record(run_dir, nan=True):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "new: adapter.weight, ..."
        with freezeframe.watch(model, opt, run_dir, every=1) as rec:
            with rec.stage("body and head"):
                _train(model, opt, 4, 0)
            model.adapter = nn.Linear(6, 6)
            opt.add_param_group({"params": list(model.adapter.parameters()), "lr": 0.1})
            with rec.stage("with adapter"):
                _train(model, opt, 3, 4)
        with freezeframe.watch(model, opt, run_dir, every=1, mode="append") as rec:
            with rec.stage("more"):
                _train(model, opt, 5, 7, nan_at=9 if nan else None)
    return sorted((run_dir / "tensors").glob("*.parquet"))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    d = tmp_path_factory.mktemp("streaming") / "run"
    files = _record(d)
    assert len(files) == 2, files          # one chunk file per session
    return d


def _oracle(run):
    """Per (stage, tensor): the median update ratio, the last recorded drift; the first
    non-finite row — by plain Python over the whole table."""
    steps = run.steps()
    stage_of = dict(zip(steps.column("step").to_pylist(), steps.column("stage").to_pylist()))
    return aggregates_oracle(stage_of, run.tensors().to_pylist())


def test_the_streamed_aggregates_equal_the_whole_table_oracle(recorded):
    run = freezeframe.load(recorded)
    summary = run.summary()
    medians, last, first_bad, bad_tensors = _oracle(freezeframe.load(recorded))
    params = summary["params"]
    assert [p["present_from_stage"] for p in params if p["name"].startswith("adapter.")] == [1, 1]
    checked = 0
    for i, p in enumerate(params):
        for e in p["stages"]:
            want = medians.get((e["stage"], i))
            assert e["update_ratio_median"] == want, (p["name"], e["stage"])
            checked += want is not None
    assert checked >= 12

    from freezeframe.analyse.aggregate import tensor_aggregates
    from freezeframe.analyse.tables import StageLookup, step_view

    stored = freezeframe.load(recorded)._stored
    view = step_view(stored)
    n = len(summary["params"]) + len(summary["buffers"])
    agg = tensor_aggregates(stored, StageLookup(view.step, view.stage), [s["index"] for s in summary["stages"]], n)
    got = {divmod(k, n): v for k, v in agg.last_drift.items()}
    assert got == last and len(last) >= 12

    assert first_bad is not None and first_bad[0] == 9
    names = [p["name"] for p in params] + [b["name"] for b in summary["buffers"]]
    [f] = [f for f in summary["findings"] if f["code"] == "nonfinite"]
    assert f"at step {first_bad[0]} in {names[first_bad[1]]} " in f["message"]
    assert f["stage"] == first_bad[2] == 2
    assert f["params"] == sorted(names[t] for t in bad_tensors)


def test_the_summary_does_not_load_the_tensors_table(recorded):
    run = freezeframe.load(recorded)
    summary = run.summary()
    assert run._stored._tensors is None and run._stored.tensors_checked
    assert run.fully_read() and run.unreadable == [] and run._stored._tensors is None
    assert summary["run"]["steps"] == 12 and run.tensors().num_rows > 0  # still there when asked


def _damage_data(f):
    """Garbage over the middle of one column's data pages: the footer still reads."""
    col = pq.ParquetFile(f).metadata.row_group(0).column(3)  # update_norm
    start, size = col.data_page_offset, col.total_compressed_size
    raw = bytearray(f.read_bytes())
    raw[start + 2:start + size - 2] = bytes([0xA5]) * (size - 4)
    f.write_bytes(bytes(raw))


def _comparable(summary):
    return {k: summary[k] for k in ("stages", "params", "modules", "buffers", "layers", "findings")}


@pytest.mark.parametrize("damage", ["data", "truncated"])
def test_a_damaged_tensors_chunk_is_left_out_and_named(recorded, tmp_path, damage):
    d, without = tmp_path / "damaged", tmp_path / "without"
    shutil.copytree(recorded, d)
    shutil.copytree(recorded, without)
    chunk = sorted((d / "tensors").glob("*.parquet"))[-1]
    (without / "tensors" / chunk.name).unlink()
    if damage == "data":
        _damage_data(chunk)
        assert pq.ParquetFile(chunk).metadata.num_rows > 0   # the footer reads
    else:
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    with pytest.raises(Exception) as e:                       # the damage is real
        pq.read_table(chunk)
    line = f"skipped damaged chunk {chunk} ({type(e.value).__name__}: {e.value})"

    run = freezeframe.load(d)
    assert run.unreadable == [line] and line in run.warnings and not run.fully_read()
    summary = run.summary()
    assert summary["run"]["unreadable"] == [line] and summary["run"]["complete"] is False
    oracle = freezeframe.load(without).summary()
    assert _comparable(summary) == _comparable(oracle)
    assert not any(f["code"] == "nonfinite" for f in summary["findings"])  # its rows were in that chunk
    assert run.tensors().num_rows == freezeframe.load(without).tensors().num_rows


def test_a_chunk_found_damaged_while_streaming_gives_nothing(recorded, tmp_path):
    """Damage past the first row group: the rows it gave before the damage are dropped too."""
    d = tmp_path / "run"
    shutil.copytree(recorded, d)
    chunk = sorted((d / "tensors").glob("*.parquet"))[-1]
    table = pq.read_table(chunk)
    pq.write_table(table, chunk, row_group_size=max(1, table.num_rows // 3))  # several row groups
    meta = pq.ParquetFile(chunk).metadata
    assert meta.num_row_groups >= 3
    col = meta.row_group(meta.num_row_groups - 1).column(3)
    raw = bytearray(chunk.read_bytes())
    raw[col.data_page_offset + 2:col.data_page_offset + col.total_compressed_size - 2] = \
        bytes([0x5A]) * (col.total_compressed_size - 4)
    chunk.write_bytes(bytes(raw))
    with pytest.raises(Exception):
        pq.read_table(chunk)

    run = freezeframe.load(d)
    lazy = run._stored
    from freezeframe.analyse.summary import build_summary

    summary = build_summary(lazy)   # the store found it while streaming, not on load
    assert len(summary["run"]["unreadable"]) == 1 and str(chunk) in summary["run"]["unreadable"][0]
    without = tmp_path / "without"
    shutil.copytree(recorded, without)
    (without / "tensors" / chunk.name).unlink()
    assert _comparable(summary) == _comparable(freezeframe.load(without).summary())
