"""Overhead of watching a training loop: step time, memory and bytes written, instrumented / plain.

Method (DESIGN.md, "Budgets"): one process, two identical models (same init, same data, same
optimizer) stepped alternately, A plain and B instrumented, many times. B's time of a pair is its
step *plus* draining the instrument's background writer right after it (`Recorder._writer.drain()`),
so background work cannot hide inside A's next step: A always starts with the writer idle.

The headline ratio is the median of B's step time over the median of A's, taken over blocks of
`every` consecutive steps (every block then holds exactly one recorded step; with every=1 a block
is a step). The mean ratio (which also counts the periodic flushes) and a bootstrap 95 % interval
of the headline are printed beside it.

Usage:  .venv/bin/python benchmarks/overhead.py            (`make bench`; ≈ 3–4 min on 2 cores)
        .venv/bin/python benchmarks/overhead.py --quick    (a smoke run, writes nothing)
        .venv/bin/python benchmarks/overhead.py --profile  (where an instrumented step's time goes)

Extending: a workload is a `Workload` in WORKLOADS; an instrument is a `(name, attach)` pair in
INSTRUMENTS where `attach(model, optimizer, workdir)` returns an `Attached` (wandb.watch and
TensorBoard histograms will be added there).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout even without `pip install -e`

import freezeframe  # noqa: E402

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


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """A model, its optimizer and a fixed set of batches; `pairs` interleaved A/B steps measured."""

    name: str
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    make_batches: Callable[[torch.Generator], list[tuple[torch.Tensor, torch.Tensor]]]
    pairs: int
    warmup: int = 12          # pairs before measuring (freezeframe's calibration happens here)
    plain_steps: int = 3      # unwatched steps of both models before anything is attached


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _images(g: torch.Generator) -> list:
    return [(torch.randn(16, 3, 64, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]


def _vectors(g: torch.Generator) -> list:
    return [(torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(8)]


WORKLOADS = [
    Workload("ResNet-18, 64 px, batch 16, SGD+momentum", _resnet18, _sgd, _images, pairs=60),
    Workload("MLP 256-256-256-10, batch 64, SGD+momentum", _mlp, _sgd, _vectors, pairs=300),
]


# --------------------------------------------------------------------------- instruments
@dataclass
class Attached:
    """What an instrument attached to model B exposes to the benchmark."""

    drain: Callable[[], None]                     # wait until its background work is done
    close: Callable[[], None]
    every: Callable[[], int | None] = lambda: 1   # the recording period in force
    analytic_bytes: dict = field(default_factory=dict)  # {"reference": n, "temporary": n}
    run_dir: Path | None = None                   # where it wrote, for the bytes-written figures
    info: Callable[[], dict] = dict               # anything else worth reporting


def attach_freezeframe(every: int | None):
    def attach(model: nn.Module, opt: torch.optim.Optimizer, workdir: Path) -> Attached:
        run_dir = workdir / "run"
        rec = freezeframe.watch(model, opt, run_dir, every=every, mode="new")
        trainable = [p for p in model.parameters() if p.requires_grad]
        return Attached(
            drain=rec._writer.drain, close=rec.close, every=lambda: rec.every, run_dir=run_dir,
            analytic_bytes={"reference": tensor_bytes(list(model.parameters()) + list(model.buffers())),
                            "temporary": tensor_bytes(trainable)},
            info=lambda: {"calibration": rec.sampler.measured},
        )
    return attach


class _Floor:
    """The least a per-step metric needs: snapshot the parameters before the step (a clone), after
    it the norms of the gradients, of (after - before) and of (after - reference), one host sync."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer):
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            self.ref = [p.detach().clone() for p in self.params]
        self.rows: list[np.ndarray] = []
        self.before: list[torch.Tensor] | None = None
        self.handles = [opt.register_step_pre_hook(self.pre), opt.register_step_post_hook(self.post)]

    @torch.no_grad()
    def pre(self, opt, args, kwargs) -> None:
        self.before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def post(self, opt, args, kwargs) -> None:
        params = [p.detach() for p in self.params]
        grads = torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
        torch._foreach_sub_(self.before, params)              # before := before - after
        updates = torch._foreach_norm(self.before)
        drift = torch._foreach_norm(torch._foreach_sub(params, self.ref))
        self.before = None
        self.rows.append(torch.stack(list(grads) + list(updates) + list(drift)).cpu().numpy())  # the one sync

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def attach_floor(model: nn.Module, opt: torch.optim.Optimizer, workdir: Path) -> Attached:
    f = _Floor(model, opt)
    return Attached(drain=lambda: None, close=f.close,
                    analytic_bytes={"reference": tensor_bytes(f.params), "temporary": tensor_bytes(f.params)})


