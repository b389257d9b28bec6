"""The summary's aggregates of the tensors table, computed in one streaming pass over its Parquet
chunks (`StoredRun.scan_tensors`), never holding the table: per (stage, tensor) the median update
ratio and the last recorded drift, and the first non-finite measurement (docs/summary-format.md).

The results are those of the same computation over the whole table in memory: per (stage, tensor)
key the update ratios (update_norm / param_norm in float64, rows with both finite and
param_norm > 0) reach np.median in row order; the last drift is the value at the key's largest
step (of the last row there; a null step counts as -1); the first non-finite row is the first row
in stored order at the smallest step among the rows with a measured NaN or Inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..store.reader import StoredRun
from .tables import StageLookup

_MEASURES = ("grad_norm", "update_norm", "param_norm", "drift")
_NONE = np.iinfo(np.int64).min
_THREADED_MEDIANS = 1 << 20   # kept ratios from which the medians are taken on two threads


@dataclass
class NonFinite:
    """The first tensor row with a measured NaN or Inf, and every tensor such a row names."""
    step: int
    tensor: int
    stage: int          # -1: the step has no step row
    tensors: set[int]


@dataclass
class TensorAggregates:
    update_ratio_median: dict[int, float]   # by key stage * n_tensors + tensor
    last_drift: dict[int, float]
    nonfinite: NonFinite | None
    rows: int


def _numpy(table: pa.Table, name: str) -> np.ndarray:
    """A column in its stored type, nulls as NaN (floats) or -1 (ints); no copy when it has no null."""
    col = table.column(name)
    if pa.types.is_integer(col.type) and col.null_count:
        col = col.fill_null(-1)
    if col.num_chunks == 1:
        arr = col.chunk(0)
        return arr.to_numpy(zero_copy_only=not arr.null_count)
    return col.to_numpy()


def _all_finite(v: np.ndarray) -> bool:
    """No NaN or Inf in `v` (two reductions, no temporary): a NaN makes the max NaN."""
    return not len(v) or (bool(np.isfinite(v.max())) and bool(np.isfinite(v.min())))


def stable_key_order(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, kind="stable") for non-negative integer keys. Rows that repeat one
    pattern of distinct keys (the same tensors on every recorded step) are ordered by arithmetic,
    other rows by numpy's radix sort of 16-bit keys."""
    m = len(keys)
    if m > 1:
        again = np.flatnonzero(keys == keys[0])
        p = int(again[1]) if len(again) > 1 else m
        pattern = keys[:p]
        if (p == m or np.array_equal(keys[p:], keys[:m - p])) and len(np.unique(pattern)) == p:
            cols = np.argsort(pattern, kind="stable")
            q = -(-m // p)
            order = (np.arange(q, dtype=np.int64)[None, :] * p + cols[:, None]).reshape(-1)
            return order[order < m] if q * p != m else order
    top = int(keys.max()) if m else 0
    if top < 1 << 16:
        return np.argsort(keys.astype(np.uint16, copy=False), kind="stable")
    if top < 1 << 32:
        order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
        return order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]
    return np.argsort(keys, kind="stable")


@dataclass
class _Part:
    """What one batch of rows contributes, by the (stage, tensor) codes present in it (ascending)."""
    ratios: tuple | None = None     # (ratios grouped by code in row order, codes, counts)
    drift: tuple | None = None      # (codes, largest step with a drift, the drift of its last row)
    bad: tuple | None = None        # (step, tensor) of the first non-finite row
    bad_tensors: set = field(default_factory=set)
    placed: bool = False            # ratios already written into the total's buffer (values: offset)


def _float_pages(n: int) -> np.ndarray:
    """n float64 on anonymous memory of ordinary pages: numpy asks the kernel for huge pages for a
    large array, and faulting in 600 MB of them (zeroing, compacting) took about a second of
    system time on a 2-core machine against about a third of that (docs/benchmarks.md, "Report
    build time and size")."""
    import mmap

    return np.frombuffer(mmap.mmap(-1, 8 * n), dtype=np.float64)


