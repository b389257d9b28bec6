"""The summary's streamed aggregates and step view on tables built to reach every branch
(docs/summary-format.md): batches that repeat one pattern of tensors (in and out of index order,
cut short at the end), tensors whose rows never count (param_norm 0), tensors with some rows
left out (NaN, Inf, 0, null), drifts with NaN, batches that cross a stage, steps out of order;
and the step table's per-group hyperparameters and gradient masks with nulls, short and long
lists, several chunks and sliced chunks. Each is compared with a plain-Python oracle."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from freezeframe.analyse import aggregate
from freezeframe.analyse.tables import StageLookup, _grad_masks, _per_group, StepView
from freezeframe.store import layout
from oracle import aggregates_oracle

N_TENSORS = 9


class _Source:
    """What tensor_aggregates reads of a stored run: its rows, `rows` at a time."""

    def __init__(self, table: pa.Table, rows: int):
        self.table, self.rows = table, rows
        self.tensor_rows = table.num_rows

    def scan_tensors(self):
        for a in range(0, self.table.num_rows, self.rows):
            yield None, self.table.slice(a, self.rows)


def _table(kind: str, rng: np.random.Generator) -> tuple[pa.Table, dict]:
    """Tensor rows for steps 1..60 (stage 0 for steps ≤ 30, stage 1 after), and the stages."""
    shuffled = kind in ("shuffled", "zero_columns", "nonfinite")
    pattern = [4, 0, 8, 2, 6, 1, 7, 3, 5] if shuffled else list(range(N_TENSORS))
    rows = []
    for step in range(1, 61):
        for t in pattern:
            un, pn = float(rng.uniform(1e-4, 1e-2)), float(rng.uniform(0.5, 2.0))
            rows.append({"step": step, "tensor": t, "grad_norm": float(rng.uniform(0, 1)),
                         "update_norm": un, "param_norm": pn, "drift": float(rng.uniform(0, 1))})
    if kind in ("zero_columns", "mixed", "nonfinite", "unordered"):
        for r in rows:
            if r["tensor"] in (2, 5):
                r["param_norm"] = 0.0                     # never counts (a bias at zero)
    if kind in ("mixed", "nonfinite"):
        for k in rng.choice(len(rows), 40, replace=False):
            rows[k][["param_norm", "update_norm", "drift"][k % 3]] = [0.0, math.nan, None][k % 3]
    if kind == "nonfinite":
        rows[100]["grad_norm"] = math.inf
        rows[400]["update_norm"] = -math.inf
    if kind == "unordered":
        rows[50], rows[300] = rows[300], rows[50]          # steps out of order, pattern broken
    stage_of = {s: 0 if s <= 30 else 1 for s in range(1, 61)}
    table = pa.Table.from_pylist(rows, schema=layout.TENSORS_SCHEMA)
    return table, stage_of


KINDS = ["ordered", "shuffled", "zero_columns", "mixed", "nonfinite", "unordered"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [7 * N_TENSORS, 100, 10_000])   # batches: whole steps, cut mid-step, one
def test_streamed_aggregates_equal_the_plain_oracle(kind, rows):
    table, stage_of = _table(kind, np.random.default_rng(KINDS.index(kind)))
    steps = np.array(sorted(stage_of), dtype=np.int64)
    lookup = StageLookup(steps, np.array([stage_of[s] for s in steps], dtype=np.int64))
    got = aggregate.tensor_aggregates(_Source(table, rows), lookup, [0, 1], N_TENSORS)
    medians, last, first_bad, bad_tensors = aggregates_oracle(stage_of, table.to_pylist())
    assert {divmod(k, N_TENSORS): v for k, v in got.update_ratio_median.items()} == medians
    assert {divmod(k, N_TENSORS): v for k, v in got.last_drift.items()} == last
    if kind in ("zero_columns", "mixed", "nonfinite", "unordered"):
        assert not any(t in (2, 5) for _, t in medians)   # the branch that leaves whole tensors out ran
    assert len(medians) >= 14 and got.rows == table.num_rows
    if first_bad is None:
        assert got.nonfinite is None
    else:
        assert (got.nonfinite.step, got.nonfinite.tensor, got.nonfinite.stage) == first_bad
        assert got.nonfinite.tensors == bad_tensors


def test_medians_taken_on_two_threads_equal_those_taken_on_one(monkeypatch):
    table, stage_of = _table("mixed", np.random.default_rng(7))
    steps = np.array(sorted(stage_of), dtype=np.int64)
    lookup = StageLookup(steps, np.array([stage_of[s] for s in steps], dtype=np.int64))
    one = aggregate.tensor_aggregates(_Source(table, 100), lookup, [0, 1], N_TENSORS).update_ratio_median
    monkeypatch.setattr(aggregate, "_THREADED_MEDIANS", 1)
    two = aggregate.tensor_aggregates(_Source(table, 100), lookup, [0, 1], N_TENSORS).update_ratio_median
    assert two == one and len(one) >= 14


def _lists(values: list) -> pa.ChunkedArray:
    typ = pa.list_(pa.float64())
    whole = pa.array(values, type=typ)
    return pa.chunked_array([whole.slice(0, 2), whole.slice(2, 3), whole.slice(5)], type=typ)  # sliced chunks


def test_per_group_values_equal_reading_each_list():
    values = [[0.1, 0.2], None, [0.3], [None, 0.5, 0.6], [], [float("nan"), 0.7], [0.8, 0.9, 1.0, 1.1]]
    got = _per_group(_lists(values))
    assert got.shape == (len(values), 4)
    for i, v in enumerate(values):
        for g in range(4):
            want = v[g] if v is not None and g < len(v) and v[g] is not None else math.nan
            assert (math.isnan(want) and math.isnan(got[i, g])) or got[i, g] == want, (i, g)


def test_gradient_counts_equal_counting_each_mask():
    P = 13
    nbytes = (P + 7) // 8
    rng = np.random.default_rng(3)
    masks = [bytes(rng.integers(0, 256, nbytes, dtype=np.uint8)) for _ in range(9)]
    masks[2], masks[4], masks[7] = None, masks[4][:1], masks[7] + b"\xff"   # null, short (an older P), long
    whole = pa.array(masks, type=pa.binary())
    column = pa.chunked_array([whole.slice(0, 4), whole.slice(4, 5)])
    full = pa.chunked_array([pa.array([m for m in masks if m is not None and len(m) == nbytes], type=pa.binary())])
    for col in (column, full):
        listed = col.to_pylist()
        view = StepView(step=np.arange(len(listed)), stage=np.zeros(len(listed)), optimizer=np.zeros(len(listed)),
                        lr=np.zeros((len(listed), 0)), momentum=np.zeros((len(listed), 0)),
                        weight_decay=np.zeros((len(listed), 0)), grads=_grad_masks(col, nbytes), P=P)
        rows = np.array([r for r in (0, 1, 2, 4, 5, 7, 8) if r < len(listed)])
        want = [0] * P
        for r in rows.tolist():
            m = (listed[r] or b"").ljust(nbytes, b"\0")[:nbytes]
            for i in range(P):
                want[i] += (m[i // 8] >> (7 - i % 8)) & 1
        assert view.grad_steps(rows).tolist() == want and sum(want) > 0
