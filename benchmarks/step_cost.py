"""The recorder's cost per training step in µs against the number of parameter tensors.

For 8, 100, 400 and 2,000 tensors (an `nn.Sequential` of Linear(4, 4) layers, 2 tensors each, on a
batch of 2 rows, so that the training step itself is short and the recorder's cost shows), two
kinds of watched step: **unrecorded** (`every` so large that only the stage's first step records:
what every step of a sampled run pays) and **recorded** (every=1), and, for the why, a model that
is not watched but carries the hooks torch calls on an unrecorded step with empty bodies
(**empty hooks**: torch's own cost of calling them). Method as overhead.py's
(overhead_measure.py): two identical models (same weights, same data, same optimizer), A plain and
B watched, stepped alternately in one process; B's time includes draining the recorder's writer
after its step. The figure is the median of the per-pair differences B − A with a bootstrap 95 %
interval (2,000 resamples). Budget for the unrecorded step: 15 µs + 0.05 µs × tensors (DESIGN.md,
"Budgets").

Usage:  .venv/bin/python benchmarks/step_cost.py              (`make bench`; ≈ 3 min)
        .venv/bin/python benchmarks/step_cost.py --quick      (≈ 40 s, writes nothing)
        .venv/bin/python benchmarks/step_cost.py --tensors 8,100 --no-write
        .venv/bin/python benchmarks/step_cost.py --from-results benchmarks/results/step-cost-DATE.json

Writes (unless --quick or --no-write) `benchmarks/results/step-cost-<date>.json` and the block
between `<!-- step-cost:begin -->` and `<!-- step-cost:end -->` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout even without `pip install -e`
sys.path.insert(1, str(Path(__file__).resolve().parent))  # this folder's modules

import freezeframe  # noqa: E402
from machine import cpu_model  # noqa: E402
from probes import run_dir_bytes  # noqa: E402
from step_cost_tables import EMPTY_HOOKS, MODES, print_table, write_docs  # noqa: E402

TENSORS = (8, 100, 400, 2_000)
BATCH = 2
WARMUP = 20            # pairs before measuring (the stage's first, recorded, step is among them)


def make_model(n_tensors: int) -> nn.Module:
    """`n_tensors` parameter tensors: n/2 Linear(4, 4) layers in a row."""
    if n_tensors < 2 or n_tensors % 2:
        raise SystemExit(f"--tensors: an even count of at least 2 (Linear layers have 2 tensors), got {n_tensors}")
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_tensors // 2)])


def empty_hooks(model: nn.Module, opt: torch.optim.Optimizer) -> list:
    """The hooks torch calls on each of the recorder's unrecorded steps (for a model without
    buffers, once the first step has been applied), each a Python function that does nothing:
    the optimizer's step pre- and post-hook, the model's forward pre-hook and one
    post-accumulate-grad hook per trainable tensor. What any hook-based recorder pays before it
    does any work."""
    handles = [opt.register_step_pre_hook(_nothing), opt.register_step_post_hook(_nothing),
               model.register_forward_pre_hook(_nothing)]
    return handles + [p.register_post_accumulate_grad_hook(_nothing) for p in model.parameters() if p.requires_grad]


def _nothing(*args) -> None:
    return None


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def bootstrap_median(d: np.ndarray, rng: np.random.Generator, n: int = 2000) -> list[float]:
    boot = np.median(d[rng.integers(0, len(d), size=(n, len(d)))], axis=1)
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def measure(n_tensors: int, mode: str, max_seconds: float, min_pairs: int = 50, max_pairs: int = 20_000,
            seed: int = 0) -> dict:
    """One case: `n_tensors` tensors, `mode` 'unrecorded', 'recorded' (step_cost_tables.MODES) or
    'empty hooks' (B not watched, carrying `empty_hooks` instead)."""
    t_case = time.perf_counter()
    every = MODES.get(mode)
    torch.manual_seed(seed)
    model_a = make_model(n_tensors)
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (model_a, model_b))
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(BATCH, 4, generator=g) for _ in range(8)]
    for x in batches[:3]:                                  # grads and optimizer state allocated
        train_step(model_a, opt_a, x), train_step(model_b, opt_b, x)
    workdir = Path(tempfile.mkdtemp(prefix="ff-stepcost-"))
    try:
        if every is None:
            handles, rec = empty_hooks(model_b, opt_b), None
            drain = _nothing
        else:
            rec = freezeframe.watch(model_b, opt_b, workdir / "run", every=every, mode="new")
            drain = rec._writer.drain
        k = 0

        def pair() -> tuple[float, float]:
            nonlocal k
            x = batches[k % len(batches)]
            k += 1
            t = time.perf_counter()
            train_step(model_a, opt_a, x)
            ta = time.perf_counter() - t
            t = time.perf_counter()
            train_step(model_b, opt_b, x)
            drain()                                        # the writer's work, counted as B's
            return ta, time.perf_counter() - t

        for _ in range(WARMUP):
            pair()
        gc.collect()
        rows, t_loop = [], time.perf_counter()
        while len(rows) < max_pairs and (len(rows) < min_pairs or time.perf_counter() - t_loop < max_seconds):
            rows.append(pair())
        if rec is None:
            for h in handles:
                h.remove()
            written = {"recorded_steps": 0}
        else:
            rec.close()
            written = run_dir_bytes(workdir / "run")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    a, b = np.array(rows).T
    d = b - a
    return {
        "tensors": n_tensors, "mode": mode, "every": every, "pairs": len(rows), "warmup_pairs": WARMUP,
        "plain_us_median": 1e6 * float(np.median(a)), "watched_us_median": 1e6 * float(np.median(b)),
        "extra_us_median": 1e6 * float(np.median(d)),
        "extra_us_ci95": [1e6 * x for x in bootstrap_median(d, np.random.default_rng(seed))],
        "extra_us_mean": 1e6 * float(d.mean()),
        "watched_steps": WARMUP + len(rows), "recorded_steps": written["recorded_steps"],
        "case_s": time.perf_counter() - t_case,
    }


def machine() -> dict:
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "freezeframe": freezeframe.__version__, "platform": platform.platform()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (3 s per case); writes nothing")
    ap.add_argument("--tensors", default=",".join(map(str, TENSORS)), help="comma-separated tensor counts")
    ap.add_argument("--max-seconds", type=float, default=12.0, help="timed loop per case (at least 50 pairs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: tensors this small gain nothing from more, and idle OpenMP "
                         "threads spinning on a shared machine add noise)")
    ap.add_argument("--no-write", action="store_true", help="print only; write no JSON or docs")
    ap.add_argument("--from-results", metavar="JSON", default=None,
                    help="rewrite the docs/benchmarks.md block from a results file written earlier (measures nothing)")
    args = ap.parse_args(argv)
    if args.from_results:
        saved = json.loads(Path(args.from_results).read_text())
        write_docs(ROOT / "docs" / "benchmarks.md", saved["cases"], saved["meta"])
        print(f"rewrote the step-cost block of docs/benchmarks.md from {args.from_results}")
        return 0

    torch.set_num_threads(args.threads)
    counts = [int(t) for t in args.tensors.split(",") if t.strip()]
    max_seconds = min(args.max_seconds, 3.0) if args.quick else args.max_seconds
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    measure(8, "recorded", 0.2, min_pairs=5)               # one-time costs (imports, first Parquet file)
    results = []
    for n in counts:
        for mode in [*MODES, EMPTY_HOOKS]:
            print(f"… {n:,} tensors, {mode} step" + (f" (every={MODES[mode]})" if mode in MODES else ""), flush=True)
            r = measure(n, mode, max_seconds)
            results.append(r)
            print(f"  +{r['extra_us_median']:.1f} µs (95 % CI {r['extra_us_ci95'][0]:.1f}–{r['extra_us_ci95'][1]:.1f}) "
                  f"on a plain step of {r['plain_us_median']:.0f} µs; {r['pairs']} pairs, "
                  f"{r['recorded_steps']} of {r['watched_steps']} watched steps recorded; {r['case_s']:.0f} s", flush=True)
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python benchmarks/step_cost.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(), "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": time.perf_counter() - started, "batch": BATCH, "warmup": WARMUP,
    }
    print()
    print_table(results, meta)
    if not (args.quick or args.no_write):
        out = ROOT / "benchmarks" / "results" / f"step-cost-{dt.date.today().isoformat()}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "cases": results}, indent=1))
        write_docs(ROOT / "docs" / "benchmarks.md", results, meta)
        print(f"wrote {out.relative_to(ROOT)} and docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
