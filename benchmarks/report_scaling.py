"""How building the report grows with the run: tensors × steps → load time, build time, memory, HTML size.

For each case (tensors × steps) a synthetic two-stage fine-tuning run is generated once and cached,
then measured in a fresh subprocess that does exactly what `freezeframe report RUN -o FILE` does
(`cli.cmd_report`): `freezeframe.load(RUN)`, `analyse.figures.from_run(run)` (which builds
`Run.summary()` first), `render.html.write_html(run, FILE, data=...)`. Reported per case: the wall
and CPU seconds of each phase (load, summary, figures, HTML), the child's peak RSS (ru_maxrss), the
HTML size, the run directory's size; for the cheaper cases also the real CLI timed as a subprocess,
and for the budget case (200 tensors × 20,000 steps, DESIGN.md "Budgets") the time headless
Chromium takes to draw every figure of the report.

How a synthetic run is made (faithful to the store, fast enough for 100,000 steps):

1. A template run is *recorded* by the real recorder (`freezeframe.watch`, every=1) on a model of
   exactly N parameter tensors — a `body` of blocks (Linear(2, 2), LayerNorm(2)) and a `head` of
   Linear layers, SGD with two param groups (body, head) — for 2 steps of each of two explicit
   stages: "head only" (the body's Linear layers frozen, its LayerNorms and the head train, as
   fastai's `freeze()` leaves them) and "unfrozen" (everything trains).
2. The benchmark run is then written with the store's own pieces: `store.writer.prepare_run_dir`,
   `capture.columns.Columns` (the recorder's row buffers) and `store.writer.RunWriter` (the
   background writer: one chunk per flush, compacted into `s000-compact.parquet` at close), with
   the template's manifest (model map, groups, hashes, reference weights) scaled to S steps: the
   stage boundary at S/2, one-cycle learning rates per group and stage, momentum, weight decay,
   a loss logged at every step, gradient bitmasks, and per tensor noisy, plausible metrics (update
   ratio ~1e-3 following the lr schedule, drift growing as √t, grad norms log-normal). A tensor has
   a row on a recorded step when it trains in that stage (as the recorder writes them), so the
   `tensors` table holds recorded steps × (trainable tensors) rows: about 3/4 of tensors × steps.
   Recording every step with the real recorder would take ~80–160 ms a step for 1,000
   tensors, i.e. hours for 100,000 steps; generating a run this way takes seconds to minutes.
3. The measuring child checks what it loaded: step count, row count, and that `Run.findings()` (what
   `freezeframe check` prints) holds no error.

Recording density: every step recorded (every=1, the densest a user can ask for and the worst case
for the report; the default calibration would record a model of tiny tensors far more sparsely).
The largest case, 1,000 tensors × 100,000 steps, then holds 75 M rows, takes about 2 minutes and
13 GiB of memory to report; on a smaller machine `--every-long N` records runs of 100,000+ steps
every N-th step instead (the first step of every stage always, as the recorder does). The table
shows `every` and the row count of each case.

Usage:
    .venv/bin/python benchmarks/report_scaling.py                # all 9 cases; writes results + docs
                                                                 # (≈ 9 min on 2 busy cores, ≈ 5 min once the runs are cached)
    .venv/bin/python benchmarks/report_scaling.py --quick        # the small cases only, writes nothing
    .venv/bin/python benchmarks/report_scaling.py --cases 50x1000,200x20000 --no-write
    .venv/bin/python benchmarks/report_scaling.py --keep /data/ff-bench   # keep generated runs there
    .venv/bin/python benchmarks/report_scaling.py --profile 200x20000     # cProfile of one report build
    .venv/bin/python benchmarks/report_scaling.py --from-results benchmarks/results/report-scaling-DATE.json
                                                  # rewrite the docs block from saved results

Writes (unless --no-write or --quick) `benchmarks/results/report-scaling-<date>.json` and the block
between `<!-- report-scaling:begin -->` and `<!-- report-scaling:end -->` of `docs/benchmarks.md`
(appended when absent; the rest of that file is left as it is).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))  # run from a checkout even without `pip install -e`

# benchmarks/, this script's folder, is on sys.path; none of these imports numpy or freezeframe at
# import time (the measuring child's starting RSS stays the interpreter's)
from machine import cpu_model  # noqa: E402
from scaling_child import browser_time, measure, profile_build  # noqa: E402
from scaling_runner import _env, ensure_run, log, parse_cases, run_case  # noqa: E402
from scaling_tables import (BUDGET_CASE, budget_verdict, fit, growth_sentence, markdown_block,  # noqa: E402
                            print_table, update_docs)
from scaling_workload import generate  # noqa: E402

TENSORS = (50, 200, 1000)
STEPS = (1_000, 20_000, 100_000)
QUICK = ((50, 1_000), (200, 1_000), (50, 20_000))
LONG_STEPS = 100_000            # runs this long are recorded every --every-long steps


def machine() -> dict:
    import numpy
    import plotly
    import pyarrow

    from freezeframe import __version__

    cpu = cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu, "memory_gib": mem, "python": platform.python_version(),
            "pyarrow": pyarrow.__version__, "numpy": numpy.__version__, "plotly": plotly.__version__,
            "freezeframe": __version__, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_generate":
        n, s, every, case_dir, out = argv[1:6]
        res = generate(int(n), int(s), int(every), Path(case_dir))
        Path(out).write_text(json.dumps(res))
        return 0
    if argv and argv[0] == "--_measure":
        run_dir, html, out = argv[1:4]
        Path(out).write_text(json.dumps(measure(Path(run_dir), Path(html))))
        return 0
    if argv and argv[0] == "--_browser":
        html, out = argv[1:3]
        Path(out).write_text(json.dumps(browser_time(Path(html))))
        return 0

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the small cases (" +
                    ", ".join(f"{n}x{s}" for n, s in QUICK) + "); writes nothing")
    ap.add_argument("--cases", default="", help="comma-separated TENSORSxSTEPS, e.g. 50x1000,200x20000")
    ap.add_argument("--no-write", action="store_true", help="print only; write no JSON or docs")
    ap.add_argument("--keep", metavar="DIR", default=None,
                    help="generate and keep the runs in DIR (default: a cache folder under the temp dir)")
    ap.add_argument("--regenerate", action="store_true", help="regenerate cached runs")
    ap.add_argument("--every-long", type=int, default=1, help=f"recording period of runs of {LONG_STEPS:,}+ steps")
    ap.add_argument("--no-cli", action="store_true", help="do not also time the real CLI as a subprocess")
    ap.add_argument("--no-browser", action="store_true", help="do not time Chromium drawing the budget case's report")
    ap.add_argument("--from-results", metavar="JSON", default=None,
                    help="rewrite the docs/benchmarks.md block from a results JSON written earlier (measures nothing)")
    ap.add_argument("--profile", metavar="CASE", default=None, help="cProfile one case's report build (e.g. 200x20000)")
    args = ap.parse_args(argv)

    if args.from_results:
        saved = json.loads(Path(args.from_results).read_text())
        saved["meta"]["fit"] = fit(saved["cases"])
        update_docs(ROOT / "docs" / "benchmarks.md", markdown_block(saved["cases"], saved["meta"]))
        log(f"rewrote the report-scaling block of docs/benchmarks.md from {args.from_results}")
        return 0
    if args.cases:
        cases = parse_cases(args.cases)
    elif args.quick:
        cases = list(QUICK)
    else:
        cases = [(n, s) for s in STEPS for n in TENSORS]
    write = not (args.no_write or args.quick)
    cache = Path(args.keep) if args.keep else Path(tempfile.gettempdir()) / "freezeframe-report-scaling"
    cache.mkdir(parents=True, exist_ok=True)

    def every_of(s: int) -> int:
        return args.every_long if s >= LONG_STEPS else 1

    if args.profile:
        (n, s), = parse_cases(args.profile)
        ensure_run(n, s, every_of(s), cache, args.regenerate)
        case_dir = cache / f"{n}x{s}-every{every_of(s)}"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_profile", str(case_dir / "run"),
                        str(case_dir / "report-profile.html")], env=_env(), check=True)
        return 0

    t_all = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    log(f"report scaling: {len(cases)} cases, runs cached in {cache}")
    results = []
    for i, (n, s) in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {n:,} tensors × {s:,} steps (every={every_of(s)})")
        results.append(run_case(n, s, every_of(s), cache, regenerate=args.regenerate, cli=not args.no_cli,
                                browser=not args.no_browser and (n, s) == BUDGET_CASE))
    elapsed = time.perf_counter() - t_all
    load_end = [round(x, 2) for x in os.getloadavg()]
    cores = len(os.sched_getaffinity(0))
    busy = max(load_start[0], load_end[0], load_end[1]) > cores
    log("")
    print_table(results)
    f = fit(results)
    verdict = budget_verdict(results)
    if verdict:
        log(verdict)
    sentence = growth_sentence(results, f)
    if sentence:
        log(sentence)
    log(f"total {elapsed:.0f} s; load average at start {load_start}, at end {load_end} on {cores} cores"
        + (" (busy machine: wall times are inflated)" if busy else ""))
    if not write:
        return 0
    now = dt.datetime.now(dt.timezone.utc)
    command = ".venv/bin/python benchmarks/report_scaling.py" + ("" if not args.cases else f" --cases {args.cases}")
    meta = {"date": now.isoformat(timespec="seconds"), "command": command, "machine": machine(),
            "elapsed_s": elapsed, "fit": f, "verdict": verdict, "load_start": load_start, "load_end": load_end,
            "busy": busy,
            "generate_s": sum(r["generated"]["generate_s"] for r in results),
            "generated_now": sum(not r["generated"]["cached"] for r in results),
            "rss_floor_mib": min(r["rss_start_mib"] for r in results)}
    out = ROOT / "benchmarks" / "results" / f"report-scaling-{now.date().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "cases": results}, indent=1))
    update_docs(ROOT / "docs" / "benchmarks.md", markdown_block(results, meta))
    log(f"wrote {out.relative_to(ROOT)} and docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_profile":
        profile_build(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
