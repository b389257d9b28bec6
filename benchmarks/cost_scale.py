"""What watching costs at scale, in memory, disk and time, against the plain run.

Cases (cost_workloads.py): a 50M-parameter stack of Linear layers frozen except a 33k-parameter
head, and a GPT-2 small built from `transformers.GPT2Config` with a LoRA adapter (peft, r=8 on
c_attn); 20 AdamW steps each. Every run is a fresh process (cost_measure.py), plain and watched
alternating; the table gives the peak RSS added by watching, the run directory's size and the
time ratio, each against the budgets "peak RSS added ≤ 96 MiB + 4 × the ever-trainable bytes" and
"run directory ≤ 8 MiB + 2 × those bytes". Then the content-hashing rate (what the recorder runs
at stage boundaries) per GB and what one pass costs on a 7B model in fp16.

Writes benchmarks/results/cost_scale.json and the block between `<!-- cost-scale:begin -->` and
`<!-- cost-scale:end -->` of docs/benchmarks.md (cost_tables.py).

Usage:  .venv/bin/python benchmarks/cost_scale.py             (`make bench`; ≈ 3 min on 2 quiet cores)
        .venv/bin/python benchmarks/cost_scale.py --quick     (1 repetition, 256 MiB hashed; ≈ 40 s)
        .venv/bin/python benchmarks/cost_scale.py --only stack --no-write
        PYTHONPATH=OTHER/src .venv/bin/python benchmarks/cost_scale.py --no-docs --out X.json
                                                              (another freezeframe; the JSON names its file)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # cost_workloads, cost_measure, cost_tables, machine
try:
    import freezeframe  # noqa: F401 - PYTHONPATH or the installed package wins over the checkout
except ImportError:
    sys.path.append(str(ROOT / "src"))

import cost_measure  # noqa: E402
import cost_tables  # noqa: E402
from cost_workloads import CASES  # noqa: E402
from machine import cpu_model  # noqa: E402

MiB = 1024 * 1024


def machine() -> dict:
    import torch

    import freezeframe

    out = {"cores": len(os.sched_getaffinity(0)), "cpu": cpu_model(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
           "platform": platform.platform(), "freezeframe": freezeframe.__version__,
           "freezeframe_file": freezeframe.__file__}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _child(argv: list[str]) -> int:
    if argv[0] == "hash":
        total, per, dtype, reps = argv[1:5]
        result = cost_measure.hash_child(int(total), int(per), dtype, int(reps))
    else:
        result = cost_measure.run_child(next(c for c in CASES if c.key == argv[0]), argv[1])
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_child":
        return _child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition per case, 256 MiB hashed")
    ap.add_argument("--reps", type=int, default=None, help="plain/watched repetitions per case (default 3; quick 1)")
    ap.add_argument("--only", default="", help="comma-separated case keys (stack, gpt2, hash)")
    ap.add_argument("--no-write", action="store_true", help="print only: no JSON, no docs")
    ap.add_argument("--no-docs", action="store_true", help="write the JSON but leave docs/benchmarks.md")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cost_scale.json")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    only = {k.strip() for k in args.only.split(",") if k.strip()}
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    cases = []
    for case in CASES:
        if only and case.key not in only:
            continue
        t = time.perf_counter()
        print(f"cost-scale: {case.label} ({case.key}), {reps} × plain + watched ...", file=sys.stderr, flush=True)
        r = cost_measure.measure_case(case.key, reps, progress=lambda s: print(s, file=sys.stderr, flush=True))
        cases.append(r)
        print(f"cost-scale: {case.label}: peak added {r['peak_added'] / MiB:+.0f} MiB "
              f"(budget {r['rss_budget'] / MiB:.1f}), run dir {r['disk_allocated'] / MiB:.1f} MiB "
              f"(budget {r['disk_budget'] / MiB:.1f}), time {r['time_ratio']:.2f}× [{time.perf_counter() - t:.0f} s]",
              file=sys.stderr, flush=True)
    hashing = None
    if not only or "hash" in only:
        total = 256 if args.quick else 1024
        print(f"cost-scale: content hashing over {total} MiB ...", file=sys.stderr, flush=True)
        hashing = cost_measure.measure_hashing(total, reps=2 if args.quick else 3)
        d = hashing["by_threads"][str(hashing["default_threads"])]
        print(f"cost-scale: hashing {d['mb_per_s']:.0f} MB/s, 7B fp16 boundary ≈ {hashing['boundary_7b_fp16_s']:.0f} s",
              file=sys.stderr, flush=True)
    load_end = [round(x, 2) for x in os.getloadavg()]
    m = machine()
    meta = {"date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(), "machine": m,
            "command": ".venv/bin/python benchmarks/cost_scale.py" + (" --quick" if args.quick else ""),
            "reps": reps, "quick": args.quick, "load_start": load_start, "load_end": load_end,
            "busy": max(load_start[0], load_end[0]) > m["cores"], "elapsed_s": time.perf_counter() - t0}
    cost_tables.print_tables(cases, hashing)
    if args.no_write:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "cases": cases, "hashing": hashing,
                                    "verdicts": cost_tables.verdicts(cases, hashing)}, indent=1) + "\n")
    print(f"cost-scale: wrote {args.out}", file=sys.stderr)
    if not args.no_docs:
        cost_tables.update_docs(args.docs, cost_tables.markdown_block(cases, hashing, meta))
        print(f"cost-scale: wrote {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
