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
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))  # run from a checkout even without `pip install -e`

from machine import cpu_model  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)

MiB = 1024 * 1024
TENSORS = (50, 200, 1000)
STEPS = (1_000, 20_000, 100_000)
QUICK = ((50, 1_000), (200, 1_000), (50, 20_000))
BUDGET_CASE = (200, 20_000)     # DESIGN.md "Budgets": report ≤ 10 s, HTML ≤ 15 MB, interactive in Chromium ≤ 3 s
BUDGET_S, BUDGET_HTML_MB, BUDGET_BROWSER_S = 10.0, 15.0, 3.0
LONG_STEPS = 100_000            # runs this long are recorded every --every-long steps
CLI_MAX_S = 30.0                # also time the real CLI when the library build took at most this long
GENERATOR_VERSION = 1           # bump when the synthetic run changes (invalidates cached runs)
BEGIN, END = "<!-- report-scaling:begin -->", "<!-- report-scaling:end -->"
CHROMIUM = "/usr/bin/chromium"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def log(msg: str) -> None:
    print(msg, flush=True)


# =========================================================================== the synthetic run
def build_model(n_tensors: int):
    """A model of exactly `n_tensors` parameter tensors: body = blocks of (Linear(2, 2), LayerNorm(2))
    (4 tensors each), head = Linear(2, 2) layers (2 tensors; the last without bias when N is odd)."""
    from collections import OrderedDict

    from torch import nn

    blocks = (n_tensors - 1) // 4 if n_tensors >= 5 else 0
    rest = n_tensors - 4 * blocks
    body = nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)) for _ in range(blocks)])
    head = [nn.Linear(2, 2) for _ in range(rest // 2)] + ([nn.Linear(2, 2, bias=False)] if rest % 2 else [])
    model = nn.Sequential(OrderedDict(body=body, head=nn.Sequential(*head)))
    assert sum(1 for _ in model.parameters()) == n_tensors
    return model


def record_template(n_tensors: int, run_dir: Path, steps_per_stage: int = 2) -> None:
    """A real two-stage run recorded by `freezeframe.watch` (every=1): the source of the model map,
    the param groups, the stage hashes and the reference weights of the benchmark run."""
    import torch

    import freezeframe

    torch.manual_seed(n_tensors)
    torch.set_num_threads(1)
    model = build_model(n_tensors)
    body_linear = [p for m in model.body.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()]
    opt = torch.optim.SGD([{"params": list(model.body.parameters())}, {"params": list(model.head.parameters())}],
                          lr=1e-3, momentum=0.9, weight_decay=0.01)
    x = torch.randn(8, 2)
    with freezeframe.watch(model, opt, run_dir, every=1, mode="overwrite") as rec:
        for p in body_linear:
            p.requires_grad_(False)
        for name in ("head only", "unfrozen"):
            with rec.stage(name):
                for _ in range(steps_per_stage):
                    opt.zero_grad()
                    loss = model(x).square().mean()
                    loss.backward()
                    opt.step()
                    rec.log(loss=float(loss))
            for p in body_linear:
                p.requires_grad_(True)


def one_cycle(n: int, peak: float, *, div: float = 25.0, final_div: float = 1e4, warm: float = 0.25):
    """fastai's one-cycle shape over n steps: cosine from peak/div up to peak, then down to peak/final_div."""
    import numpy as np

    t = np.arange(n) / max(n - 1, 1)
    up = t < warm
    x = np.where(up, t / warm, (t - warm) / (1 - warm))
    cos = (1 - np.cos(np.pi * x)) / 2
    lo_up, lo_down = peak / div, peak / final_div
    return np.where(up, lo_up + (peak - lo_up) * cos, peak + (lo_down - peak) * cos)


def generate(n_tensors: int, n_steps: int, every: int, case_dir: Path) -> dict:
    """Write the benchmark run of `case_dir` (see the module docstring); returns its description."""
    import numpy as np

    from freezeframe.capture.columns import Columns
    from freezeframe.store import layout
    from freezeframe.store import writer as store

    t_start = time.perf_counter()
    template, run_dir = case_dir / "template", case_dir / "run"
    for d in (template, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    record_template(n_tensors, template)
    t_template = time.perf_counter() - t_start
    m = json.loads((template / layout.MANIFEST).read_text())
    P = len(m["model"]["params"])
    B = len(m["model"]["buffers"])
    assert P == n_tensors and B == 0, (P, B)
    assert [s["name"] for s in m["stages"]] == ["head only", "unfrozen"], [s["name"] for s in m["stages"]]
    ref = np.asarray([x if x is not None else 1.0 for x in m["ref_norms"]], dtype=np.float64)
    group_of = np.zeros(P, dtype=np.int64)
    for g in m["stages"][1]["groups"]:
        group_of[g["params"]] = g["index"]
    n_groups = 1 + int(group_of.max())

    rng = np.random.default_rng(n_tensors * 1_000_003 + n_steps)
    S0 = n_steps // 2
    bounds = [(0, S0), (S0, n_steps)]
    peaks = [np.full(n_groups, 1e-3), np.array([1e-4, 1e-3][:n_groups] + [1e-3] * max(0, n_groups - 2))]
    trainable = [np.asarray(sorted(s["trainable"]), dtype=np.int64) for s in m["stages"]]
    base = rng.uniform(-3.4, -2.4, P)                 # log10 update ratio at lr 1e-3
    final_drift = 10 ** rng.uniform(-2.5, -0.7, P)    # drift / ||W_ref|| at the end of training
    grad_scale = 10 ** rng.uniform(-2.0, 0.5, P)
    norm_trend = rng.uniform(-0.05, 0.05, P)
    starts = np.where(np.isin(np.arange(P), trainable[0]), 0, S0)   # when each tensor begins to train
    t0 = m["created"] if isinstance(m.get("created"), (int, float)) else time.time()
    dt_step = 0.05

    def progress(idx, step):
        return (step[:, None] + 1 - starts[idx][None, :]) / (n_steps - starts[idx][None, :])

    def drift_of(idx, step, noise=True):
        d = ref[idx] * final_drift[idx] * np.sqrt(np.clip(progress(idx, step), 0, None))
        return d * (1 + 0.03 * rng.standard_normal(d.shape)) if noise else d

    def pnorm_of(idx, step, noise=True):
        p = ref[idx] * (1 + norm_trend[idx] * np.clip(progress(idx, step), 0, None))
        return p * (1 + 1e-4 * rng.standard_normal(p.shape)) if noise else p

    Path(run_dir).mkdir(parents=True)
    path, existing = store.prepare_run_dir(run_dir, "new")
    assert existing is None
    shutil.copyfile(template / layout.REFERENCE, path / layout.REFERENCE)
    writer = store.RunWriter(path, 0)
    cols = Columns(P)
    chunk_rows = 2_000_000       # a flush every ~2 M tensor rows (the recorder flushes every few seconds)
    rows = pending = 0
    end_metrics = []
    last_p, last_d = ref.copy(), np.zeros(P)
    for k, (a, b) in enumerate(bounds):
        n = b - a
        lr = np.stack([one_cycle(n, pk) for pk in peaks[k]], axis=1)                        # n × groups
        mom = np.repeat((0.95 - 0.10 * (lr[:, -1:] / peaks[k][-1]))[:, :1], n_groups, axis=1)
        wd = [0.01] * n_groups
        idx = trainable[k]
        bits = np.zeros(P, dtype=np.uint8)
        bits[idx] = 1
        mask = np.packbits(bits).tobytes()
        rec_steps = np.arange(a, b, every, dtype=np.int64)   # the first step of a stage is always recorded
        rec_set = np.zeros(n, dtype=bool)
        rec_set[rec_steps - a] = True
        per_chunk = max(1, chunk_rows // max(len(idx), 1))
        loss = 2.0 * np.exp(-np.arange(a, b) / (0.3 * n_steps)) + 0.3 + 0.05 * rng.standard_normal(n)
        for c0 in range(0, len(rec_steps), per_chunk):
            cs = rec_steps[c0:c0 + per_chunk]
            pn = pnorm_of(idx, cs)
            ratio = 10 ** (base[idx][None, :] + np.log10(lr[cs - a][:, group_of[idx]] / 1e-3)
                           + 0.25 * rng.standard_normal((len(cs), len(idx))))
            un = (pn * ratio).astype(np.float32)
            gn = (grad_scale[idx][None, :] * 10 ** (0.3 * rng.standard_normal((len(cs), len(idx))))).astype(np.float32)
            dr = drift_of(idx, cs).astype(np.float32)
            pn = pn.astype(np.float32)
            idx32 = idx.astype(np.int32)
            # every applied step from this chunk's first recorded step up to the next chunk's
            s_lo = int(cs[0])
            s_hi = int(rec_steps[c0 + per_chunk]) if c0 + per_chunk < len(rec_steps) else b
            r = 0
            for s in range(s_lo, s_hi):
                i = s - a
                recorded = bool(rec_set[i])
                cols.add_step(s, k, 0, 0, t0 + (s + 1) * dt_step, recorded, lr[i].tolist(), mom[i].tolist(), wd, mask)
                if recorded:
                    cols.add_tensors(s, idx32, (gn[r], None), (un[r], None), (pn[r], None), (dr[r], None))
                    r += 1
                cols.add_scalar(s, "loss", float(loss[i]))
            rows += len(cs) * len(idx)
            writer.drain()  # one flush in flight while the next is generated
            if writer.error is not None:
                raise writer.error
            writer.submit(cols.take(), None)
            pending += 1
        last = np.array([b - 1])
        last_p[idx] = pnorm_of(idx, last, noise=False)[0]
        last_d[idx] = drift_of(idx, last, noise=False)[0]
        end_metrics.append({"param_norm": last_p.tolist(), "drift": last_d.tolist()})

    # the template's manifest, scaled to this run
    m["steps_total"] = n_steps
    m["complete"] = True
    m["created"] = t0
    sess = m["sessions"][0]
    sess.update(every=every, calibration=None, started=t0, ended=t0 + n_steps * dt_step + 1.0, first_step=0,
                argv=["benchmarks/report_scaling.py", f"synthetic {n_tensors}x{n_steps} every={every}"])
    for k, ((a, b), st) in enumerate(zip(bounds, m["stages"])):
        n = b - a
        grad_steps = np.zeros(P, dtype=np.int64)
        grad_steps[trainable[k]] = n
        st.update(first_step=a, last_step=b - 1, steps=n, forward_passes={"train": n, "eval": n // 10},
                  grad_steps=grad_steps.tolist())
        em = dict(st.get("end_metrics") or {})
        em.update(end_metrics[k])
        st["end_metrics"] = em
    writer.drain()
    writer.submit({}, json.dumps(m, allow_nan=False).encode())
    writer.close(compact=True)
    if writer.error is not None:
        raise writer.error
    shutil.rmtree(template, ignore_errors=True)
    return {"tensors": n_tensors, "steps": n_steps, "every": every, "rows": rows, "flushes": pending,
            "generate_s": time.perf_counter() - t_start, "template_s": t_template,
            "generator_version": GENERATOR_VERSION}


def dir_bytes(path: Path) -> dict:
    """Apparent size (sum of file sizes) and allocated size (st_blocks) of a directory tree."""
    size = alloc = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            size += st.st_size
            alloc += st.st_blocks * 512
    return {"bytes": size, "allocated": alloc}


# =========================================================================== measuring (child process)
def _status_kib(key: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def measure(run_dir: Path, html: Path) -> dict:
    """In a fresh process: what `freezeframe report RUN -o HTML` does, phase by phase."""
    import resource

    from freezeframe.analyse.figures import from_run   # the imports cmd_report makes before its clock starts
    from freezeframe.render.html import write_html
    from freezeframe.run import Run

    rss0 = _status_kib()
    marks = [(time.perf_counter(), time.process_time())]
    hwm = []

    def mark():
        marks.append((time.perf_counter(), time.process_time()))
        hwm.append(_status_kib("VmHWM") / 1024)   # the peak so far, after each phase

    run = Run.load(run_dir)                       # cli._load == freezeframe.load
    mark()
    summary = run.summary()                       # from_run's first call (cached on the Run)
    mark()
    data = from_run(run, depth=None)
    mark()
    write_html(run, html, data=data)
    mark()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    phases = {}
    for name, (w0, c0), (w1, c1), peak in zip(("load", "summary", "figures", "html"), marks, marks[1:], hwm):
        phases[name] = {"wall": w1 - w0, "cpu": c1 - c0, "peak_rss_mib_so_far": peak}
    findings = summary["findings"]
    hm = data["heatmap"]
    return {
        "phases": phases,
        "build_wall": marks[-1][0] - marks[0][0], "build_cpu": marks[-1][1] - marks[0][1],
        "rss_start_mib": rss0 / 1024, "peak_rss_mib": maxrss / 1024,
        "html_bytes": html.stat().st_size,
        "steps": summary["run"]["steps"], "rows": run._stored.tensors.num_rows,
        "stages": len(summary["stages"]), "modules": len(summary["modules"]),
        "heatmap": {"rows": len(hm["rows"]), "columns": int(hm["values"].shape[1]) if hm["values"].ndim == 2 else 0,
                    "downsampled": bool(hm["downsampled"])},
        "findings": sorted({f["code"] for f in findings}),
        "check_errors": sum(f["severity"] == "error" for f in findings),
        "warnings": run.warnings,
    }


def profile_build(run_dir: Path, html: Path, top: int = 30) -> None:
    """cProfile of one report build (load + figures + HTML), top entries by cumulative and own time."""
    import cProfile
    import pstats

    from freezeframe.analyse.figures import from_run
    from freezeframe.render.html import write_html
    from freezeframe.run import Run

    prof = cProfile.Profile()
    prof.enable()
    run = Run.load(run_dir)
    write_html(run, html, data=from_run(run))
    prof.disable()
    st = pstats.Stats(prof).strip_dirs()
    st.sort_stats("cumulative").print_stats(top)
    st.sort_stats("tottime").print_stats(top)


def browser_time(html: Path, timeout_s: float = 120.0) -> dict | None:
    """Seconds from navigation until headless Chromium has drawn every figure of the report."""
    if not os.path.exists(CHROMIUM):
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    text = html.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="ff-data">(.*?)</script>', text, re.S)
    n_figures = len(json.loads(m.group(1))["order"]) if m else 1
    drawn = ("(n) => document.querySelectorAll('.js-plotly-plot .main-svg').length >= n"
             " && new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            out = []
            for _ in range(2):  # the first load also warms Chromium's caches; both are reported
                page = b.new_page(viewport={"width": 1300, "height": 900})
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                t0 = time.perf_counter()
                page.goto(html.resolve().as_uri(), wait_until="load", timeout=timeout_s * 1000)
                loaded = time.perf_counter() - t0
                page.wait_for_function(drawn, arg=n_figures, timeout=timeout_s * 1000, polling=50)
                out.append({"load_event_s": loaded, "drawn_s": time.perf_counter() - t0, "errors": errors})
                page.close()
            # the floor: a page holding nothing but the same plotly.js
            import plotly.offline

            floor_page = html.with_name("plotly-only.html")
            floor_page.write_text("<!DOCTYPE html><html><head><meta charset=utf-8><script>"
                                  + plotly.offline.get_plotlyjs() + "</script></head><body></body></html>", encoding="utf-8")
            floor = []
            for _ in range(2):
                page = b.new_page(viewport={"width": 1300, "height": 900})
                t0 = time.perf_counter()
                page.goto(floor_page.resolve().as_uri(), wait_until="load", timeout=timeout_s * 1000)
                floor.append(time.perf_counter() - t0)
                page.close()
            return {"figures": n_figures, "first_s": out[0]["drawn_s"], "second_s": out[1]["drawn_s"],
                    "load_event_s": [o["load_event_s"] for o in out], "plotly_only_s": floor,
                    "errors": out[0]["errors"] + out[1]["errors"]}
        finally:
            b.close()


# =========================================================================== the parent
def parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d[\d_]*)x(\d[\d_]*)", part)
        if not m:
            raise SystemExit(f"--cases: expected TENSORSxSTEPS like 200x20000, got {part!r}")
        n, s = int(m.group(1).replace("_", "")), int(m.group(2).replace("_", ""))
        if n < 1 or s < 2:
            raise SystemExit(f"--cases: {part!r} needs at least 1 tensor and 2 steps")
        cases.append((n, s))
    return cases


def _wait4(cmd: list[str], log_path: Path) -> tuple[int, float, float]:
    """Run `cmd`; returns (exit status, wall s, peak RSS MiB of that process alone)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024


def ensure_run(n: int, s: int, every: int, cache: Path, regenerate: bool) -> dict:
    case_dir = cache / f"{n}x{s}-every{every}"
    meta_path = case_dir / "generated.json"
    from freezeframe import __version__

    if meta_path.exists() and not regenerate:
        meta = json.loads(meta_path.read_text())
        if meta.get("generator_version") == GENERATOR_VERSION and meta.get("freezeframe") == __version__:
            meta["cached"] = True
            return meta
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    out_json = case_dir / "generate-result.json"
    rc, wall, rss = _wait4([sys.executable, str(Path(__file__).resolve()), "--_generate", str(n), str(s),
                               str(every), str(case_dir), str(out_json)], case_dir / "generate.log")
    if rc != 0:
        raise RuntimeError(f"generating {n}x{s} failed (exit {rc}); see {case_dir / 'generate.log'}:\n"
                           + (case_dir / "generate.log").read_text()[-3000:])
    meta = json.loads(out_json.read_text())
    meta.update(freezeframe=__version__, generate_peak_rss_mib=rss, size=dir_bytes(case_dir / "run"))
    meta_path.write_text(json.dumps(meta, indent=1))
    meta["cached"] = False
    return meta


def run_case(n: int, s: int, every: int, cache: Path, *, regenerate: bool, cli: bool, browser: bool) -> dict:
    t0 = time.perf_counter()
    gen = ensure_run(n, s, every, cache, regenerate)
    case_dir = cache / f"{n}x{s}-every{every}"
    run_dir, html = case_dir / "run", case_dir / "report.html"
    log(f"  run: {gen['rows']:,} tensor rows, {gen['size']['bytes'] / MiB:.1f} MiB on disk "
        + ("(cached)" if gen["cached"] else f"(generated in {gen['generate_s']:.1f} s)"))
    out_json = case_dir / "measure-result.json"
    rc, proc_wall, proc_rss = _wait4([sys.executable, str(Path(__file__).resolve()), "--_measure", str(run_dir),
                                      str(html), str(out_json)], case_dir / "measure.log")
    if rc != 0:
        raise RuntimeError(f"measuring {n}x{s} failed (exit {rc}):\n" + (case_dir / "measure.log").read_text()[-3000:])
    res = json.loads(out_json.read_text())
    res.update(tensors=n, steps_nominal=s, every=every, generated=gen, process_wall=proc_wall,
               process_peak_rss_mib=proc_rss, run_size=dir_bytes(run_dir))
    if res["steps"] != s or res["rows"] != gen["rows"]:
        raise RuntimeError(f"{n}x{s}: the reader saw {res['steps']} steps / {res['rows']} rows, expected "
                           f"{s} / {gen['rows']}")
    if res["check_errors"]:
        log(f"  WARNING: the synthetic run has error findings: {res['findings']}")
    ph = res["phases"]
    log(f"  load {ph['load']['wall']:.2f} s, summary {ph['summary']['wall']:.2f} s, figures "
        f"{ph['figures']['wall']:.2f} s, html {ph['html']['wall']:.2f} s → build {res['build_wall']:.2f} s wall / "
        f"{res['build_cpu']:.2f} s CPU; peak RSS {res['peak_rss_mib']:.0f} MiB; HTML {res['html_bytes'] / MiB:.2f} MiB")
    if cli and res["build_wall"] <= CLI_MAX_S:
        cli_html = case_dir / "report-cli.html"
        rc, wall, rss = _wait4([sys.executable, "-m", "freezeframe.cli", "report", str(run_dir), "-o", str(cli_html)],
                               case_dir / "cli.log")
        text = (case_dir / "cli.log").read_text()
        m = re.search(r"report built in ([\d.]+) s", text)
        res["cli"] = {"exit": rc, "wall": wall, "peak_rss_mib": rss, "printed_s": float(m.group(1)) if m else None}
        log(f"  CLI `freezeframe report RUN -o FILE`: {wall:.2f} s wall (process), prints "
            f"{res['cli']['printed_s']} s, peak RSS {rss:.0f} MiB, exit {rc}")
    if browser:
        rc, wall, rss = _wait4([sys.executable, str(Path(__file__).resolve()), "--_browser", str(html),
                                str(case_dir / "browser-result.json")], case_dir / "browser.log")
        bres = case_dir / "browser-result.json"
        if rc == 0 and bres.exists():
            res["browser"] = json.loads(bres.read_text())
            if res["browser"]:
                b = res["browser"]
                log(f"  Chromium draws every figure in {b['first_s']:.2f} s (again: {b['second_s']:.2f} s); a page "
                    f"with only plotly.js loads in {b['plotly_only_s'][0]:.2f} s (again: {b['plotly_only_s'][1]:.2f} s)")
        else:
            log(f"  (Chromium timing failed: exit {rc}; see {case_dir / 'browser.log'})")
    res["case_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- output
HEADERS = ["tensors", "steps", "every", "recorded rows", "run MiB", "load s", "summary s",
           "report build s (wall / CPU)", "peak RSS MiB", "HTML MiB"]


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        ph = r["phases"]
        rows.append([f"{r['tensors']:,}", f"{r['steps']:,}", str(r["every"]), f"{r['rows']:,}",
                     f"{r['run_size']['bytes'] / MiB:.1f}", f"{ph['load']['wall']:.2f}", f"{ph['summary']['wall']:.2f}",
                     f"{r['build_wall']:.2f} / {r['build_cpu']:.2f}", f"{r['peak_rss_mib']:.0f}",
                     f"{r['html_bytes'] / MiB:.2f}"])
    return rows


def print_table(results: list[dict]) -> None:
    rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    log("  ".join(h.rjust(w) for h, w in zip(HEADERS, widths)))
    for r in rows:
        log("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def fit(results: list[dict]) -> dict | None:
    """Straight lines through the cases (least squares of the relative error): build s, load s, peak
    RSS MiB and run MiB against millions of rows; HTML bytes against steps; and the exponent k of
    build CPU s ∝ rows^k over the cases of ≥ 1 M rows."""
    import numpy as np

    if len({r["rows"] for r in results}) < 3 or max(r["rows"] for r in results) < 1_000_000:
        return None   # too few or too small cases for a line to mean anything
    x = np.array([r["rows"] for r in results], dtype=np.float64) / 1e6
    out = {}
    for key, y in (("build_s", [r["build_wall"] for r in results]),
                   ("build_cpu_s", [r["build_cpu"] for r in results]),
                   ("load_s", [r["phases"]["load"]["wall"] for r in results]),
                   ("rss_mib", [r["peak_rss_mib"] for r in results]),
                   ("run_mib", [r["run_size"]["bytes"] / MiB for r in results])):
        y = np.asarray(y, dtype=np.float64)
        b, a = np.polyfit(x, y, 1, w=1 / np.maximum(y, 1e-9))   # least relative error: small cases count too
        pred = a + b * x
        out[key] = {"per_million_rows": float(b), "fixed": float(a),
                    "max_rel_residual": float(np.max(np.abs(pred - y) / np.maximum(y, 1e-9)))}
    steps = np.array([r["steps"] for r in results], dtype=np.float64)
    if len(set(steps.tolist())) > 1:
        b, a = np.polyfit(steps, [r["html_bytes"] for r in results], 1)
        out["html_bytes"] = {"per_step": float(b), "fixed": float(a)}
    big = [(r["rows"], r["build_cpu"]) for r in results if r["rows"] >= 1_000_000]
    if len({rows for rows, _ in big}) >= 2:
        k, _ = np.polyfit(np.log([rows for rows, _ in big]), np.log([s for _, s in big]), 1)
        out["build_exponent"] = float(k)
        per = sorted((rows, s / (rows / 1e6)) for rows, s in big)
        out["s_per_million_rows_range"] = [[int(per[0][0]), per[0][1]], [int(per[-1][0]), per[-1][1]]]
    return out


def budget_verdict(results: list[dict]) -> str | None:
    r = next((r for r in results if (r["tensors"], r["steps"]) == BUDGET_CASE), None)
    if r is None:
        return None
    build = r["cli"]["printed_s"] if r.get("cli") and r["cli"].get("printed_s") is not None else r["build_wall"]
    html_mb, html_mib = r["html_bytes"] / 1e6, r["html_bytes"] / MiB
    parts = [f"build {r['build_wall']:.1f} s"
             + (f" (the CLI prints {r['cli']['printed_s']:.1f} s; {r['cli']['wall']:.1f} s for the whole command)"
                if r.get("cli") else "") + f" ≤ {BUDGET_S:.0f} s: {'met' if build <= BUDGET_S else 'NOT met'}",
             f"HTML {html_mb:.1f} MB ({html_mib:.2f} MiB) ≤ {BUDGET_HTML_MB:.0f} MB: {'met' if html_mb <= BUDGET_HTML_MB else 'NOT met'}"]
    b = r.get("browser")
    if b:
        best = min(b["first_s"], b["second_s"])
        parts.append(f"every figure drawn in headless Chromium in {best:.1f} s (first load {b['first_s']:.1f} s; "
                     f"a page with only plotly.js: {min(b['plotly_only_s']):.1f} s) ≤ {BUDGET_BROWSER_S:.0f} s: "
                     f"{'met' if best <= BUDGET_BROWSER_S else 'NOT met'}"
                     + (" (on this machine loading plotly.js alone already takes longer than the budget)"
                        if best > BUDGET_BROWSER_S and min(b["plotly_only_s"]) > BUDGET_BROWSER_S else "")
                     + (f" ({len(b['errors'])} page errors)" if b["errors"] else ""))
    else:
        parts.append("Chromium not measured (no /usr/bin/chromium or playwright)")
    return (f"Budget (DESIGN.md: `freezeframe report` on 200 tensors × 20,000 steps ≤ {BUDGET_S:.0f} s, HTML ≤ "
            f"{BUDGET_HTML_MB:.0f} MB, interactive in Chromium within {BUDGET_BROWSER_S:.0f} s; every={r['every']}, "
            f"{r['rows']:,} rows): " + "; ".join(parts))


def growth_sentence(results: list[dict], f: dict | None) -> str:
    if not f:
        return ""
    b, m, d = f["build_s"], f["rss_mib"], f["run_mib"]
    out = (f"Build time and memory grow with the stored rows (recorded steps × recorded tensors): a straight line "
           f"through these cases (least relative error) gives {b['per_million_rows']:.2f} s of report build per million "
           f"rows ({f['build_cpu_s']['per_million_rows']:.2f} s of CPU; {f['load_s']['per_million_rows']:.2f} s of the "
           f"wall time is loading the Parquet tables) on top of {b['fixed']:.1f} s (worst case "
           f"{100 * b['max_rel_residual']:.0f} % off the line), "
           f"{m['per_million_rows']:.0f} MiB of peak memory per million rows on top of {m['fixed']:.0f} MiB, and "
           f"{d['per_million_rows']:.1f} MiB on disk per million rows.")
    if "build_exponent" in f:
        (r0, s0), (r1, s1) = f["s_per_million_rows_range"]
        out += (f" Over the cases of a million rows or more the build's CPU time grows as rows^"
                f"{f['build_exponent']:.2f} ({s0:.2f} s per million rows at {r0 / 1e6:.1f} M rows, {s1:.2f} s at "
                f"{r1 / 1e6:.1f} M).")
    html = [r["html_bytes"] / MiB for r in results]
    if "html_bytes" in f:
        out += (f" The HTML ({min(html):.1f}–{max(html):.1f} MiB) does not grow with tensors (the heatmap bins steps "
                f"into at most 2,000 columns and rolls modules up to about 120 rows) but grows with steps, by about "
                f"{f['html_bytes']['per_step']:.0f} bytes per step (the learning-rate and loss figures keep one point "
                f"per step), on top of plotly.js (≈ 4.6 MiB).")
    return out


def detail_lines(results: list[dict]) -> list[str]:
    out = []
    big = max(results, key=lambda r: r["rows"])
    ph = big["phases"]
    out.append(f"Where the largest case ({big['tensors']:,} × {big['steps']:,}, {big['rows'] / 1e6:.1f} M rows) spends "
               f"its time: load {ph['load']['wall']:.1f} s, summary {ph['summary']['wall']:.1f} s, figure data "
               f"{ph['figures']['wall']:.1f} s, HTML {ph['html']['wall']:.1f} s; peak RSS {ph['load']['peak_rss_mib_so_far']:.0f} "
               f"MiB after loading (the Arrow tables), {ph['summary']['peak_rss_mib_so_far']:.0f} MiB after the summary.")
    cli = [r for r in results if r.get("cli")]
    if cli:
        out.append("The real command, `freezeframe report RUN -o FILE` run as a subprocess (cases whose build took "
                   f"≤ {CLI_MAX_S:.0f} s), whole process wall time (and the build time it prints): " + "; ".join(
                       f"{r['tensors']:,}×{r['steps']:,} {r['cli']['wall']:.1f} s ({r['cli']['printed_s']} s)"
                       for r in cli) + ".")
    return out


def markdown_block(results: list[dict], meta: dict) -> str:
    rows = table_rows(results)
    lines = [BEGIN, "## Report build time and size", "",
             f"Generated by `{meta['command']}`; regenerate with the same command "
             f"(it caches the generated runs under a temporary folder; `--keep DIR` keeps them elsewhere).", "",
             f"- Date: {meta['date']}",
             f"- Machine: {meta['machine']['cores']} cores ({meta['machine']['cpu']}), {meta['machine']['memory_gib']:.0f} GiB "
             f"memory, Python {meta['machine']['python']}, pyarrow {meta['machine']['pyarrow']}, "
             f"numpy {meta['machine']['numpy']}, plotly {meta['machine']['plotly']}; freezeframe {meta['machine']['freezeframe']}",
             f"- Total benchmark time: {meta['elapsed_s']:.0f} s"
             + (f", generating the runs ({meta['generate_s']:.0f} s) included" if meta["generated_now"] == len(results) else
                f"; the runs were cached by an earlier invocation (generating all {len(results)} takes "
                f"{meta['generate_s']:.0f} s more)" if meta["generated_now"] == 0 else
                f"; {meta['generated_now']} of the {len(results)} runs generated in it, the others cached (generating "
                f"all takes {meta['generate_s']:.0f} s)"), "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS),
             *("| " + " | ".join(r) + " |" for r in rows), ""]
    verdict = budget_verdict(results)
    if verdict:
        lines += [f"- {verdict}"]
    sentence = growth_sentence(results, meta.get("fit"))
    if sentence:
        lines += [f"- {sentence}"]
    lines += [f"- {line}" for line in detail_lines(results)]
    lines += [
        "",
        "How it is measured: each case is a synthetic two-stage fine-tuning run (stage 0 \"head only\": the body's "
        "Linear layers frozen, its LayerNorms and the head train; stage 1 \"unfrozen\": everything trains; boundary at "
        "half the steps; a loss logged every step) whose model map, groups, hashes and reference weights come from a "
        "short run recorded by `freezeframe.watch`, and whose tables are written by the store's own row buffers and "
        "background writer (chunks, then compaction), scaled to the case's steps with plausible metric values. "
        "**every**: the recording period (every=1: every step recorded, the worst case for the report). "
        "**recorded rows**: rows of the `tensors` table (a recorded step has a row per tensor that trains in its "
        "stage, so about 3/4 of tensors × steps). **run MiB**: the run directory's files (Parquet tables, manifest, "
        "reference weights). Each case is measured in a fresh process doing what `freezeframe report RUN -o FILE` "
        "does: **load s** `freezeframe.load(RUN)`; **summary s** `Run.summary()` (the JSON of `freezeframe summary`); "
        "**report build s** load + summary + figure data + writing the HTML, wall clock and CPU time of the process "
        "(all threads); **peak RSS MiB** that process's high-water mark (ru_maxrss; about "
        f"{meta.get('rss_floor_mib', 0):.0f} MiB of it is the interpreter and imports). The budget line's Chromium "
        "time runs from navigation until every figure is drawn (two animation frames after the last plot exists), in "
        "Debian's headless Chromium driven by Playwright, best of two loads. "
        f"Load average at start {meta['load_start']}, at end {meta['load_end']} on {meta['machine']['cores']} cores"
        + (" (busy: wall times are inflated, CPU times less so)." if meta.get("busy") else "."),
        END]
    return "\n".join(lines)


def update_docs(path: Path, block: str) -> None:
    from cost_tables import replace_block  # benchmarks/ is on sys.path when a script of it runs

    replace_block(path, block, BEGIN, END)


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
