"""Overhead of watching a training loop: step time, memory and bytes written, instrumented / plain.

Method (DESIGN.md, "Budgets"): one process, two identical models (same init, same data, same
optimizer) stepped alternately, A plain and B instrumented, many times. B's time of a pair is its
step *plus* draining the instrument's background work right after it (`Recorder._writer.drain()`
for freezeframe; see peers.py for wandb and TensorBoard), so background work cannot hide inside A's
next step: A always starts with the instrument idle.

The headline ratio is the median of B's step time over the median of A's, taken over blocks of
`every` consecutive steps (every block then holds exactly one recorded step; with every=1 a block
is a step). The mean ratio (which also counts the periodic flushes) and a bootstrap 95 % interval
of the headline are printed beside it. A peer recording every N steps whose blocks do not fit 8
times in the time cap gets the schedule-weighted mean instead (see `ratio_stats`).

Instruments: freezeframe (default and every=1), the "floor" (instruments.py), and the peers
(peers.py): `wandb.watch(log="all")` offline and TensorBoard `add_histogram`, each at every step
and every 100 steps. Workloads (workloads.py): a ResNet-18, an MLP, a small transformer encoder.

Usage:  .venv/bin/python benchmarks/overhead.py            (`make bench`; ≈ 15 min on 2 cores)
        .venv/bin/python benchmarks/overhead.py --quick    (a smoke run, writes nothing)
        .venv/bin/python benchmarks/overhead.py --only wandb --no-write   (a subset, print only)
        .venv/bin/python benchmarks/overhead.py --profile  (where an instrumented step's time goes)

Extending: a workload is a `Workload` in workloads.WORKLOADS; an instrument is an `Instrument` in
INSTRUMENTS below, whose `attach(model, optimizer, workdir)` returns an `instruments.Attached`
(raising `PeerUnavailable` skips its rows).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout even without `pip install -e`
sys.path.insert(1, str(Path(__file__).resolve().parent))  # workloads, instruments, peers, overhead_tables

import freezeframe  # noqa: E402
from instruments import Attached, PeerUnavailable, attach_floor, attach_freezeframe  # noqa: E402
from machine import cpu_model  # noqa: E402
from overhead_tables import print_tables, verdicts, write_markdown  # noqa: E402
from peers import ABSENT, attach_tensorboard, attach_wandb  # noqa: E402
from workloads import WORKLOADS, Workload, mlp, sgd, train_step, vectors  # noqa: E402

MiB = 1024 * 1024


# --------------------------------------------------------------------------- memory probes
def rss_bytes() -> int:
    """Resident set size of this process (psutil when installed, else /proc/self/status)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return _status_kib("VmRSS") * 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


class Heap:
    """Memory probes that do not depend on what the allocator keeps cached: `trim()` hands free heap
    pages back to the kernel (glibc malloc_trim), `in_use()` is the bytes malloc has handed out and
    not got back (glibc mallinfo2: uordblks + hblkhd), and the peak RSS over a window comes from
    the kernel's high-water mark, reset with `echo 5 > /proc/self/clear_refs`. Each probe is None
    where the platform lacks it."""

    def __init__(self):
        import ctypes

        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.malloc_trim(0)
        except (OSError, AttributeError):
            self._libc = None
        try:
            class _Mallinfo2(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                           "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
            self._mallinfo2 = self._libc.mallinfo2
            self._mallinfo2.restype = _Mallinfo2
        except AttributeError:
            self._mallinfo2 = None
        try:
            self.reset_peak()
            _status_kib("VmHWM")
            self.peak_ok = True
        except (OSError, RuntimeError):
            self.peak_ok = False

    def trim(self) -> None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)

    def in_use(self) -> int | None:
        if self._mallinfo2 is None:
            return None
        m = self._mallinfo2()
        return int(m.uordblks + m.hblkhd)

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def window_peak(self, fn) -> int | None:
        """Peak RSS above the (trimmed) starting RSS while `fn()` runs."""
        if not self.peak_ok:
            fn()
            return None
        self.trim()
        base = rss_bytes()
        self.reset_peak()
        fn()
        return _status_kib("VmHWM") * 1024 - base


