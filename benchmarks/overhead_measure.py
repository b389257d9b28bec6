"""The overhead benchmark's measurement: interleaved plain / watched pairs of one workload and one
instrument (`measure`), their ratios with bootstrap intervals (`ratio_stats`), and `prime`.

Method (DESIGN.md, "Budgets"): one process, two identical models (same init, same data, same
optimizer) stepped alternately, A plain and B instrumented, many times. B's time of a pair is its
step *plus* draining the instrument's background work right after it (`Recorder._writer.drain()`
for freezeframe; see peers.py for wandb and TensorBoard), so background work cannot hide inside A's
next step: A always starts with the instrument idle.
"""

from __future__ import annotations

import copy
import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import freezeframe
from instruments import Instrument
from probes import Heap, rss_bytes, run_dir_bytes
from workloads import Workload, mlp, sgd, train_step, vectors

MiB = 1024 * 1024


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

