"""The report-scaling benchmark's parent side: generating (or reusing) each case's run and measuring
it in fresh subprocesses of report_scaling.py (`--_generate`, `--_measure`, `--_browser`), plus the
real CLI timed as a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scaling_workload import GENERATOR_VERSION

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
SCRIPT = Path(__file__).resolve().parent / "report_scaling.py"   # the children run its hidden modes
MiB = 1024 * 1024
CLI_MAX_S = 30.0                # also time the real CLI when the library build took at most this long


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def log(msg: str) -> None:
    print(msg, flush=True)


def dir_bytes(path: Path) -> dict:
    """Apparent size (sum of file sizes) and allocated size (st_blocks) of a directory tree."""
    size = alloc = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            size += st.st_size
            alloc += st.st_blocks * 512
    return {"bytes": size, "allocated": alloc}


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
    rc, wall, rss = _wait4([sys.executable, str(SCRIPT), "--_generate", str(n), str(s),
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
    rc, proc_wall, proc_rss = _wait4([sys.executable, str(SCRIPT), "--_measure", str(run_dir),
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
        rc, wall, rss = _wait4([sys.executable, str(SCRIPT), "--_browser", str(html),
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


