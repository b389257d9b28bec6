"""`overhead.py --profile`: where a watched step's time goes (phase timers, then cProfile)."""

from __future__ import annotations

import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import freezeframe
from workloads import Workload, train_step


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

