"""Overhead of watching a training loop: step time, memory and bytes written, instrumented / plain.

Method (DESIGN.md, "Budgets"; overhead_measure.py): one process, two identical models stepped
alternately, A plain and B instrumented, B's time including draining the instrument's background
work. The headline ratio is the median of B's step time over the median of A's, taken over blocks
of `every` consecutive steps, with a bootstrap 95 % interval (`overhead_measure.ratio_stats`).

Instruments: freezeframe (default and every=1), the "floor" (instruments.py), and the peers
(peers.py): `wandb.watch(log="all")` offline and TensorBoard `add_histogram`, each at every step
and every 100 steps. Workloads (workloads.py): a ResNet-18, an MLP, a small transformer encoder.

Usage:  .venv/bin/python benchmarks/overhead.py            (`make bench`; ≈ 15 min on 2 cores)
        .venv/bin/python benchmarks/overhead.py --quick    (a smoke run, writes nothing)
        .venv/bin/python benchmarks/overhead.py --only wandb --no-write   (a subset, print only)
        .venv/bin/python benchmarks/overhead.py --only freezeframe,floor
                       (re-measure those rows; the other rows are kept from the last results file)
        .venv/bin/python benchmarks/overhead.py --profile  (where an instrumented step's time goes)
        .venv/bin/python benchmarks/overhead.py --from-results benchmarks/results/overhead-DATE.json
                       (rewrite docs/benchmarks.md from saved results)

Extending: a workload is a `Workload` in workloads.WORKLOADS; an instrument is an `Instrument` in
INSTRUMENTS below, whose `attach(model, optimizer, workdir)` returns an `instruments.Attached`
(raising `PeerUnavailable` skips its rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout even without `pip install -e`
sys.path.insert(1, str(Path(__file__).resolve().parent))  # this folder's modules

import freezeframe  # noqa: E402
import overhead_results  # noqa: E402
from instruments import Instrument, PeerUnavailable, attach_floor, attach_freezeframe  # noqa: E402
from machine import cpu_model  # noqa: E402
from overhead_measure import measure, prime  # noqa: E402
from overhead_tables import print_tables, write_markdown  # noqa: E402
from overhead_verdicts import verdicts  # noqa: E402
from peers import ABSENT, attach_tensorboard, attach_wandb  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

INSTRUMENTS: list[Instrument] = [
    Instrument("freezeframe default", attach_freezeframe(None), "freezeframe"),
    Instrument("freezeframe every=1", attach_freezeframe(1), "freezeframe"),
    Instrument("floor (every=1)", attach_floor, "floor"),
    Instrument("wandb.watch all, log_freq=1", attach_wandb(1), "wandb.watch", peer=True),
    Instrument("wandb.watch all, log_freq=100", attach_wandb(100), "wandb.watch", peer=True),
    Instrument("TensorBoard histograms, every step", attach_tensorboard(1), "TensorBoard", peer=True),
    Instrument("TensorBoard histograms, every 100", attach_tensorboard(100), "TensorBoard", peer=True),
]



# --------------------------------------------------------------------------- reporting
def machine() -> dict:
    cpu = cpu_model()
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "freezeframe": freezeframe.__version__, "platform": platform.platform()}




# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a short smoke run (pairs ÷ 10, --max-seconds at most 15); writes no results")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every workload's number of pairs")
    ap.add_argument("--only", default="",
                    help="substrings of 'workload / instrument' separated by commas without a space (any matches), e.g. "
                         "'freezeframe,floor'; with writing, the other rows are kept from the last results file")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="stop a case's timed loop after this long (at least 30 pairs), for loaded machines")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores this process may use)")
    ap.add_argument("--no-write", action="store_true", help="print only; write no JSON or docs")
    ap.add_argument("--from-results", metavar="JSON", default=None,
                    help="rewrite docs/benchmarks.md from a results file written earlier (measures nothing)")
    ap.add_argument("--profile", action="store_true", help="profile a watched ResNet-18 step instead")
    ap.add_argument("--profile-every", default="1", help="every= for --profile ('none' for the default)")
    ap.add_argument("--profile-model", default="resnet", help="substring of the workload to profile")
    ap.add_argument("--profile-steps", type=int, default=30)
    args = ap.parse_args(argv)

    if args.from_results:
        saved = overhead_results.load(Path(args.from_results))
        results = overhead_results.dated(saved["results"], str(saved["meta"]["date"])[:10])
        meta = {**saved["meta"], "verdicts": verdicts(results)}
        write_markdown(ROOT / "docs" / "benchmarks.md", results, meta, meta.get("absent", ABSENT))
        print(f"rewrote docs/benchmarks.md from {args.from_results}")
        return 0
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.profile:
        every = None if args.profile_every.lower() == "none" else int(args.profile_every)
        work = next(w for w in WORKLOADS if args.profile_model.lower() in w.name.lower())
        from overhead_profile import profile

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
            if not overhead_results.selects(args.only, work.name, inst.name):
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
    today = dt.date.today().isoformat()
    results = overhead_results.dated(results, today)
    results_dir = ROOT / "benchmarks" / "results"
    kept_from = overhead_results.latest(results_dir) if args.only and write else None
    if kept_from is not None:             # a partial re-measure: the other rows stay as last measured
        previous = overhead_results.load(kept_from)
        results, skipped = overhead_results.merge(previous, results, skipped, args.only)
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "make bench  (.venv/bin/python benchmarks/overhead.py " + " ".join(sys.argv[1:]) + ")",
        "machine": machine(), "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": elapsed, "verdicts": verdicts(results), "skipped": skipped, "absent": ABSENT,
        "peers": peer_versions(results),
        "remeasured": args.only or None,
        "kept_from": None if kept_from is None else kept_from.name,
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
        out = results_dir / f"overhead-{today}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=_json_default))
        write_markdown(ROOT / "docs" / "benchmarks.md", results, meta, ABSENT)
        print(f"wrote {out.relative_to(ROOT)} and docs/benchmarks.md"
              + (f" (rows not selected by --only kept from {kept_from.name})" if kept_from else ""))
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
