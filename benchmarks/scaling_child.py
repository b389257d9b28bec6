"""The report-scaling benchmark's measurement, run in a fresh child process: what
`freezeframe report RUN -o FILE` does phase by phase (`measure`), its cProfile (`profile_build`),
and the time headless Chromium takes to draw the report (`browser_time`)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


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
    stored = run._stored
    # the row count from the Parquet footers: never loads the tensors table
    rows = stored.tensor_rows if hasattr(stored, "tensor_rows") else stored.tensors.num_rows
    return {
        "phases": phases,
        "build_wall": marks[-1][0] - marks[0][0], "build_cpu": marks[-1][1] - marks[0][1],
        "rss_start_mib": rss0 / 1024, "peak_rss_mib": maxrss / 1024,
        "html_bytes": html.stat().st_size,
        "steps": summary["run"]["steps"], "rows": rows,
        "stages": len(summary["stages"]), "modules": len(summary["modules"]),
        "heatmap": heatmap_shape(data.get("heatmap")),
        "findings": sorted({f["code"] for f in findings}),
        "check_errors": sum(f["severity"] == "error" for f in findings),
        "warnings": run.warnings,
    }


def heatmap_shape(hm) -> dict:
    """Rows, columns and whether the update heatmap was downsampled, read from whatever of its
    figure data is there (a missing part counts as 0 / False)."""
    hm = hm if isinstance(hm, dict) else {}
    values = hm.get("values")
    ndim = getattr(values, "ndim", None)
    if ndim is None and isinstance(values, list):
        ndim = 2 if values and isinstance(values[0], (list, tuple)) else 1
    if ndim == 2:
        columns = int(values.shape[1]) if hasattr(values, "shape") else len(values[0])
    else:
        x = hm.get("x")
        columns = len(x) if x is not None else 0
    rows = hm.get("rows")
    return {"rows": len(rows) if rows is not None else 0, "columns": columns, "downsampled": bool(hm.get("downsampled"))}


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

