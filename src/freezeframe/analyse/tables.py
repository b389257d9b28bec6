"""Vectorised aggregates of the stored step tables (numpy; no per-row Python)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..store.reader import StoredRun


def _col(table: pa.Table, name: str, dtype=np.float64) -> np.ndarray:
    """A column as numpy with nulls as NaN (floats) or -1 (ints)."""
    arr = table.column(name)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return arr.to_numpy(zero_copy_only=False).astype(dtype)  # nulls come out as NaN
    return arr.fill_null(-1).to_numpy(zero_copy_only=False).astype(dtype)


def grouped_median(keys: np.ndarray, values: np.ndarray) -> dict[int, float]:
    """Exact median of `values` per integer key (one stable sort of the keys, then a linear-time
    selection per group)."""
    if len(keys) == 0:
        return {}
    order = np.argsort(keys, kind="stable")
    k, v = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    ends = np.r_[starts[1:], len(k)]
    return {int(k[s]): float(np.median(v[s:e])) for s, e in zip(starts, ends)}


def last_per_key(keys: np.ndarray, steps: np.ndarray, values: np.ndarray) -> dict[int, float]:
    """The value at the largest step of each key."""
    if len(keys) == 0:
        return {}
    uniq, inv = np.unique(keys, return_inverse=True)
    best = np.full(len(uniq), -1, dtype=np.int64)
    np.maximum.at(best, inv, steps)
    rows = np.flatnonzero(steps == best[inv])
    out = np.empty(len(uniq), dtype=np.float64)
    out[inv[rows]] = values[rows]
    return dict(zip(uniq.tolist(), out.tolist()))


@dataclass
class StepView:
    """The stored rows in numpy form, with each tensor row's stage."""

    step: np.ndarray          # per step row
    stage: np.ndarray
    optimizer: np.ndarray     # per step row: which watched optimizer stepped
    lr: list                  # per step row: list of per-group values
    momentum: list
    weight_decay: list
    grads: np.ndarray         # (steps, P) bool
    t_step: np.ndarray        # per tensor row
    t_stage: np.ndarray
    t_tensor: np.ndarray
    grad_norm: np.ndarray
    update_norm: np.ndarray
    param_norm: np.ndarray
    drift: np.ndarray
    nonfinite: np.ndarray     # per tensor row: a measured value is NaN or Inf


def _measured_nonfinite(table: pa.Table) -> np.ndarray:
    bad = np.zeros(table.num_rows, dtype=bool)
    for name in ("grad_norm", "update_norm", "param_norm", "drift"):
        col = table.column(name)
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        values = col.to_numpy(zero_copy_only=False)
        bad |= valid & ~np.isfinite(values)
    return bad


def step_view(run: StoredRun) -> StepView:
    P = len(run.manifest["model"]["params"])
    steps = run.steps
    step = _col(steps, "step", np.int64)
    stage = _col(steps, "stage", np.int64)
    raw = steps.column("grads").to_pylist()
    nbytes = (P + 7) // 8
    buf = np.frombuffer(b"".join((g or b"\0" * nbytes).ljust(nbytes, b"\0")[:nbytes] for g in raw), dtype=np.uint8)
    grads = np.unpackbits(buf.reshape(len(raw), nbytes), axis=1)[:, :P].astype(bool) if raw else np.zeros((0, P), bool)
    t = run.tensors
    t_step = _col(t, "step", np.int64)
    # the stage of each tensor row, through its step
    if len(step):
        order = np.argsort(step)
        pos = np.clip(np.searchsorted(step[order], t_step), 0, len(step) - 1)
        t_stage = np.where(step[order][pos] == t_step, stage[order][pos], -1)
    else:
        t_stage = np.full(len(t_step), -1, dtype=np.int64)
    return StepView(
        step=step, stage=stage, optimizer=_col(steps, "optimizer", np.int64),
        lr=steps.column("lr").to_pylist(), momentum=steps.column("momentum").to_pylist(),
        weight_decay=steps.column("weight_decay").to_pylist(), grads=grads,
        t_step=t_step, t_stage=t_stage, t_tensor=_col(t, "tensor", np.int64),
        grad_norm=_col(t, "grad_norm"), update_norm=_col(t, "update_norm"),
        param_norm=_col(t, "param_norm"), drift=_col(t, "drift"), nonfinite=_measured_nonfinite(t),
    )


def per_stage_tensor(view: StepView, n_tensors: int) -> dict:
    """Per (stage, tensor): median update ratio, last recorded drift, recorded-step count."""
    key = view.t_stage * n_tensors + view.t_tensor
    ok = (view.t_stage >= 0) & np.isfinite(view.update_norm) & np.isfinite(view.param_norm) & (view.param_norm > 0)
    ratio = grouped_median(key[ok], view.update_norm[ok] / view.param_norm[ok])
    has = (view.t_stage >= 0) & ~np.isnan(view.drift)
    last_drift = last_per_key(key[has], view.t_step[has], view.drift[has])
    return {"update_ratio_median": ratio, "last_drift": last_drift}
