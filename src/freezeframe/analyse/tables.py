"""Vectorised aggregates of the stored step tables (numpy; no per-row Python).

The tensor table of a long run holds tens of millions of rows, so everything here is linear in the
rows and keeps the stored widths: float32 measurements stay float32 (a computation that needs
float64 converts only the slice it works on) and integer columns keep their stored width. Rows are
grouped by (stage, tensor) keys, which take few distinct values, through dense codes and numpy's
radix sort of 16-bit keys instead of a comparison sort of 64-bit keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..store.reader import StoredRun

_CHUNK = 1 << 23  # rows per block of the stage lookup (bounds its temporaries)


def _col(table: pa.Table, name: str, dtype=np.float64) -> np.ndarray:
    """A column as numpy with nulls as NaN (floats) or -1 (ints)."""
    arr = table.column(name)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return arr.to_numpy(zero_copy_only=False).astype(dtype)  # nulls come out as NaN
    return arr.fill_null(-1).to_numpy(zero_copy_only=False).astype(dtype)


def stored_column(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy in its stored type (float32 stays float32): nulls as NaN (floats) or -1
    (ints), copied only where Arrow's layout requires it."""
    arr = table.column(name)
    if pa.types.is_integer(arr.type) and arr.null_count:
        arr = arr.fill_null(-1)
    return arr.to_numpy(zero_copy_only=False)


def _codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, key_of_code): each key as a small non-negative int code, and the key each code
    stands for (ascending). Keys spanning a range not much wider than their count are coded by
    their offset from the smallest (O(n), no sort; a code may then stand for no row); others go
    through np.unique."""
    lo, hi = int(keys.min()), int(keys.max())
    span = hi - lo + 1
    if span > len(keys) + (1 << 16):
        uniq, inv = np.unique(keys, return_inverse=True)
        return inv.reshape(-1), uniq
    dtype = np.uint16 if span <= 1 << 16 else np.uint32 if span <= 1 << 32 else np.int64
    return (keys - keys.dtype.type(lo)).astype(dtype), np.arange(lo, hi + 1, dtype=np.int64)


def stable_order(codes: np.ndarray) -> np.ndarray:
    """What np.argsort(codes, kind="stable") returns, for non-negative integer codes, in linear
    time below 2**32: numpy radix-sorts 16-bit keys, and two stable passes (the low 16 bits, then
    the high 16 bits) order by the whole code."""
    top = int(codes.max()) if len(codes) else 0
    if top < 1 << 16:
        return np.argsort(codes.astype(np.uint16, copy=False), kind="stable")
    if top < 1 << 32:
        order = np.argsort((codes & 0xFFFF).astype(np.uint16), kind="stable")
        return order[np.argsort((codes[order] >> 16).astype(np.uint16), kind="stable")]
    return np.argsort(codes, kind="stable")


def grouped_median(keys: np.ndarray, values: np.ndarray, divisor: np.ndarray | None = None) -> dict[int, float]:
    """Exact median (np.median, in float64) of `values` per integer key; with `divisor`, of
    `values / divisor` computed in float64 one group at a time (never for all rows at once).

    Each group's values reach np.median in their original row order (a stable sort by key), so
    the result is the one np.median gives on the rows of that key, ties and even counts included."""
    if len(keys) == 0:
        return {}
    codes, key_of = _codes(keys)
    order = stable_order(codes)
    counts = np.bincount(codes, minlength=len(key_of))
    present = np.flatnonzero(counts)
    ends = np.cumsum(counts)[present]
    starts = ends - counts[present]
    v = values[order]
    d = divisor[order] if divisor is not None else None
    del order
    out = {}
    for c, s, e in zip(present.tolist(), starts.tolist(), ends.tolist()):
        seg = v[s:e].astype(np.float64)
        if d is not None:
            seg /= d[s:e].astype(np.float64)
        out[int(key_of[c])] = float(np.median(seg))
    return out


def last_per_key(keys: np.ndarray, steps: np.ndarray, values: np.ndarray) -> dict[int, float]:
    """The value at the largest step of each key (of the last such row when a key has several
    rows at that step)."""
    if len(keys) == 0:
        return {}
    codes, key_of = _codes(keys)
    none = np.iinfo(np.int64).min
    best = np.full(len(key_of), none, dtype=np.int64)
    np.maximum.at(best, codes, steps)
    present = best != none
    np.maximum(best, -1, out=best)            # a step of -1 (null) counts; none below it does
    rows = np.flatnonzero(steps == best[codes])
    out = np.full(len(key_of), np.nan)
    out[codes[rows]] = values[rows]
    return dict(zip(key_of[present].tolist(), out[present].tolist()))


@dataclass
class StepView:
    """The stored rows in numpy form, with each tensor row's stage. Tensor-row columns keep their
    stored types: step int64, tensor and stage int32 (-1: null, or a step with no step row), the
    measurements float32 with NaN for null."""

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


def _measured_nonfinite(table: pa.Table, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Rows where a measured (non-null) value is NaN or Inf; `columns` holds the float columns
    with nulls as NaN."""
    bad = np.zeros(table.num_rows, dtype=bool)
    for name, values in columns.items():
        col = table.column(name)
        nonfinite = ~np.isfinite(values)
        if col.null_count:
            nonfinite &= col.is_valid().to_numpy(zero_copy_only=False)
        bad |= nonfinite
    return bad