class _Total:
    """The parts of the rows read so far, in row order. The ratios are written, grouped, into one
    buffer sized for every row (pages never written are never resident): the memory a long run
    needs is its kept ratios, not those plus what a fragmented heap keeps of the batches."""

    def __init__(self, size: int, capacity: int):
        self.buffer = _float_pages(max(capacity, 1))
        self.used = 0
        self.ratios: list[tuple] = []   # (offset into buffer, codes, counts)
        self.best = np.full(size, _NONE, dtype=np.int64)
        self.drift = np.full(size, np.nan)
        self.bad: tuple | None = None
        self.bad_tensors: set = set()

    def reserve(self, n: int) -> tuple[int, np.ndarray]:
        """The next `n` slots of the buffer (offset, view), counted as used."""
        if self.used + n > len(self.buffer):        # more rows than the footers said
            grown = _float_pages(2 * (self.used + n))
            grown[:self.used] = self.buffer[:self.used]
            self.buffer = grown
        at = self.used
        self.used += n
        return at, self.buffer[at:at + n]

    def keep(self, part: _Part) -> _Part:
        """The part with its ratios in the buffer (not yet counted: `add` does)."""
        if part.ratios is not None and not part.placed:
            values, codes, counts = part.ratios
            at, view = self.reserve(len(values))
            view[:] = values
            part.ratios, part.placed = (at, codes, counts), True
        return part

    def add(self, part: _Part) -> None:
        if part.ratios is not None:
            self.ratios.append(part.ratios)
        if part.drift is not None:
            codes, best, drift = part.drift
            take = best >= self.best[codes]      # equal: the later row wins
            self.best[codes[take]] = best[take]
            self.drift[codes[take]] = drift[take]
        if part.bad is not None and (self.bad is None or part.bad[0] < self.bad[0]):
            self.bad = part.bad
        self.bad_tensors |= part.bad_tensors