# --------------------------------------------------------------------------- instruments
@dataclass
class Instrument:
    name: str                # the row's name
    attach: Callable[[nn.Module, torch.optim.Optimizer, Path], Attached]
    family: str              # the column of the side-by-side table (overhead_tables.FAMILIES)
    peer: bool = False       # a peer: its rows are skipped (with the reason) when it cannot run


INSTRUMENTS: list[Instrument] = [
    Instrument("freezeframe default", attach_freezeframe(None), "freezeframe"),
    Instrument("freezeframe every=1", attach_freezeframe(1), "freezeframe"),
    Instrument("floor (every=1)", attach_floor, "floor"),
    Instrument("wandb.watch all, log_freq=1", attach_wandb(1), "wandb.watch", peer=True),
    Instrument("wandb.watch all, log_freq=100", attach_wandb(100), "wandb.watch", peer=True),
    Instrument("TensorBoard histograms, every step", attach_tensorboard(1), "TensorBoard", peer=True),
    Instrument("TensorBoard histograms, every 100", attach_tensorboard(100), "TensorBoard", peer=True),
]


# --------------------------------------------------------------------------- measurement
def ratio_stats(a: np.ndarray, b: np.ndarray, block: int, rng: np.random.Generator,
                recorded: np.ndarray | None = None) -> dict:
    """Ratios of B over A: median over blocks of `block` steps (the headline), plain median and
    mean, a paired bootstrap 95 % interval of the headline and the IQR of per-block ratios.
    With fewer than 8 blocks (a recording period too long for this many pairs) the headline is,
    when `recorded` (which pairs' B step recorded) is known and holds both kinds, the
    schedule-weighted mean (1 × recorded + (block - 1) × other steps) / (block × plain), with
    recorded and other pairs resampled separately; else the ratio of the means (bootstrapped over
    pairs)."""
    n = (len(a) // block) * block
    per_pair = False
    if n // block >= 8:
        a_blk, b_blk = a[:n].reshape(-1, block).sum(1), b[:n].reshape(-1, block).sum(1)
        head_fn = lambda ai, bi: np.median(bi, axis=-1) / np.median(ai, axis=-1)  # noqa: E731
        kind = "median of blocks"
        idx = rng.integers(0, len(a_blk), size=(2000, len(a_blk)))
        head, boot = float(head_fn(a_blk, b_blk)), head_fn(a_blk[idx], b_blk[idx])
    elif recorded is not None and block > 1 and recorded.any() and (~recorded).any():
        a_blk, b_blk, per_pair = a, b, True
        rec, oth = np.flatnonzero(recorded), np.flatnonzero(~recorded)

        def weighted(r, o):
            num = b[r].mean(axis=-1) + (block - 1) * b[o].mean(axis=-1)
            return num / (a[r].mean(axis=-1) + (block - 1) * a[o].mean(axis=-1))
        kind = f"schedule-weighted mean ({len(rec)} recorded)"
        head = float(weighted(rec, oth))
        boot = weighted(rec[rng.integers(0, len(rec), size=(2000, len(rec)))],
                        oth[rng.integers(0, len(oth), size=(2000, len(oth)))])
    else:
        if n >= block:                   # whole recording periods only: each holds one recorded step
            a, b = a[:n], b[:n]
        a_blk, b_blk, per_pair = a, b, True
        kind = "mean (too few blocks)"
        idx = rng.integers(0, len(a), size=(2000, len(a)))
        head, boot = float(b.mean() / a.mean()), b[idx].mean(axis=1) / a[idx].mean(axis=1)
    per = b_blk / a_blk
    return {
        "ratio": head, "ratio_kind": kind,
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "block": 1 if per_pair else block, "blocks": int(len(a_blk)),
        "ratio_median_steps": float(np.median(b) / np.median(a)),
        "ratio_paired_median": float(np.median(per)),
        "ratio_mean": float(b.mean() / a.mean()),
        "per_block_iqr": [float(np.percentile(per, 25)), float(np.percentile(per, 75))],
    }


def run_dir_bytes(run_dir: Path) -> dict:
    """Sizes of a closed run directory and its tensor-row count."""
    import pyarrow.parquet as pq

    sizes = {"reference": 0, "manifest": 0, "steps": 0, "tensors": 0, "scalars": 0, "other": 0}
    rows = 0
    recorded_steps = set()
    for f in run_dir.rglob("*"):
        if not f.is_file():
            continue
        key = f.parent.name if f.parent != run_dir else {"reference.safetensors": "reference",
                                                         "manifest.json": "manifest"}.get(f.name, "other")
        sizes[key if key in sizes else "other"] += f.stat().st_size
        if f.parent.name == "tensors" and f.suffix == ".parquet" and not f.name.startswith("."):
            t = pq.read_table(f, columns=["step"])
            rows += t.num_rows
            recorded_steps.update(t.column("step").to_pylist())
    log_bytes = sizes["steps"] + sizes["tensors"] + sizes["scalars"] + sizes["manifest"]
    return {
        "sizes": sizes, "tensor_rows": rows, "recorded_steps": len(recorded_steps),
        "tensors_per_recorded_step": rows / max(len(recorded_steps), 1),
        "bytes_per_tensor_step": sizes["tensors"] / rows if rows else None,
        "log_bytes_per_tensor_step": log_bytes / rows if rows else None,
    }


def _zero() -> float:
    return 0.0


def measure(work: Workload, inst: Instrument, scale: float, max_seconds: float = 60.0, seed: int = 0) -> dict:
    t_case = time.perf_counter()
    torch.manual_seed(seed)
    model_a = work.make_model()
    model_b = copy.deepcopy(model_a)                       # same initial weights
    opt_a, opt_b = work.make_optimizer(model_a), work.make_optimizer(model_b)
    batches = work.make_batches(torch.Generator().manual_seed(seed))
    loss_fn = nn.CrossEntropyLoss()
    model_a.train(), model_b.train()
    k = [0, 0]                                             # next batch of A, of B: both see the same data
    after_b: list[Callable[[torch.Tensor], None]] = []     # the instrument's after_step, once attached

    def step(which: int, n: int = 1) -> None:
        model, opt = (model_a, opt_a) if which == 0 else (model_b, opt_b)
        for _ in range(n):
            loss = train_step(model, opt, batches[k[which] % len(batches)], loss_fn)
            k[which] += 1
            if which == 1:
                for fn in after_b:
                    fn(loss)

    for _ in range(work.plain_steps):                      # grads and optimizer state allocated
        step(0), step(1)

    workdir = Path(tempfile.mkdtemp(prefix="ff-bench-"))
    heap = Heap()
    att = None
    try:
        heap.trim()
        rss0, heap0 = rss_bytes(), heap.in_use()
        t0 = time.perf_counter()
        att = inst.attach(model_b, opt_b, workdir)
        attach_s = time.perf_counter() - t0
        if att.after_step is not None:
            after_b.append(att.after_step)
        helper_cpu = att.helper_cpu or _zero
        due = att.due

        def pair() -> tuple:
            h0 = helper_cpu()
            c, t = time.process_time(), time.perf_counter()
            step(0)
            ta, ca = time.perf_counter() - t, time.process_time() - c
            h1 = helper_cpu()
            recorded = -1 if due is None else int(due() == 0)
            c, t = time.process_time(), time.perf_counter()
            step(1)
            tb_step = time.perf_counter() - t
            att.drain()                                    # B's background work, counted as B's
            tb, cb = time.perf_counter() - t, time.process_time() - c
            h2 = helper_cpu()
            return ta, tb, tb - tb_step, ca, cb, h1 - h0, h2 - h1, recorded, h2

        # Warm-up: the workload's pairs, longer while freezeframe calibrates, shorter (at least 3)
        # for an instrument that makes steps slow once a sixth of the time cap is spent.
        warm, t_warm = 0, time.perf_counter()
        while True:
            calibrating = att.every() is None
            if not calibrating and warm >= work.warmup:
                break
            if calibrating and warm >= 10 * work.warmup:
                break
            if not calibrating and warm >= 3 and time.perf_counter() - t_warm > max_seconds / 6:
                break
            pair()
            warm += 1
        # At least 8 recording periods, so that the median over blocks of `every` steps means
        # something (up to 20× the workload's pairs; beyond that the mean ratio is the headline).
        period = max(1, att.every() or 1)
        base = max(8, int(round(work.pairs * scale)))
        want = min(max(base, 8 * period), 20 * base)
        gc.collect()
        rows, t_loop, n_rec = [], time.perf_counter(), 0
        # A loaded machine stops at the time cap, but not before 30 pairs and 8 recording periods;
        # a peer with a known schedule may stop after 30 pairs holding two recorded steps at half the
        # cap, or one at the cap (its ratio is then schedule-weighted); an instrument that makes
        # steps very slow after 12 pairs at 1.5×; a peer after 12 pairs at 3× (then possibly
        # without a recorded step: the table says so).
        least = min(want, max(30, 8 * period))
        while len(rows) < want:
            rows.append(pair())
            n_rec += rows[-1][7] == 1
            elapsed = time.perf_counter() - t_loop
            if due is not None and period > 1 and len(rows) < least and len(rows) >= 30 and (
                    (elapsed > max_seconds / 2 and n_rec >= 2) or (elapsed > max_seconds and n_rec >= 1)):
                break
            if elapsed <= max_seconds:
                continue
            if len(rows) >= least:
                break
            if elapsed > 1.5 * max_seconds and len(rows) >= 12 and (period == 1 or n_rec >= 1):
                break
            if due is not None and elapsed > 3 * max_seconds and len(rows) >= 12:   # a peer on a very busy
                break                                                          # machine: give up waiting
        pairs = len(rows)
        att.drain()
        h_end = helper_cpu()
        heap.trim()
        rss1, heap1 = rss_bytes(), heap.in_use()
        helper_rss = att.helper_rss() if att.helper_rss else None
        every = att.every()

        # Memory pass (untimed): peak RSS over windows of `every` steps (so that each window of the
        # watched model holds a recorded step), plain and watched alternately.
        window = min(max(1, every or 1), 200)
        step_b = float(np.median([r[1] for r in rows]))
        windows = [(window, window)] * 6
        peak_note = None
        if window > 1 and due is not None:
            # A peer with a known schedule: one window of the watched model ending at its next
            # recorded step (against one plain step), if that is near enough, else no peak figure.
            if (due() + 1) * step_b <= max_seconds / 3:
                windows = [(1, due() + 1)]
            else:
                windows, peak_note = [], (f"a window holding a recorded step would take "
                                          f"{(due() + 1) * step_b:.0f} s")
        peaks = [[], []]
        t_mem = time.perf_counter()
        for w, sizes in enumerate(windows):
            # up to 6 windows each, at least two unless the first pair alone took a third of the cap
            if w >= 1 and time.perf_counter() - t_mem > max_seconds / 3:
                break
            for which in (0, 1):
                def run(which=which, n=sizes[which]):
                    step(which, n)
                    if which == 1:
                        att.drain()
                peaks[which].append(heap.window_peak(run))
        info = att.info()
        t0 = time.perf_counter()
        closing, att = att, None
        closing.close()
        close_s = time.perf_counter() - t0
        if closing.written is not None:
            written = closing.written()
        else:
            written = run_dir_bytes(closing.run_dir) if closing.run_dir is not None else None
    finally:
        if att is not None:                                # failed half-way: stop the instrument
            try:
                att.close()
            except Exception:
                pass
        shutil.rmtree(workdir, ignore_errors=True)

    arr = np.array([r[:7] for r in rows], dtype=float)
    a, b, drain, cpu_a, cpu_b, h_in_a, h_in_b = arr.T
    recorded = np.array([r[7] for r in rows]) == 1 if due is not None else None
    # Helper processes' CPU: what ran in B's window, plus what ran in the *next* plain window
    # (left over from this B step; for the last pair, up to the final drain).
    h_after = np.append(h_in_a[1:], h_end - rows[-1][8])
    cpu_b = cpu_b + h_in_b + h_after
    block = max(1, every or 1)
    stats = ratio_stats(a, b, block, np.random.default_rng(seed), recorded)
    cpu = ratio_stats(cpu_a, cpu_b, block, np.random.default_rng(seed), recorded)
    calib = info.get("calibration")
    peak_extra = None
    if heap.peak_ok and peaks[0] and peaks[1]:
        peak_extra = float(np.median(peaks[1]) - np.median(peaks[0])) / MiB
    analytic = closing.analytic_bytes
    res = {
        "workload": work.name, "instrument": inst.name, "family": inst.family, "peer": inst.peer,
        "pairs": pairs, "warmup_pairs": warm, "every": every,
        "recorded_in_loop": int(recorded.sum()) if recorded is not None else None,
        "step_ms_plain_median": 1e3 * float(np.median(a)),
        "step_ms_watched_median": 1e3 * float(np.median(b)),
        "drain_ms_mean": 1e3 * float(drain.mean()), "drains_over_1ms": int((drain > 1e-3).sum()),
        **stats,
        "cpu_ratio": cpu["ratio"], "cpu_ci95": cpu["ci95"], "cpu_ratio_mean": cpu["ratio_mean"],
        "cpu_ms_plain_median": 1e3 * float(np.median(cpu_a)),
        "pairs_wanted": want,
        "attach_s": attach_s, "close_s": close_s, "case_s": time.perf_counter() - t_case,
        "memory": {
            "rss_growth_mib": (rss1 - rss0) / MiB,
            "heap_growth_mib": None if heap0 is None else (heap1 - heap0) / MiB,
            "helper_rss_mib": None if helper_rss is None else helper_rss / MiB,
            "step_peak_extra_mib": peak_extra, "peak_windows": len(peaks[0]),
            "peak_window_steps": list(windows[0]) if windows else None, "peak_note": peak_note,
            "peaks_plain_mib": [None if x is None else x / MiB for x in peaks[0]],
            "peaks_watched_mib": [None if x is None else x / MiB for x in peaks[1]],
            "analytic_reference_mib": analytic["reference"] / MiB if analytic else None,
            "analytic_temporary_mib": analytic["temporary"] / MiB if analytic else None,
        },
        "written": written,
        "info": {k: v for k, v in info.items() if k != "calibration"},
    }
    if closing.helper_cpu is not None:
        res["helper"] = {
            "names": info.get("helpers", []),
            "cpu_ms_per_pair": 1e3 * float((h_in_b + h_after).mean()),
            "cpu_ms_in_plain_window": 1e3 * float(h_in_a[1:].mean()) if pairs > 1 else None,
        }
    if calib:
        res["calibration"] = dict(calib)
    return res


def prime() -> None:
    """Pay the one-time costs (imports, the writer's first Parquet file, thread start-up) before
    anything is measured, so that they do not land on whichever instrument runs first."""
    model = mlp()
    opt = sgd(model)
    workdir = Path(tempfile.mkdtemp(prefix="ff-prime-"))
    try:
        rec = freezeframe.watch(model, opt, workdir / "run", every=1, mode="new")
        for batch in vectors(torch.Generator().manual_seed(1))[:3]:
            train_step(model, opt, batch, nn.CrossEntropyLoss())
        rec.close()
        run_dir_bytes(workdir / "run")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- reporting
def machine() -> dict:
    cpu = cpu_model()
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "freezeframe": freezeframe.__version__, "platform": platform.platform()}