# (name, attach): add peers here (wandb.watch offline, TensorBoard add_histogram, ...).
INSTRUMENTS: list[tuple[str, Callable[[nn.Module, torch.optim.Optimizer, Path], Attached]]] = [
    ("freezeframe default", attach_freezeframe(None)),
    ("freezeframe every=1", attach_freezeframe(1)),
    ("floor (every=1)", attach_floor),
]


# --------------------------------------------------------------------------- measurement
def train_step(model, opt, batch, loss_fn) -> None:
    x, y = batch
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    opt.step()


def ratio_stats(a: np.ndarray, b: np.ndarray, block: int, rng: np.random.Generator) -> dict:
    """Ratios of B over A: median over blocks of `block` steps (the headline), plain median and
    mean, a paired bootstrap 95 % interval of the headline and the IQR of per-block ratios.
    With fewer than 8 blocks (a recording period too long for this many pairs) the headline is
    the ratio of the means (bootstrapped over pairs) instead."""
    n = (len(a) // block) * block
    if n // block >= 8:
        a_blk, b_blk = a[:n].reshape(-1, block).sum(1), b[:n].reshape(-1, block).sum(1)
        stat, kind = np.median, "median of blocks"
    else:
        a_blk, b_blk, block = a, b, 1
        stat, kind = np.mean, "mean (too few blocks)"
    head = float(stat(b_blk) / stat(a_blk))
    idx = rng.integers(0, len(a_blk), size=(2000, len(a_blk)))
    boot = stat(b_blk[idx], axis=1) / stat(a_blk[idx], axis=1)
    per = b_blk / a_blk
    return {
        "ratio": head, "ratio_kind": kind,
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "block": block, "blocks": int(len(a_blk)),
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


def measure(work: Workload, inst_name: str, attach, scale: float, max_seconds: float = 60.0,
            seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model_a = work.make_model()
    model_b = copy.deepcopy(model_a)                       # same initial weights
    opt_a, opt_b = work.make_optimizer(model_a), work.make_optimizer(model_b)
    batches = work.make_batches(torch.Generator().manual_seed(seed))
    loss_fn = nn.CrossEntropyLoss()
    model_a.train(), model_b.train()
    k = [0, 0]                                             # next batch of A, of B: both see the same data

    def step(which: int, n: int = 1) -> None:
        model, opt = (model_a, opt_a) if which == 0 else (model_b, opt_b)
        for _ in range(n):
            train_step(model, opt, batches[k[which] % len(batches)], loss_fn)
            k[which] += 1

    for _ in range(work.plain_steps):                      # grads and optimizer state allocated
        step(0), step(1)

    workdir = Path(tempfile.mkdtemp(prefix="ff-bench-"))
    heap = Heap()
    try:
        heap.trim()
        rss0, heap0 = rss_bytes(), heap.in_use()
        t0 = time.perf_counter()
        att = attach(model_b, opt_b, workdir)
        attach_s = time.perf_counter() - t0

        def pair() -> tuple[float, float, float, float, float]:
            c, t = time.process_time(), time.perf_counter()
            step(0)
            ta, ca = time.perf_counter() - t, time.process_time() - c
            c, t = time.process_time(), time.perf_counter()
            step(1)
            tb_step = time.perf_counter() - t
            att.drain()                                    # B's background work, counted as B's
            tb, cb = time.perf_counter() - t, time.process_time() - c
            return ta, tb, tb - tb_step, ca, cb

        warm = 0
        while warm < work.warmup or (att.every() is None and warm < 10 * work.warmup):
            pair()
            warm += 1
        # At least 8 recording periods, so that the median over blocks of `every` steps means
        # something (up to 20× the workload's pairs; beyond that the mean ratio is the headline).
        base = max(8, int(round(work.pairs * scale)))
        want = min(max(base, 8 * (att.every() or 1)), 20 * base)
        gc.collect()
        rows, t_loop = [], time.perf_counter()
        # A loaded machine stops at the time cap, but not before 30 pairs and 8 recording periods.
        least = min(want, max(30, 8 * max(1, att.every() or 1)))
        while len(rows) < want:
            rows.append(pair())
            if time.perf_counter() - t_loop > max_seconds and len(rows) >= least:
                break
        pairs, times = len(rows), np.array(rows)
        att.drain()
        heap.trim()
        rss1, heap1 = rss_bytes(), heap.in_use()
        every = att.every()

        # Memory pass (untimed): peak RSS over windows of `every` steps (so that each window of the
        # watched model holds a recorded step), plain and watched alternately.
        window = min(max(1, every or 1), 200)
        peaks = [[], []]
        t_mem = time.perf_counter()
        for w in range(6):
            if w >= 2 and time.perf_counter() - t_mem > max_seconds / 3:
                break
            for which in (0, 1):
                def run(which=which):
                    step(which, window)
                    if which == 1:
                        att.drain()
                peaks[which].append(heap.window_peak(run))
        info = att.info()
        t0 = time.perf_counter()
        att.close()
        close_s = time.perf_counter() - t0
        written = run_dir_bytes(att.run_dir) if att.run_dir is not None else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    a, b, drain, cpu_a, cpu_b = times.T
    stats = ratio_stats(a, b, max(1, every or 1), np.random.default_rng(seed))
    cpu = ratio_stats(cpu_a, cpu_b, max(1, every or 1), np.random.default_rng(seed))
    calib = info.get("calibration")
    peak_extra = None
    if heap.peak_ok:
        peak_extra = float(np.median(peaks[1]) - np.median(peaks[0])) / MiB
    res = {
        "workload": work.name, "instrument": inst_name, "pairs": pairs, "warmup_pairs": warm,
        "every": every,
        "step_ms_plain_median": 1e3 * float(np.median(a)),
        "step_ms_watched_median": 1e3 * float(np.median(b)),
        "drain_ms_mean": 1e3 * float(drain.mean()), "drains_over_1ms": int((drain > 1e-3).sum()),
        **stats,
        "cpu_ratio": cpu["ratio"], "cpu_ci95": cpu["ci95"], "cpu_ratio_mean": cpu["ratio_mean"],
        "cpu_ms_plain_median": 1e3 * float(np.median(cpu_a)),
        "pairs_wanted": want,
        "attach_s": attach_s, "close_s": close_s,
        "memory": {
            "rss_growth_mib": (rss1 - rss0) / MiB,
            "heap_growth_mib": None if heap0 is None else (heap1 - heap0) / MiB,
            "step_peak_extra_mib": peak_extra, "peak_window_steps": window, "peak_windows": len(peaks[0]),
            "peaks_plain_mib": [None if x is None else x / MiB for x in peaks[0]],
            "peaks_watched_mib": [None if x is None else x / MiB for x in peaks[1]],
            "analytic_reference_mib": att.analytic_bytes.get("reference", 0) / MiB,
            "analytic_temporary_mib": att.analytic_bytes.get("temporary", 0) / MiB,
        },
        "written": written,
    }
    if calib:
        res["calibration"] = dict(calib)
    return res


def prime() -> None:
    """Pay the one-time costs (imports, the writer's first Parquet file, thread start-up) before
    anything is measured, so that they do not land on whichever instrument runs first."""
    model = _mlp()
    opt = _sgd(model)
    workdir = Path(tempfile.mkdtemp(prefix="ff-prime-"))
    try:
        rec = freezeframe.watch(model, opt, workdir / "run", every=1, mode="new")
        for batch in _vectors(torch.Generator().manual_seed(1))[:3]:
            train_step(model, opt, batch, nn.CrossEntropyLoss())
        rec.close()
        run_dir_bytes(workdir / "run")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- reporting
def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "freezeframe": freezeframe.__version__, "platform": platform.platform()}


def _model(r: dict) -> str:
    return r["workload"].split(",")[0]


def _rng(x: list) -> str:
    return f"{x[0]:.3f}–{x[1]:.3f}"


TIME_HEADERS = ["model", "instrument", "every", "pairs", "plain ms", "ratio", "95 % CI", "median/step", "mean",
                "IQR/block", "CPU ratio"]
MEMORY_HEADERS = ["model", "instrument", "RSS +MiB", "heap +MiB", "peak +MiB", "analytic MiB", "B/row (log)",
                  "rows", "close s"]


def time_rows(results: list[dict]) -> list[list[str]]:
    return [[_model(r), r["instrument"], str(r["every"]), str(r["pairs"]), f"{r['step_ms_plain_median']:.2f}",
             f"{r['ratio']:.3f}" + ("" if r["ratio_kind"].startswith("median") else " (mean)"), _rng(r["ci95"]),
             f"{r['ratio_median_steps']:.3f}", f"{r['ratio_mean']:.3f}", _rng(r["per_block_iqr"]),
             f"{r['cpu_ratio']:.3f}"] for r in results]


def memory_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        m, w = r["memory"], r["written"]
        opt = lambda v: "—" if v is None else f"{v:+.1f}"  # noqa: E731
        rows.append([
            _model(r), r["instrument"], opt(m["rss_growth_mib"]), opt(m["heap_growth_mib"]),
            opt(m["step_peak_extra_mib"]),
            f"{m['analytic_reference_mib']:.1f} + {m['analytic_temporary_mib']:.1f}",
            "—" if not w or w["bytes_per_tensor_step"] is None else
            f"{w['bytes_per_tensor_step']:.1f} ({w['log_bytes_per_tensor_step']:.1f})",
            "—" if not w else f"{w['recorded_steps']}×{w['tensors_per_recorded_step']:.0f}",
            f"{r['close_s']:.2f}",
        ])
    return rows


def print_tables(results: list[dict]) -> None:
    tables = [("Overhead per training step: watched / plain, interleaved, writer drained", TIME_HEADERS,
               time_rows(results)),
              ("Memory and bytes written", MEMORY_HEADERS, memory_rows(results))]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, headers, rows in tables:
            print(title)
            print(" | ".join(headers))
            for row in rows:
                print(" | ".join(row))
        return
    console = Console(width=max(150, shutil.get_terminal_size().columns))
    for title, headers, rows in tables:
        t = Table(title=title)
        for h in headers:
            t.add_column(h, justify="left" if h in ("model", "instrument") else "right", no_wrap=True)
        for row in rows:
            t.add_row(*row)
        console.print(t)


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *["| " + " | ".join(row) + " |" for row in rows]]


def verdicts(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        if not r["workload"].startswith("ResNet-18"):
            continue
        if r["instrument"].startswith("freezeframe default"):
            ok = r["ratio"] <= 1.03
            out.append(f"ResNet-18, freezeframe default: {100 * (r['ratio'] - 1):+.1f} % "
                       f"(mean {100 * (r['ratio_mean'] - 1):+.1f} %), budget ≤ 3 %: {'met' if ok else 'NOT met'}")
        elif r["instrument"] == "freezeframe every=1":
            ok = r["ratio"] <= 1.3
            out.append(f"ResNet-18, freezeframe every=1: {r['ratio']:.3f}× (mean {r['ratio_mean']:.3f}×), "
                       f"budget ≤ 1.3×: {'met' if ok else 'NOT met'}")
    return out


NOTES = """\
- **ratio**: median of the watched model's time over the median of the plain model's, over blocks of
  `every` consecutive steps (each block holds one recorded step; for every=1 a block is one step).
  **95 % CI**: paired bootstrap of that ratio (2,000 resamples). **median/step**: the same with single
  steps (hides the recorded steps when every > 1). **mean**: ratio of mean step times, which also
  counts the periodic flush (every `flush_seconds`). **IQR/block**: spread of the per-block ratios.
  **CPU ratio**: the headline ratio computed from the process's CPU time (all threads, the writer's
  included) instead of wall time; it is less disturbed by other processes on a shared machine, but
  counts OpenMP threads spinning while they wait. **pairs**: measured pairs (a case stops early,
  after at least 30, once its timed loop passes `--max-seconds`).
- The watched model's time of each pair includes draining freezeframe's background writer
  (`rec._writer.drain()`) right after its step, so the writer's work never overlaps the plain
  model's step. The warm-up pairs (which contain freezeframe's calibration steps and the first
  stage's content hashes) are not measured; the close (hash + compaction) is timed separately.
- Memory columns. **RSS +MiB**: resident memory after the measured steps minus before attaching (both models had
  already stepped; free heap pages handed back with malloc_trim before each reading). **heap +MiB**:
  the same for the bytes malloc has handed out (glibc mallinfo2), which free-list caching cannot
  blur. **peak +MiB**: in a separate untimed pass, the median peak RSS (kernel high-water mark)
  over a window of `every` steps of the watched model minus the same for the plain model.
  **analytic MiB**: the persistent reference copy (parameters + buffers) + one temporary copy of
  the recorded parameters.
- **B/row**: bytes of the compacted `tensors` table per (tensor, recorded step) row; in brackets the
  whole log (steps + tensors + scalars + manifest, not the reference weights) per row. **rows**:
  recorded steps × tensors per recorded step (warm-up and memory-pass steps included). **close s**:
  the time `close()` took (final hashes, flush, compaction).
"""


def write_markdown(path: Path, results: list[dict], meta: dict) -> None:
    m = meta["machine"]
    lines = [
        "# Benchmarks", "",
        "Generated by `make bench` (`.venv/bin/python benchmarks/overhead.py`); regenerate with the same command.", "",
        f"- Date: {meta['date']}",
        f"- Machine: {m['cores']} cores ({m['cpu']}), torch {m['torch']} with {m['torch_threads']} threads, "
        f"Python {m['python']}, {m['platform']}",
        f"- freezeframe {m['freezeframe']}; load average at start {meta['load_start']}, at end {meta['load_end']} "
        "(the machine is shared: other processes' CPU use is noise that the interleaving spreads over both models)",
        f"- Total benchmark time: {meta['elapsed_s']:.0f} s", "",
        "## Overhead per training step", "",
        *_md_table(TIME_HEADERS, time_rows(results)), "",
        "## Memory and bytes written", "",
        *_md_table(MEMORY_HEADERS, memory_rows(results)),
    ]
    lines += ["", *[f"- {v}" for v in meta["verdicts"]]]
    if meta.get("machine_busy"):
        lines.append(f"- The machine was busy during this run (load average {meta['load_start']} → "
                     f"{meta['load_end']} on {m['cores']} cores): the ratios are noisier than on a quiet machine.")
    lines += ["", "## How it is measured", "", NOTES]
    extra = []
    for r in results:
        c = r.get("calibration")
        if c:
            extra.append(f"- {r['workload'].split(',')[0]}, {r['instrument']}: calibration measured a training "
                         f"step of {1e3 * c['step_s']:.1f} ms, recording {1e3 * c['recording_s']:.2f} ms, "
                         f"per-step bookkeeping {1e3 * c['per_step_s']:.2f} ms → every={r['every']}")
        if r["written"]:
            w = r["written"]
            extra.append(f"- {r['workload'].split(',')[0]}, {r['instrument']}: {w['recorded_steps']} recorded steps × "
                         f"{w['tensors_per_recorded_step']:.0f} tensors; tensors table {w['sizes']['tensors']} B, "
                         f"steps table {w['sizes']['steps']} B, manifest {w['sizes']['manifest']} B, "
                         f"reference {w['sizes']['reference'] / MiB:.1f} MiB; close {r['close_s']:.2f} s")
    if extra:
        lines += ["## Details", "", *extra, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


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
    ap.add_argument("--quick", action="store_true", help="a short smoke run (pairs ÷ 10); writes no results")
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
    write = not (args.quick or args.no_write)
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    prime()
    results = []
    for work in WORKLOADS:
        for name, attach in INSTRUMENTS:
            if args.only and args.only.lower() not in f"{work.name} / {name}".lower():
                continue
            print(f"… {work.name} / {name}", flush=True)
            r = measure(work, name, attach, scale, args.max_seconds)
            results.append(r)
            print(f"  ratio {r['ratio']:.3f} (mean {r['ratio_mean']:.3f}), every={r['every']}, "
                  f"plain {r['step_ms_plain_median']:.2f} ms", flush=True)
    elapsed = time.perf_counter() - started
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "make bench  (.venv/bin/python benchmarks/overhead.py " + " ".join(sys.argv[1:]) + ")",
        "machine": machine(), "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": elapsed, "verdicts": verdicts(results),
        "method": "interleaved A (plain) / B (watched) steps in one process; B's time includes draining "
                  "freezeframe's writer thread after its step",
    }
    print()
    busy = meta["load_start"][0] > meta["machine"]["cores"] or meta["load_end"][0] > meta["machine"]["cores"]
    meta["machine_busy"] = busy
    print_tables(results)
    print("The watched model's time includes draining freezeframe's background writer after each of its "
          "steps (rec._writer.drain()), so its work cannot hide in the plain model's steps.")
    for v in meta["verdicts"]:
        print(v)
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
        write_markdown(ROOT / "docs" / "benchmarks.md", results, meta)
        print(f"wrote {out.relative_to(ROOT)} and docs/benchmarks.md")
    return 0


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