def _groups(keys: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes present ascending, their counts, the position in `order` of each group's last row)."""
    ks = keys[order]
    ends = np.r_[np.flatnonzero(ks[1:] != ks[:-1]), len(ks) - 1]
    return ks[ends], np.diff(np.r_[-1, ends]), ends


class _Codes:
    """Each row's dense (stage, tensor) code: its position among the wanted stages times the
    tensor count plus the tensor, -1 where the row counts for no wanted key (no step row, a
    stage below 0, or a key no wanted stage has)."""

    def __init__(self, lookup: StageLookup, stages: list[int], n: int):
        self.lookup, self.n = lookup, n
        self.stages = np.array(sorted(set(stages)), dtype=np.int64)
        self.size = len(self.stages) * n
        raw = lookup.stage_table()          # stage per step slot
        self.code_table = np.where(raw >= 0, self._code_of_stage(raw.astype(np.int64)), -1).astype(np.int32)

    def _code_of_stage(self, stage: np.ndarray) -> np.ndarray:
        if not len(self.stages):
            return np.full(len(stage), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.stages, stage), 0, len(self.stages) - 1)
        return np.where(self.stages[pos] == stage, pos, -1)

    def of(self, step: np.ndarray, tensor: np.ndarray) -> np.ndarray:
        n = self.n
        if len(tensor) and (int(tensor.min()) < 0 or int(tensor.max()) >= n):
            # a tensor index outside the model map: its key stage * n + tensor is that of
            # (stage + tensor // n, tensor % n)
            raw = self.lookup.of(step).astype(np.int64)
            t = tensor.astype(np.int64)
            code = self._code_of_stage(raw + np.floor_divide(t, n))
            code = np.where((raw >= 0) & (code >= 0), code * n + np.mod(t, n), -1)
            return code
        code = self.lookup.gather(self.code_table, step).astype(np.int64)
        return np.where(code >= 0, code * n + tensor, -1)

    def key(self, code: np.ndarray) -> np.ndarray:
        return self.stages[code // self.n] * self.n + code % self.n


def _batch(table: pa.Table, codes: _Codes, total: _Total) -> list[_Part]:
    step = _numpy(table, "step").astype(np.int64, copy=False)
    tensor = _numpy(table, "tensor")
    vals = {name: _numpy(table, name) for name in _MEASURES}
    finite = {name: _all_finite(v) for name, v in vals.items()}
    bad = _first_nonfinite(table, step, tensor, vals, finite)
    parts = _periodic(step, tensor, vals, codes, total, finite)
    if parts is None:
        parts = [_rows(step, tensor, vals, codes.of(step, tensor))]
    parts[0].bad, parts[0].bad_tensors = bad
    return [total.keep(part) for part in parts]


def _first_nonfinite(table: pa.Table, step: np.ndarray, tensor: np.ndarray, vals: dict, finite: dict) -> tuple:
    """((step, tensor) of the first row with a measured NaN or Inf, or None; the tensors of all such rows)."""
    if all(finite.values()):
        return None, set()
    bad = np.zeros(len(step), dtype=bool)
    for name, v in vals.items():
        nonfinite = ~np.isfinite(v)
        if table.column(name).null_count:
            nonfinite &= table.column(name).is_valid().to_numpy(zero_copy_only=False)
        bad |= nonfinite
    if not bad.any():
        return None, set()
    rows = np.flatnonzero(bad)
    first = rows[int(np.argmin(step[rows]))]
    return (int(step[first]), int(tensor[first])), set(np.unique(tensor[rows]).tolist())


def _periodic(step: np.ndarray, tensor: np.ndarray, vals: dict, codes: _Codes, total: _Total,
              finite: dict) -> list[_Part] | None:
    """The usual batch, without a sort: every row in one stage, the same tensors in the same order
    on every step (one pattern of distinct tensors repeated, the last time cut short), steps in
    order. The parts of the whole repeats and of the cut-short rest; None for any other batch.
    When every ratio counts, the ratios are divided straight into the total's buffer, grouped by
    key. `finite`: per measure, whether the whole batch has no NaN or Inf."""
    m, n = len(step), codes.n
    if m < 2 or codes.lookup.empty or not codes.lookup.dense:
        return None
    lo, hi = int(step.min()), int(step.max())
    slots = codes.code_table[np.clip(np.array([lo, hi]) - (codes.lookup.lo - 1), 0, codes.lookup.span + 1)]
    if slots[0] < 0:
        return None
    a, b = lo - (codes.lookup.lo - 1), hi - (codes.lookup.lo - 1)
    if a < 1 or b > codes.lookup.span or not bool((codes.code_table[a:b + 1] == slots[0]).all()):
        return None                                     # more than one stage, or a step without a row
    if int(tensor.min()) < 0 or int(tensor.max()) >= n or not bool((step[1:] >= step[:-1]).all()):
        return None
    again = tensor[1:] == tensor[0]
    p = int(np.argmax(again)) + 1
    p = p if bool(again[p - 1]) else m
    q = m // p
    pattern = tensor[:p]
    if q < 1 or len(np.unique(pattern)) != p or not np.array_equal(tensor[p:], tensor[:m - p]):
        return None
    base = int(slots[0]) * n
    cols = np.argsort(pattern, kind="stable")
    keys = pattern[cols].astype(np.int64) + base
    un, pn, dr = vals["update_norm"], vals["param_norm"], vals["drift"]
    head = _Part()
    full = q * p
    # the rows as a (q, p) grid, step by pattern position; a key's ratios are its column in row order
    un2, pn2 = un[:full].reshape(q, p), pn[:full].reshape(q, p)
    if finite["update_norm"] and finite["param_norm"] and float(pn.min()) > 0:
        ok = None                                   # every ratio counts
        counts = np.full(p, q, dtype=np.int64)
    else:
        ok = pn2 > 0
        if not (finite["update_norm"] and finite["param_norm"]):
            ok &= np.isfinite(un2) & np.isfinite(pn2)
        counts = ok.sum(axis=0)[cols]
    present = counts > 0
    keep = cols[present]                            # pattern positions of the keys with ratios, by key
    if ok is None or bool((counts[present] == q).all()):
        # whole columns: divided straight into the total's buffer, column by column
        at, view = total.reserve(len(keep) * q)
        if len(keep) < p or not bool((keep == np.arange(p)).all()):
            un2, pn2 = un2[:, keep], pn2[:, keep]
        np.divide(un2.T, pn2.T, out=view.reshape(len(keep), q), dtype=np.float64)
        head.ratios, head.placed = (at, keys[present], counts[present]), True
    else:                                           # a key with some rows left out
        grid = np.divide(un2.T[cols], pn2.T[cols], dtype=np.float64)
        head.ratios = (grid[ok.T[cols]], keys[present], counts[present])
    if finite["drift"] or not bool(np.isnan(dr[:full]).any()):
        last = (q - 1) * p + cols                       # each key's last row: at its largest step
        head.drift = (keys, step[last], dr[last].astype(np.float64))
    else:
        head.drift = _rows(step[:full], tensor[:full], {k: v[:full] for k, v in vals.items()},
                           base + tensor[:full].astype(np.int64), ratios=False).drift
    if full == m:
        return [head]
    rest = slice(full, m)
    tail = _rows(step[rest], tensor[rest], {k: v[rest] for k, v in vals.items()},
                 base + tensor[rest].astype(np.int64))
    return [head, tail]


def _rows(step: np.ndarray, tensor: np.ndarray, vals: dict, code: np.ndarray, ratios: bool = True) -> _Part:
    """Any rows, by a stable sort of their codes (-1: the row counts for no key)."""
    part = _Part()
    un, pn, dr = vals["update_norm"], vals["param_norm"], vals["drift"]
    staged = code >= 0
    order = None
    if ratios:
        ok = staged & np.isfinite(un) & np.isfinite(pn) & (pn > 0)
        every = bool(ok.all())
        k_ok = code if every else code[ok]
        order = stable_key_order(k_ok)
        if len(order):
            r = (un if every else un[ok]).astype(np.float64)[order]
            r /= (pn if every else pn[ok])[order]
            present, counts, _ = _groups(k_ok, order)
            part.ratios = (r, present, counts)
    has = staged & ~np.isnan(dr)
    same = order is not None and every and bool(has.all())
    kh = code if same else code[has]
    if len(kh):
        sh, vh = (step, dr) if same else (step[has], dr[has])
        if len(sh) < 2 or bool((sh[1:] >= sh[:-1]).all()):  # steps in order: a key's last row is at its largest step
            o = order if same else stable_key_order(kh)
            present, _, ends = _groups(kh, o)
            last = o[ends]
        else:
            present, inverse = np.unique(kh, return_inverse=True)
            best = np.full(len(present), _NONE, dtype=np.int64)
            np.maximum.at(best, inverse, sh)
            at_best = np.flatnonzero(sh == best[inverse])
            last = np.full(len(present), -1, dtype=np.int64)
            np.maximum.at(last, inverse[at_best], at_best)
        part.drift = (present, sh[last], vh[last].astype(np.float64))
    return part


def tensor_aggregates(run: StoredRun, lookup: StageLookup, stages: list[int], n_tensors: int) -> TensorAggregates:
    """One pass over the tensors table (a damaged chunk's part is dropped when it is found)."""
    codes = _Codes(lookup, stages, n_tensors)
    total = _Total(codes.size, run.tensor_rows)
    current, chunk, mark, rows = [], object(), 0, 0
    with np.errstate(divide="ignore", invalid="ignore"):   # ratios of rows left out are never used
        for f, table in run.scan_tensors():
            if f is not chunk:
                for part in current:
                    total.add(part)
                current, chunk, mark = [], f, total.used
            if table is None:       # this chunk is damaged: what it gave is not the table's
                current, total.used = [], mark
                continue
            rows += table.num_rows
            current.extend(_batch(table, codes, total))
    for part in current:
        total.add(part)
    return TensorAggregates(update_ratio_median=_medians(total, codes),
                            last_drift=_last_drift(total, codes), nonfinite=_nonfinite(total, lookup), rows=rows)


def _medians(total: _Total, codes: _Codes) -> dict[int, float]:
    parts = total.ratios
    if not parts:
        return {}
    code = np.concatenate([c for _, c, _ in parts])
    count = np.concatenate([n for _, _, n in parts])
    start = np.concatenate([o + np.cumsum(n) - n for o, _, n in parts])
    by_code = np.argsort(code, kind="stable")    # each code's pieces in row order
    code, count, start = code[by_code], count[by_code], start[by_code]
    bounds = np.r_[0, np.flatnonzero(code[1:] != code[:-1]) + 1, len(code)]
    keys = codes.key(code[bounds[:-1]]).tolist()
    buf = total.buffer

    def medians(spans: list) -> list[tuple[int, float]]:
        got = []
        for key, a, b in spans:
            if b - a == 1:      # one piece: selected where it lies (no other key reads it)
                seg = buf[int(start[a]):int(start[a] + count[a])]
            else:
                seg = np.concatenate([buf[s:s + n] for s, n in zip(start[a:b].tolist(), count[a:b].tolist())])
            got.append((int(key), float(np.median(seg, overwrite_input=True))))
        return got

    spans = list(zip(keys, bounds[:-1].tolist(), bounds[1:].tolist()))
    if total.used < _THREADED_MEDIANS or len(spans) < 2:
        return dict(medians(spans))
    from concurrent.futures import ThreadPoolExecutor

    sizes = np.cumsum(np.add.reduceat(count, bounds[:-1]))
    half = min(max(int(np.searchsorted(sizes, sizes[-1] / 2)), 1), len(spans) - 1)
    with ThreadPoolExecutor(2, thread_name_prefix="freezeframe-median") as pool:  # numpy selects without the GIL
        parts = list(pool.map(medians, [spans[:half], spans[half:]]))
    return dict(parts[0] + parts[1])


def _last_drift(total: _Total, codes: _Codes) -> dict[int, float]:
    present = np.flatnonzero(total.best != _NONE)
    values = np.where(total.best[present] >= -1, total.drift[present], np.nan)  # a step below -1 never counts
    return dict(zip(codes.key(present).tolist(), values.tolist()))


def _nonfinite(total: _Part, lookup: StageLookup) -> NonFinite | None:
    if total.bad is None:
        return None
    step, tensor = total.bad
    stage = int(lookup.of(np.array([step], dtype=np.int64))[0])
    return NonFinite(step=step, tensor=tensor, stage=stage, tensors=total.bad_tensors)