# --------------------------------------------------------------------------- profiling
def profile(work: Workload, every: int | None, steps: int) -> None:
    """Where a watched step's time goes: phase timers around the recorder's methods, then cProfile
    of the watched steps (freezeframe's own functions and the torch calls they make)."""
    import cProfile
    import pstats

    from freezeframe.capture import metrics

    torch.manual_seed(0)
    model = work.make_model()
    plain = copy.deepcopy(model)
    opt, opt_plain = work.make_optimizer(model), work.make_optimizer(plain)
    batches = work.make_batches(torch.Generator().manual_seed(0))
    loss_fn = nn.CrossEntropyLoss()
    workdir = Path(tempfile.mkdtemp(prefix="ff-prof-"))
    try:
        rec = freezeframe.watch(model, opt, workdir / "run", every=every, mode="new")
        acc: dict[str, list[float]] = {}

        def wrap(obj, name, label):
            fn = getattr(obj, name)

            def timed(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    acc.setdefault(label, []).append(time.perf_counter() - t)
            setattr(obj, name, timed)

        # Internal names change as the library evolves: wrap the ones that exist.
        for name in ("_pre_step", "_post_step", "_record_metrics", "_begin_stage", "_flush", "_forward_pre",
                     "_forward_post", "_detect_buffer_writes"):
            if hasattr(rec, name):
                wrap(rec, name, f"Recorder.{name}")
        bounds = getattr(rec, "_bounds", None)
        for name in ("detect_buffer_writes", "after_forward", "after_step"):
            if bounds is not None and hasattr(bounds, name):
                wrap(bounds, name, f"BoundaryTracker.{name}")
        for name in ("snapshot", "step_metrics", "update_norms", "norms", "distances", "to_host", "content_hashes"):
            if hasattr(metrics, name):
                wrap(metrics, name, f"metrics.{name}")
        for i in range(20):
            train_step(plain, opt_plain, batches[i % len(batches)], loss_fn)
            train_step(model, opt, batches[i % len(batches)], loss_fn)
            rec._writer.drain()
        acc.clear()
        step_t, plain_t = [], []
        prof = cProfile.Profile()
        for i in range(steps):
            t = time.perf_counter()
            train_step(plain, opt_plain, batches[i % len(batches)], loss_fn)
            plain_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            prof.enable()
            train_step(model, opt, batches[i % len(batches)], loss_fn)
            rec._writer.drain()
            prof.disable()
            step_t.append(time.perf_counter() - t)
        rec.close()
        print(f"\n== profile: {work.name}, every={rec.every}, {steps} steps, "
              f"median watched step {1e3 * statistics.median(step_t):.1f} ms (under cProfile), "
              f"plain twin stepped in between {1e3 * statistics.median(plain_t):.1f} ms; "
              f"load average {os.getloadavg()[0]:.2f} ==")
        print("phase timers (ms per step, total / steps; nested: _record_metrics is inside _post_step):")
        for label, ts in sorted(acc.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {label:32s} {1e3 * sum(ts) / steps:8.3f} ms/step  ({len(ts)} calls, "
                  f"median {1e3 * statistics.median(ts):.3f} ms/call)")
        st = pstats.Stats(prof)
        st.sort_stats("tottime")
        print("cProfile, top functions by own time (ms per step):")
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]
        for (file, line, fn), (cc, nc, tt, ct, _) in rows:
            where = f"{Path(file).name}:{line}" if line else file
            print(f"  {1e3 * tt / steps:8.3f} own  {1e3 * ct / steps:8.3f} cum  {nc / steps:7.1f} calls  {fn}  ({where})")
        print("cProfile, freezeframe's own functions by own time (ms per step):")
        ours = [kv for kv in st.stats.items() if f"{os.sep}freezeframe{os.sep}" in kv[0][0]]
        for (file, line, fn), (cc, nc, tt, ct, _) in sorted(ours, key=lambda kv: -kv[1][2])[:15]:
            print(f"  {1e3 * tt / steps:8.3f} own  {1e3 * ct / steps:8.3f} cum  {nc / steps:7.1f} calls  {fn}  "
                  f"({Path(file).parent.name}/{Path(file).name}:{line})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a short smoke run (pairs ÷ 10, --max-seconds at most 15); writes no results")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every workload's number of pairs")
    ap.add_argument("--only", default="", help="substring filter on 'workload / instrument'")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="stop a case's timed loop after this long (at least 30 pairs), for loaded machines")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores this process may use)")
    ap.add_argument("--no-write", action="store_true", help="print only; write no JSON or docs")
    ap.add_argument("--profile", action="store_true", help="profile a watched ResNet-18 step instead")
    ap.add_argument("--profile-every", default="1", help="every= for --profile ('none' for the default)")
    ap.add_argument("--profile-model", default="resnet", help="substring of the workload to profile")
    ap.add_argument("--profile-steps", type=int, default=30)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.profile:
        every = None if args.profile_every.lower() == "none" else int(args.profile_every)
        work = next(w for w in WORKLOADS if args.profile_model.lower() in w.name.lower())
        profile(work, every, steps=args.profile_steps)
        return 0

    scale = args.scale * (0.1 if args.quick else 1.0)
    max_seconds = min(args.max_seconds, 15.0) if args.quick else args.max_seconds
    write = not (args.quick or args.no_write)
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    prime()
    results, skipped = [], []
    for work in WORKLOADS:
        for inst in INSTRUMENTS:
            if args.only and args.only.lower() not in f"{work.name} / {inst.name}".lower():
                continue
            print(f"… {work.name} / {inst.name}", flush=True)
            try:
                r = measure(work, inst, scale, max_seconds)
            except PeerUnavailable as e:
                reason = str(e)
            except Exception as e:
                if not inst.peer:
                    raise
                reason = f"failed: {type(e).__name__}: {e}"
                traceback.print_exc()
            else:
                results.append(r)
                extra = ""
                if r.get("helper"):
                    h = r["helper"]
                    extra = (f", service CPU {h['cpu_ms_per_pair']:.1f} ms/step "
                             f"({h['cpu_ms_in_plain_window']:.1f} in the plain step)")
                print(f"  ratio {r['ratio']:.3f} (mean {r['ratio_mean']:.3f}, CPU {r['cpu_ratio']:.3f}), "
                      f"every={r['every']}, {r['pairs']} pairs, plain {r['step_ms_plain_median']:.2f} ms{extra}; "
                      f"{r['case_s']:.0f} s", 
                      flush=True)
                continue
            print(f"  skipped: {reason}", flush=True)
            skipped.append({"workload": work.name, "instrument": inst.name, "reason": reason})
    elapsed = time.perf_counter() - started
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "make bench  (.venv/bin/python benchmarks/overhead.py " + " ".join(sys.argv[1:]) + ")",
        "machine": machine(), "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": elapsed, "verdicts": verdicts(results), "skipped": skipped, "absent": ABSENT,
        "peers": peer_versions(results),
        "method": "interleaved A (plain) / B (watched) steps in one process; B's time includes draining "
                  "the instrument's background work after its step (freezeframe's writer thread, "
                  "TensorBoard's writer.flush(), W&B's run.status() round trip; W&B's service CPU counted)",
    }
    print()
    busy = meta["load_start"][0] > meta["machine"]["cores"] or meta["load_end"][0] > meta["machine"]["cores"]
    meta["machine_busy"] = busy
    print_tables(results)
    print("The watched model's time includes draining the instrument's background work after each of its "
          "steps (freezeframe: rec._writer.drain(); TensorBoard: writer.flush(); W&B: run.status(), with "
          "its service's CPU time added to the CPU ratio), so that work cannot hide in the plain model's steps.")
    for v in meta["verdicts"]:
        print(v)
    for s in skipped:
        print(f"skipped: {s['workload'].split(',')[0]} / {s['instrument']}: {s['reason']}")
    for name, why in ABSENT.items():
        print(f"not measured: {name}: {why}")
    if busy:
        print(f"WARNING: the machine was busy (load average {load_start} → {meta['load_end']} on "
              f"{meta['machine']['cores']} cores): other processes' CPU use makes these ratios noisy.")
    print(f"machine: {meta['machine']['cores']} cores, {meta['machine']['cpu']}, torch {meta['machine']['torch']}; "
          f"load average {load_start} → {meta['load_end']}; {elapsed:.0f} s")
    if write:
        day = dt.date.today().isoformat()
        out = ROOT / "benchmarks" / "results" / f"overhead-{day}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=_json_default))
        write_markdown(ROOT / "docs" / "benchmarks.md", results, meta, ABSENT)
        print(f"wrote {out.relative_to(ROOT)} and docs/benchmarks.md")
    return 0


def peer_versions(results: list[dict]) -> str:
    """The peers' versions, for the header of docs/benchmarks.md."""
    out = []
    if any(r["family"] == "wandb.watch" for r in results):
        try:
            import wandb
            out.append(f"wandb {wandb.__version__} (offline)")
        except ImportError:
            pass
    if any(r["family"] == "TensorBoard" for r in results):
        try:
            import tensorboard
            out.append(f"tensorboard {tensorboard.__version__}")
        except ImportError:
            pass
    return ", ".join(out)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