def stage_of_rows(step: np.ndarray, stage: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The stage (int32) of each step in `at`, -1 where no step row has that step. Of equal steps,
    the first in np.argsort(step) order counts (the row a left searchsorted finds). A dense table
    over the step range when it is compact, a binary search otherwise."""
    out = np.full(len(at), -1, dtype=np.int32)
    if not len(step):
        return out
    order = np.argsort(step)
    s_sorted, st_sorted = step[order], stage[order].astype(np.int32)
    lo, hi = int(s_sorted[0]), int(s_sorted[-1])
    span = hi - lo + 1
    if span > 4 * len(step) + (1 << 20):
        for a in range(0, len(at), _CHUNK):
            part = at[a:a + _CHUNK]
            pos = np.clip(np.searchsorted(s_sorted, part), 0, len(s_sorted) - 1)
            out[a:a + _CHUNK] = np.where(s_sorted[pos] == part, st_sorted[pos], -1)
        return out
    first = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
    table = np.full(span + 2, -1, dtype=np.int32)       # one sentinel slot at each end
    table[s_sorted[first] - lo + 1] = st_sorted[first]
    for a in range(0, len(at), _CHUNK):
        idx = at[a:a + _CHUNK] - (lo - 1)
        np.clip(idx, 0, span + 1, out=idx)
        out[a:a + _CHUNK] = table[idx]
    return out


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
    t_step = stored_column(t, "step").astype(np.int64, copy=False)
    floats = {name: stored_column(t, name) for name in ("grad_norm", "update_norm", "param_norm", "drift")}
    return StepView(
        step=step, stage=stage, optimizer=_col(steps, "optimizer", np.int64),
        lr=steps.column("lr").to_pylist(), momentum=steps.column("momentum").to_pylist(),
        weight_decay=steps.column("weight_decay").to_pylist(), grads=grads,
        t_step=t_step, t_stage=stage_of_rows(step, stage, t_step),
        t_tensor=stored_column(t, "tensor").astype(np.int32, copy=False),
        **floats, nonfinite=_measured_nonfinite(t, floats),
    )


def _stage_tensor_keys(view: StepView, n_tensors: int) -> np.ndarray:
    """stage * n_tensors + tensor of every tensor row (meaningful where the stage is known), in
    int32 when that cannot overflow."""
    stage, tensor = view.t_stage, view.t_tensor
    if not len(stage):
        return np.zeros(0, dtype=np.int64)
    bound = max(abs(int(stage.min())), abs(int(stage.max()))) * n_tensors + max(abs(int(tensor.min())), abs(int(tensor.max())))
    dtype = np.int32 if bound < 2**31 else np.int64
    key = stage.astype(dtype)
    key *= dtype(n_tensors)
    key += tensor
    return key


def per_stage_tensor(view: StepView, n_tensors: int) -> dict:
    """Per (stage, tensor) key `stage * n_tensors + tensor`: median update ratio (update_norm /
    param_norm in float64), last recorded drift."""
    key = _stage_tensor_keys(view, n_tensors)
    staged = view.t_stage >= 0
    un, pn = view.update_norm, view.param_norm
    ok = staged & np.isfinite(un) & np.isfinite(pn) & (pn > 0)
    ratio = grouped_median(key[ok], un[ok], pn[ok])
    del ok
    has = staged & ~np.isnan(view.drift)
    last_drift = last_per_key(key[has], view.t_step[has], view.drift[has])
    return {"update_ratio_median": ratio, "last_drift": last_drift}


# ----------------------------------------------------------------------------- update heatmap
def stage_of_steps(steps: pa.Table, at: np.ndarray) -> np.ndarray:
    """The stage of each step in `at` (-1 when the step has no row)."""
    step = steps.column("step").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    stage = steps.column("stage").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if not len(step):
        return np.full(len(at), -1, dtype=np.int64)
    order = np.argsort(step, kind="stable")
    step, stage = step[order], stage[order]
    pos = np.clip(np.searchsorted(step, at), 0, len(step) - 1)
    return np.where(step[pos] == at, stage[pos], -1)


def update_matrix(summary: dict, steps: pa.Table, tensors: pa.Table, rows: list[dict]) -> dict:
    """Per row (a set of parameter tensors) and recorded step: log10(sqrt(sum update²) / sqrt(sum
    param²)) over the row's tensors measured at that step. NaN: nothing measured; -inf: an update of
    exactly 0. `nonfinite` counts measured NaN/Inf values per cell.

    Linear in the tensor rows: the rows measured for a shown tensor are selected once (keeping
    their order and float32 values), then squared in float64 and summed per cell by bincount."""
    P = len(summary["params"])
    index = {p["name"]: i for i, p in enumerate(summary["params"])}
    row_of = np.full(P, -1, dtype=np.int64)
    for r, row in enumerate(rows):
        row_of[[index[n] for n in row["params"]]] = r
    row_at = np.full(P + 2, -1, dtype=np.int32)     # row_of with a -1 slot either side
    row_at[1:-1] = row_of
    at = np.clip(stored_column(tensors, "tensor"), -1, P)
    at += 1
    row = row_at[at]                                  # -1: no parameter, or one no row shows
    del at
    measured = row >= 0
    for name in ("update_norm", "param_norm"):
        if tensors.column(name).null_count:
            measured &= tensors.column(name).is_valid().to_numpy(zero_copy_only=False)
    # only the measured rows from here on, in their stored order
    row = row[measured].astype(np.int64)
    t_step = stored_column(tensors, "step")[measured]
    un = stored_column(tensors, "update_norm")[measured]
    pn = stored_column(tensors, "param_norm")[measured]
    del measured
    first = int(t_step.min()) if len(t_step) else 0
    seen = np.bincount(t_step - first) > 0 if len(t_step) else np.zeros(0, dtype=bool)
    columns = np.flatnonzero(seen) + first   # the recorded steps, sorted (O(n), no sort of the rows)
    col_stage = stage_of_steps(steps, columns)
    ok = col_stage >= 0
    columns, col_stage = columns[ok], col_stage[ok]
    R, C = len(rows), len(columns)
    col_of_step = np.full(len(seen), -1, dtype=np.int64)
    col_of_step[columns - first] = np.arange(C)
    col = col_of_step[t_step - first]   # -1: a step with no step row, not shown
    del t_step
    col_ok = col >= 0
    key = row * C + col
    del row, col
    finite = np.isfinite(un) & np.isfinite(pn)
    good = finite & col_ok
    bad = col_ok & ~finite
    del finite, col_ok
    size = R * C
    nonfinite = np.bincount(key[bad], minlength=size).reshape(R, C)
    key = key[good]
    cnt = np.bincount(key, minlength=size).reshape(R, C)
    upd = np.bincount(key, np.square(un[good], dtype=np.float64), minlength=size).reshape(R, C)
    par = np.bincount(key, np.square(pn[good], dtype=np.float64), minlength=size).reshape(R, C)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where((cnt > 0) & (par > 0), 0.5 * (np.log10(upd) - np.log10(par)), np.nan)
    return {"steps": columns, "stage": col_stage, "values": values, "nonfinite": nonfinite}


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
