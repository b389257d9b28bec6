"""The update sizes behind the report's update heatmap and the step scrubber, in one pass over the
tensors table (docs/report.md, "How figures are downsampled").

The table of a long run holds tens of millions of rows; it is read in blocks of rows (a stored
run's `tensor_batches`, or slices of a table already in memory) and every block is summed into
small dense arrays with bincount: per (heatmap row, step) and per (layer, frame) cell, the sums
of ||ΔW||² and ||W||² over the cell's tensors. Memory is bounded by one block and those arrays,
never by the rows; no Python loop over rows, steps or tensors."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

BLOCK_ROWS = 1 << 20      # tensor rows per block (bounds the temporaries: ~150 bytes a row)
COLUMNS = ["step", "tensor", "update_norm", "param_norm"]
MAX_POINTS = 2000         # an lr or loss line draws at most this many points (then each bin's lowest and highest)


def tensor_blocks(tensors, columns: list[str] = COLUMNS, rows: int | None = None) -> Iterator[pa.Table]:
    """The tensors table in stored row order, `rows` rows at a time: `tensors` is a pa.Table or
    a stored run (anything with `tensor_batches`, which reads its files block by block).
    `rows`: BLOCK_ROWS unless given."""
    rows = BLOCK_ROWS if rows is None else rows
    if isinstance(tensors, pa.Table):
        table = tensors.select(columns)
        for a in range(0, table.num_rows, rows):
            yield table.slice(a, rows)
        return
    yield from tensors.tensor_batches(columns=columns, rows=rows)


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    """A column in its stored type: nulls as NaN (floats) or -1 (ints)."""
    arr = table.column(name)
    if pa.types.is_integer(arr.type) and arr.null_count:
        arr = arr.fill_null(-1)
    return arr.to_numpy(zero_copy_only=False)


def _valid(table: pa.Table, name: str) -> np.ndarray | None:
    col = table.column(name)
    return col.is_valid().to_numpy(zero_copy_only=False) if col.null_count else None


class StepIndex:
    """Step number -> its position among the step table's distinct steps, sorted (-1: the step has
    no step row), and the stage of each position (of its first row, as stored; -1: null)."""

    def __init__(self, steps: pa.Table):
        step = steps.column("step").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        stage = steps.column("stage").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        order = np.argsort(step, kind="stable")
        first = np.r_[True, step[order][1:] != step[order][:-1]] if len(order) else np.zeros(0, bool)
        self.order = order[first]                          # step-table row of each position
        self.steps = step[self.order]
        self.stage = stage[self.order]
        self.lo = int(self.steps[0]) if len(self.steps) else 0
        span = int(self.steps[-1]) - self.lo + 1 if len(self.steps) else 0
        self.table = None
        if len(self.steps) and span <= 4 * len(self.steps) + (1 << 20):
            self.table = np.full(span + 2, -1, dtype=np.int32)   # a -1 slot at each end
            self.table[self.steps - self.lo + 1] = np.arange(len(self.steps), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.steps)

    def __call__(self, at: np.ndarray) -> np.ndarray:
        if not len(self.steps):
            return np.full(len(at), -1, dtype=np.int32)
        if self.table is not None:
            idx = at - (self.lo - 1)
            np.clip(idx, 0, len(self.table) - 1, out=idx)
            return self.table[idx]
        pos = np.clip(np.searchsorted(self.steps, at), 0, len(self.steps) - 1)
        return np.where(self.steps[pos] == at, pos, -1).astype(np.int32)


def _row_at(summary: dict, rows: list[dict], aliases: bool) -> np.ndarray:
    """Tensor index + 1 -> the row showing it (-1: none), with a -1 slot either side for the
    indices outside 0..P-1 (null tensors, or a tensor not in the summary)."""
    P = len(summary["params"])
    index = {}
    for i, p in enumerate(summary["params"]):
        for n in [p["name"], *(p.get("aliases") or [])] if aliases else [p["name"]]:
            index[n] = i
    out = np.full(P + 2, -1, dtype=np.int64)
    for r, row in enumerate(rows):
        out[[index[n] + 1 for n in row["params"] if n in index]] = r
    return out


def _window_sums(key_row: np.ndarray, pos: np.ndarray, weights: list[np.ndarray | None], R: int,
                 into: list[np.ndarray]) -> None:
    """Add bincounts of (row, pos) cells into the R x S arrays `into`, over the window of
    positions this block spans (a block of consecutive steps touches few columns)."""
    if not len(pos):
        return
    lo, hi = int(pos.min()), int(pos.max()) + 1
    W = hi - lo
    key = key_row * W + (pos - lo)
    for w, acc in zip(weights, into):
        acc[:, lo:hi] += np.bincount(key, w, minlength=R * W).reshape(R, W)


def aggregate(summary: dict, steps: pa.Table, tensors, *, heat_rows: list[dict] | None = None,
              layer_rows: list[dict] | None = None, frame_of_pos: np.ndarray | None = None,
              F: int = 0) -> dict:
    """One pass over the tensors table for both figures.

    heatmap (when `heat_rows`): per row and step of the step table (positions of StepIndex), the
    sums of update² and param² over the row's finite measurements, the count of measured
    non-finite values, and which steps have any measured row (a row whose update and param norm
    are not null, finite or not): the cells of the update heatmap (docs/report.md).
    timeline (when `layer_rows` and `frame_of_pos`, F frames): per layer and frame, the sums of
    update² and param² of the finite measurements (aliases name a layer's tensors too)."""
    index = StepIndex(steps)
    S = len(index)
    out: dict = {"index": index}
    heat = heat_rows is not None
    tl = layer_rows is not None and frame_of_pos is not None and F > 0 and len(layer_rows) > 0
    if heat:
        R = len(heat_rows)
        h_row = _row_at(summary, heat_rows, aliases=False)
        h_upd, h_par = np.zeros((R, S)), np.zeros((R, S))
        h_bad = np.zeros((R, S), dtype=np.int64)
        seen = np.zeros(S, dtype=bool)
    if tl:
        L = len(layer_rows)
        t_row = _row_at(summary, layer_rows, aliases=True)
        f_at = np.r_[-1, frame_of_pos.astype(np.int64)]              # position + 1 -> frame
        t_upd, t_par = np.zeros(L * F), np.zeros(L * F)
    P = len(summary["params"])
    if (heat and S and len(heat_rows)) or tl:
        for t in tensor_blocks(tensors):
            at = np.clip(_numpy(t, "tensor"), -1, P).astype(np.int64) + 1
            pos = index(_numpy(t, "step").astype(np.int64, copy=False)).astype(np.int64)
            un, pn = _numpy(t, "update_norm"), _numpy(t, "param_norm")
            finite = np.isfinite(un) & np.isfinite(pn)
            u2 = np.square(un, dtype=np.float64)
            p2 = np.square(pn, dtype=np.float64)
            if heat and S:
                row = h_row[at]
                measured = (row >= 0) & (pos >= 0)
                for name in ("update_norm", "param_norm"):
                    v = _valid(t, name)
                    if v is not None:
                        measured &= v
                seen[pos[measured]] = True
                good = measured & finite
                if good.all():              # the common block: every row measured and finite
                    _window_sums(row, pos, [u2, p2], R, [h_upd, h_par])
                else:
                    _window_sums(row[good], pos[good], [u2[good], p2[good]], R, [h_upd, h_par])
                    bad = measured & ~finite
                    if bad.any():
                        _window_sums(row[bad], pos[bad], [None], R, [h_bad])
            if tl:
                layer = t_row[at]
                frame = f_at[pos + 1]
                ok = (layer >= 0) & (frame >= 0) & finite
                key = layer * F + frame
                if ok.all():
                    t_upd += np.bincount(key, u2, minlength=L * F)
                    t_par += np.bincount(key, p2, minlength=L * F)
                else:
                    key = key[ok]
                    t_upd += np.bincount(key, u2[ok], minlength=L * F)
                    t_par += np.bincount(key, p2[ok], minlength=L * F)
    if heat:
        out["heatmap"] = _heat_cells(index, seen if S else np.zeros(0, bool), h_upd, h_par, h_bad)
    if tl:
        out["timeline"] = _ratio(t_upd, t_par).reshape(L, F).astype(np.float32)
    return out


def _ratio(upd: np.ndarray, par: np.ndarray) -> np.ndarray:
    """log10(sqrt(upd) / sqrt(par)); NaN where nothing finite was measured, -inf for a 0 update."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(par > 0, 0.5 * (np.log10(upd) - np.log10(par)), np.nan)


def _heat_cells(index: StepIndex, seen: np.ndarray, upd: np.ndarray, par: np.ndarray, bad: np.ndarray) -> dict:
    """Rows x recorded steps (the steps with a measured row and a step row, sorted): the update
    ratio of each cell and its count of non-finite measurements."""
    cols = np.flatnonzero(seen & (index.stage >= 0))
    return {"steps": index.steps[cols], "stage": index.stage[cols],
            "values": _ratio(upd[:, cols], par[:, cols]), "nonfinite": bad[:, cols]}


# ----------------------------------------------------------------------------- binning steps
def _bins(n: int, k: int) -> np.ndarray:
    """Edges splitting n consecutive columns into k nearly equal bins."""
    return np.linspace(0, n, k + 1).round().astype(np.int64)


def binned_median(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Median over the columns lo[j]:hi[j] of each row, ignoring NaN (all NaN: NaN); -inf counts
    as a value. Vectorised: the bins are gathered into one padded array and sorted once."""
    width = int((hi - lo).max()) if len(lo) else 0
    idx = lo[:, None] + np.arange(width)[None, :]
    pad = idx >= hi[:, None]
    block = values[:, np.minimum(idx, values.shape[1] - 1)]      # rows × bins × width
    block[:, pad] = np.nan
    block.sort(axis=2)                                              # NaN sorts last
    n = (~np.isnan(block)).sum(axis=2)
    below = np.take_along_axis(block, np.maximum(n - 1, 0)[..., None] // 2, axis=2)[..., 0]
    above = np.take_along_axis(block, (n // 2)[..., None], axis=2)[..., 0] if width else below
    with np.errstate(invalid="ignore"):
        mid = np.where(below == above, below, (below + above) / 2)  # -inf twice stays -inf
    return np.where(n > 0, mid, np.nan)


def envelope(values: np.ndarray, cap: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions of the points a line of `values` draws: all of them up to `cap`; beyond it the
    values are split into nearly equal bins of consecutive points and each bin keeps the point of
    its lowest and of its highest value (and its first NaN, if it has one), plus the first and last
    point of all, in order: every drawn point is a real one and no spike is lost. Also the bins'
    edges ((k + 1) positions), None when nothing was dropped."""
    n = len(values)
    if n <= cap:
        return np.arange(n, dtype=np.int64), None
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    k = (cap - 2) // (3 if nan.any() else 2)
    edges = _bins(n, k)
    lo, hi = edges[:-1], edges[1:]
    width = int((hi - lo).max())
    idx = np.minimum(lo[:, None] + np.arange(width)[None, :], n - 1)
    pad = lo[:, None] + np.arange(width)[None, :] >= hi[:, None]
    block, gaps = v[idx], nan[idx] & ~pad
    low = np.where(pad | gaps, np.inf, block).argmin(axis=1)
    high = np.where(pad | gaps, -np.inf, block).argmax(axis=1)
    keep = [lo + low, lo + high, [0, n - 1]]
    if gaps.any():
        has = gaps.any(axis=1)
        keep.append((lo + gaps.argmax(axis=1))[has])
    return np.unique(np.concatenate(keep)).astype(np.int64), edges
