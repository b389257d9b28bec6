"""Vectorised views of the stored step tables (numpy; no per-row Python).

The steps table (one row per applied step) is read into numpy here; the tensors table of a long
run holds tens of millions of rows and is never held whole for the summary: its aggregates are
computed in one streaming pass (`aggregate.py`), with each row's stage from `StageLookup`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..store.reader import StoredRun


def _col(table: pa.Table, name: str, dtype=np.float64) -> np.ndarray:
    """A column as numpy with nulls as NaN (floats) or -1 (ints)."""
    arr = table.column(name)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return arr.to_numpy(zero_copy_only=False).astype(dtype)  # nulls come out as NaN
    return arr.fill_null(-1).to_numpy(zero_copy_only=False).astype(dtype)


class StageLookup:
    """The stage (int32) of a step, -1 where no step row has that step. Of equal steps, the first
    in np.argsort(step) order counts (the row a left searchsorted finds). Built once per run: a
    dense table over the step range when it is compact, a binary search otherwise. `gather` looks
    up any per-slot table derived from `stage_table()` (e.g. a code per stage)."""

    def __init__(self, step: np.ndarray, stage: np.ndarray):
        self.empty = not len(step)
        self.dense = False
        if self.empty:
            return
        order = np.argsort(step)
        s_sorted, st_sorted = step[order], stage[order].astype(np.int32)
        self.lo, hi = int(s_sorted[0]), int(s_sorted[-1])
        self.span = hi - self.lo + 1
        self.dense = self.span <= 4 * len(step) + (1 << 20)
        if self.dense:
            first = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
            self.table = np.full(self.span + 2, -1, dtype=np.int32)       # one sentinel slot at each end
            self.table[s_sorted[first] - self.lo + 1] = st_sorted[first]
        else:
            self.s_sorted, self.table = s_sorted, st_sorted

    def stage_table(self) -> np.ndarray:
        return np.zeros(0, dtype=np.int32) if self.empty else self.table

    def gather(self, values: np.ndarray, at: np.ndarray) -> np.ndarray:
        if self.empty:
            return np.full(len(at), -1, dtype=values.dtype)
        if self.dense:
            idx = at - (self.lo - 1)
            np.clip(idx, 0, self.span + 1, out=idx)
            return values[idx]
        pos = np.clip(np.searchsorted(self.s_sorted, at), 0, len(self.s_sorted) - 1)
        return np.where(self.s_sorted[pos] == at, values[pos], -1)

    def of(self, at: np.ndarray) -> np.ndarray:
        return self.gather(self.stage_table(), at)


@dataclass
class StepView:
    """The stored step rows in numpy form; `tensors` the tensors table's aggregates
    (`aggregate.TensorAggregates`) once computed."""

    step: np.ndarray          # per step row
    stage: np.ndarray
    optimizer: np.ndarray     # per step row: which watched optimizer stepped
    lr: np.ndarray            # (steps, groups) float64: per step row its per-group values, NaN where none
    momentum: np.ndarray
    weight_decay: np.ndarray
    grads: np.ndarray         # (steps, ceil(P / 8)) uint8: each row's `grads` mask, packed as stored
    P: int = 0
    tensors: Any = None

    def grad_steps(self, rows: np.ndarray) -> np.ndarray:
        """Per parameter (P, int64): how many of the step rows `rows` accumulated a gradient into
        it, counted bit by bit on the packed masks (numpy.packbits order: bit 7 of byte j is
        parameter 8j)."""
        sel = self.grads[rows]
        counts = np.zeros(sel.shape[1] * 8, dtype=np.int64)
        for b in range(8):
            counts[b::8] = ((sel >> (7 - b)) & 1).sum(axis=0, dtype=np.int64)
        return counts[:self.P]


def step_view(run: StoredRun) -> StepView:
    P = len(run.manifest["model"]["params"])
    steps = run.steps
    step = _col(steps, "step", np.int64)
    stage = _col(steps, "stage", np.int64)
    return StepView(
        step=step, stage=stage, optimizer=_col(steps, "optimizer", np.int64),
        lr=_per_group(steps.column("lr")), momentum=_per_group(steps.column("momentum")),
        weight_decay=_per_group(steps.column("weight_decay")),
        grads=_grad_masks(steps.column("grads"), (P + 7) // 8), P=P,
    )


def _per_group(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float64> column as a (rows, longest list) matrix: row i, column g holds list i's
    value g, NaN where the list is null, shorter or holds a null."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.full((len(arr), int(lengths.max()) if len(lengths) else 0), np.nan)
    if out.size:
        values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64, copy=False)  # nulls: NaN
        row = np.repeat(np.arange(len(arr)), lengths)
        starts = np.cumsum(lengths) - lengths
        out[row, np.arange(len(values)) - starts[row]] = values
    return out


def _grad_masks(column: pa.ChunkedArray, nbytes: int) -> np.ndarray:
    """(rows, nbytes) uint8: each row's mask cut or zero-padded to `nbytes` (null: no gradient).
    A chunk whose every mask has exactly `nbytes` bytes is read from its data buffer in one copy."""
    out = np.zeros((len(column), nbytes), dtype=np.uint8)
    at = 0
    for chunk in column.chunks:
        n = len(chunk)
        if n and nbytes:
            _, offsets_buf, data = chunk.buffers()
            wide = pa.types.is_large_binary(chunk.type)
            offsets = np.frombuffer(offsets_buf, dtype=np.int64 if wide else np.int32)[chunk.offset:chunk.offset + n + 1]
            if not chunk.null_count and bool((np.diff(offsets) == nbytes).all()):
                out[at:at + n] = np.frombuffer(data, dtype=np.uint8)[offsets[0]:offsets[-1]].reshape(n, nbytes)
            else:
                for k, g in enumerate(chunk.to_pylist()):
                    if g:
                        out[at + k, :min(len(g), nbytes)] = np.frombuffer(g[:nbytes], dtype=np.uint8)
        at += n
    return out


def adapters_table(summary: dict) -> dict | None:
    """The report's Adapters table for a PEFT run (docs/peft.md), null otherwise: per LoRA-wrapped
    module, its adapter, `delta_rel` at each captured stage end (null where none was captured),
    whether lora_B and lora_A are exactly zero and whether its base tensors are bitwise as watching
    began, at the last stage that recorded it; `dora`: the update is DoRA's low-rank part only."""
    if not summary["run"].get("peft"):
        return None
    stages = [s for s in summary["stages"] if s["kind"] != "trial"]
    modules = list(dict.fromkeys(m for s in stages for m in (s.get("lora") or {})))
    rows = []
    for m in modules:
        entries = [(summary["stages"].index(s), (s.get("lora") or {}).get(m)) for s in stages]
        k, last = next(((k, e) for k, e in reversed(entries) if e), (None, None))
        base = [p for p in summary["params"] if p["name"].startswith(f"{m}.base_layer.")]
        same = [p["stages"][k].get("same_as_start") for p in base] if k is not None else []
        rows.append({"module": m, "adapter": last.get("adapter") if last else None,
                     "delta_rel": [e.get("delta_rel") if e else None for _, e in entries],
                     "b_zero": last.get("b_zero") if last else None,
                     "a_zero": last.get("a_zero") if last else None,
                     "base_unchanged": None if not same or any(x is None for x in same) else all(same)})
    return {"stages": [s["name"] for s in stages], "rows": rows, "dora": bool(summary["run"]["peft"].get("use_dora"))}
