"""Tables and docs/benchmarks.md for the overhead benchmark (benchmarks/overhead.py; its verdict lines
are in overhead_verdicts.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

MiB = 1024 * 1024

# Other scripts own these blocks of docs/benchmarks.md (benchmarks/report_scaling.py,
# benchmarks/cost_scale.py, benchmarks/step_cost.py): kept verbatim.
KEEP = [("<!-- step-cost:begin -->", "<!-- step-cost:end -->"),
        ("<!-- report-scaling:begin -->", "<!-- report-scaling:end -->"),
        ("<!-- cost-scale:begin -->", "<!-- cost-scale:end -->")]

# Columns of the side-by-side table: instrument family → how its rows are named.
FAMILIES = ["freezeframe", "floor", "wandb.watch", "TensorBoard"]


def _model(r: dict) -> str:
    return r["workload"].split(",")[0]


def _rng(x: list) -> str:
    return f"{x[0]:.3f}–{x[1]:.3f}"


def _ratio_cell(r: dict) -> str:
    kind = r["ratio_kind"]
    suffix = ""
    if kind.startswith("schedule"):
        suffix = f" (sched., {r['recorded_in_loop']} rec.)"
    elif not kind.startswith("median"):
        suffix = " (mean)"
        if r.get("recorded_in_loop") == 0 and r["every"] != 1:
            suffix = " (mean, no recorded step)"
    return f"{r['ratio']:.3f}{suffix}"


def _models(results: list[dict]) -> list[str]:
    seen = []
    for r in results:
        if _model(r) not in seen:
            seen.append(_model(r))
    return seen


# --------------------------------------------------------------------------- per-case tables
TIME_HEADERS = ["model", "instrument", "every", "pairs", "plain ms", "ratio", "95 % CI", "median/step", "mean",
                "IQR/block", "CPU ratio", "measured"]
MEMORY_HEADERS = ["model", "instrument", "RSS +MiB", "heap +MiB", "peak +MiB", "analytic MiB", "B/row (log)",
                  "rows", "close s"]


def time_rows(results: list[dict]) -> list[list[str]]:
    return [[_model(r), r["instrument"], str(r["every"]), str(r["pairs"]), f"{r['step_ms_plain_median']:.2f}",
             _ratio_cell(r), _rng(r["ci95"]), f"{r['ratio_median_steps']:.3f}", f"{r['ratio_mean']:.3f}",
             _rng(r["per_block_iqr"]), f"{r['cpu_ratio']:.3f}", r.get("measured") or "—"] for r in results]


def memory_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        m, w = r["memory"], r["written"]
        opt = lambda v: "—" if v is None else f"{v:+.1f}"  # noqa: E731
        rss = opt(m["rss_growth_mib"])
        if m.get("helper_rss_mib") is not None:
            rss += f" (+{m['helper_rss_mib']:.0f} svc)"
        analytic = "—"
        if m.get("analytic_reference_mib") is not None:
            analytic = f"{m['analytic_reference_mib']:.1f} + {m['analytic_temporary_mib']:.1f}"
        rows.append([
            _model(r), r["instrument"], rss, opt(m["heap_growth_mib"]), opt(m["step_peak_extra_mib"]), analytic,
            "—" if not w or w["bytes_per_tensor_step"] is None else
            f"{w['bytes_per_tensor_step']:.1f} ({w['log_bytes_per_tensor_step']:.1f})",
            "—" if not w else f"{w['recorded_steps']}×{w['tensors_per_recorded_step']:.0f}",
            f"{r['close_s']:.2f}",
        ])
    return rows


# --------------------------------------------------------------------------- side by side
SIDE_HEADERS = ["model", "records", *FAMILIES]


def _cadence(r: dict) -> str:
    return "every step" if r["every"] == 1 else "sparse"


def side_rows(results: list[dict]) -> list[list[str]]:
    """Per model and cadence (every step / sparse), one cell per instrument family: the headline
    ratio, the recording period when sparse, and bytes per tensor per recorded step."""
    rows = []
    for model in _models(results):
        for cadence in ("every step", "sparse"):
            cells = {}
            for r in results:
                if _model(r) != model or _cadence(r) != cadence:
                    continue
                cell = f"{r['ratio']:.3f}×"
                if cadence == "sparse":
                    cell += f" (every {r['every']})"
                w = r["written"]
                if w and w.get("bytes_per_tensor_step") is not None:
                    cell += f", {_bytes(w['bytes_per_tensor_step'])}/row"
                cells.setdefault(r["family"], []).append(cell)
            if cells:
                rows.append([model, cadence, *["; ".join(cells.get(f, ["—"])) for f in FAMILIES]])
    return rows


def _bytes(n: float) -> str:
    if n >= 10 * 1024:
        return f"{n / 1024:.0f} KiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n:.0f} B"


# --------------------------------------------------------------------------- console
def print_tables(results: list[dict]) -> None:
    tables = [("Overhead per training step: watched / plain, interleaved, writer drained", TIME_HEADERS,
               time_rows(results)),
              ("Memory and bytes written", MEMORY_HEADERS, memory_rows(results)),
              ("Side by side: ratio per instrument at the same cadence", SIDE_HEADERS, side_rows(results))]
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
            t.add_column(h, justify="left" if h in ("model", "instrument", "records", *FAMILIES) else "right",
                         no_wrap=h not in FAMILIES)
        for row in rows:
            t.add_row(*row)
        console.print(t)


# --------------------------------------------------------------------------- markdown
def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *["| " + " | ".join(row) + " |" for row in rows]]


NOTES = """\
- **ratio**: median of the watched model's time over the median of the plain model's, over blocks of
  `every` consecutive steps (each block holds one recorded step; for every=1 a block is one step).
  **95 % CI**: paired bootstrap of that ratio (2,000 resamples). **median/step**: the same with single
  steps (hides the recorded steps when every > 1). **mean**: ratio of mean step times, which also
  counts the periodic flush (every `flush_seconds`). **IQR/block**: spread of the per-block ratios.
  **CPU ratio**: the headline ratio computed from the process's CPU time (all threads, the writer's
  included) instead of wall time; it is less disturbed by other processes on a shared machine, but
  counts OpenMP threads spinning while they wait. For wandb the CPU time of its service process
  (`wandb-core`) is added to the watched model's. **pairs**: measured pairs (a case stops early,
  after at least 30, once its timed loop passes `--max-seconds`; an instrument that makes a step very
  slow stops after at least 12 once it passes 1.5 × `--max-seconds`; a peer recording every N steps
  at half the cap once two recorded steps are in). **measured**: the date the row was measured
  (`overhead.py --only freezeframe,floor` re-measures those rows and keeps the others as they were).
- **(sched., k rec.)**: a peer recording every N steps whose N-step blocks do not fit 8 times in the
  time cap (e.g. every 100 steps of a ResNet-18). The benchmark knows which of the watched model's
  steps record (the peer's schedule), so the ratio is the schedule-weighted mean, (1 × mean recorded
  step + (N − 1) × mean other step) / (N × mean plain step), with the bootstrap resampling recorded
  and other steps separately; with one recorded step its variation is not in the interval.
- The watched model's time of each pair includes draining the instrument's background work right
  after its step, so it never overlaps the plain model's step: freezeframe's writer thread
  (`rec._writer.drain()`), TensorBoard's event writer thread (`writer.flush()`), W&B's service
  (`run.status()` after each step that logged histograms, a round trip the service answers after the
  records sent before it; after the other steps only the loss went out; what it still
  does afterwards is counted in the CPU ratio, and reported as "svc CPU in A" in the details; that
  part slows the plain model's step, so W&B's wall-clock ratio errs in W&B's favour).
  The warm-up pairs (which contain freezeframe's calibration steps and the first stage's content
  hashes, and W&B's start-up) are not measured; the close (hash + compaction, or the peer's
  finish) is timed separately.
- Peers, as their documentation says to use them: `wandb.watch(model, log="all", log_freq=N)` on an
  offline run (`wandb.init(mode="offline")`, one run per case) with `run.log({"loss": loss.item()})`
  after every step, inside the timed region (wandb.watch's histograms are computed in forward and
  backward hooks and sent with the next committed `log`); TensorBoard `SummaryWriter.add_histogram`
  of every parameter and every gradient from an optimizer step pre-hook (after backward, before
  the update). "every step" rows record at each step; "sparse" rows every N steps (freezeframe's
  default calibrates N to its 3 % budget, the peers use 100).
- Memory columns. **RSS +MiB**: resident memory after the measured steps minus before attaching (both models had
  already stepped; free heap pages handed back with malloc_trim before each reading); for wandb the
  service process's resident memory in brackets ("svc"). **heap +MiB**:
  the same for the bytes malloc has handed out (glibc mallinfo2), which free-list caching cannot
  blur. **peak +MiB**: in a separate untimed pass, the median peak RSS (kernel high-water mark)
  over a window of `every` steps of the watched model minus the same for the plain model; for a
  peer recording every N steps, one window of the watched model ending at its next recorded step
  against one plain step (— where that window would take too long, e.g. on a ResNet-18).
  **analytic MiB**: the persistent reference copy (parameters + buffers) + one temporary copy of
  the recorded parameters.
- **B/row**: bytes of the compacted `tensors` table per (tensor, recorded step) row; in brackets the
  whole log (steps + tensors + scalars + manifest, not the reference weights) per row. For the peers a
  row is one parameter tensor at one recorded step (its parameter and gradient histograms): W&B's
  `.wandb` transaction log per row, in brackets the whole offline run directory; TensorBoard's event
  files per row. **rows**: recorded steps × tensors per recorded step (warm-up and memory-pass steps
  included). **close s**: the time `close()` took (final hashes, flush, compaction; for W&B
  `unwatch` + `finish` + stopping the service).
- **Side by side**: per model, every instrument at the same cadence: "every step" (freezeframe
  every=1, the floor, the peers at every step) and "sparse" (freezeframe's calibrated default, the
  peers every 100 steps), with the bytes each writes per tensor per recorded step.
"""


def keep_block(path: Path) -> str | None:
    """The other scripts' blocks of the existing file (markers included), verbatim, or None."""
    if not path.exists():
        return None
    text = path.read_text()
    found = [m.group(0) for begin, end in KEEP
             if (m := re.search(re.escape(begin) + r".*?" + re.escape(end), text, re.S))]
    return "\n\n".join(found) or None


def write_markdown(path: Path, results: list[dict], meta: dict, absent: dict[str, str] | None = None) -> None:
    m = meta["machine"]
    kept = keep_block(path)
    lines = [
        "# Benchmarks", "",
        "Generated by `make bench` (`.venv/bin/python benchmarks/overhead.py`); regenerate with the same command.", "",
        f"- Date: {meta['date']}" + (
            f" (the rows selected by `--only {meta['remeasured']}`; the others are kept from "
            f"`benchmarks/results/{meta['kept_from']}`, each row's date in its **measured** column)"
            if meta.get("kept_from") else ""),
        f"- Machine: {m['cores']} cores ({m['cpu']}), torch {m['torch']} with {m['torch_threads']} threads, "
        f"Python {m['python']}, {m['platform']}",
        f"- freezeframe {m['freezeframe']}; peers: {meta.get('peers') or 'none'}; load average at start "
        f"{meta['load_start']}, at end {meta['load_end']} "
        "(the machine is shared: other processes' CPU use is noise that the interleaving spreads over both models)",
        f"- Total benchmark time: {meta['elapsed_s']:.0f} s" + (" (of this re-measure)" if meta.get("kept_from") else ""),
        "",
        "## Overhead per training step", "",
        *_md_table(TIME_HEADERS, time_rows(results)), "",
        "## Memory and bytes written", "",
        *_md_table(MEMORY_HEADERS, memory_rows(results)), "",
        "## Side by side, at the same cadence", "",
        *_md_table(SIDE_HEADERS, side_rows(results)),
    ]
    lines += ["", *[f"- {v}" for v in meta["verdicts"]]]
    if meta.get("machine_busy"):
        lines.append(f"- The machine was busy during this run (load average {meta['load_start']} → "
                     f"{meta['load_end']} on {m['cores']} cores): the ratios are noisier than on a quiet machine.")
    skipped = meta.get("skipped") or []
    if skipped or absent:
        lines += ["", "## Peers not measured", ""]
        lines += [f"- {s['instrument']} ({s['workload'].split(',')[0]}): {s['reason']}" for s in skipped]
        lines += [f"- {name}: {why}" for name, why in (absent or {}).items()]
    lines += ["", "## How it is measured", "", NOTES]
    extra = []
    for r in results:
        c = r.get("calibration")
        if c:
            extra.append(f"- {_model(r)}, {r['instrument']}: calibration measured a training "
                         f"step of {1e3 * c['step_s']:.1f} ms, recording {1e3 * c['recording_s']:.2f} ms, "
                         f"per-step bookkeeping {1e3 * c['per_step_s']:.2f} ms → every={r['every']}")
        w = r["written"]
        if w and w.get("kind") == "peer":
            extra.append(f"- {_model(r)}, {r['instrument']}: {w['recorded_steps']} recorded steps × "
                         f"{w['tensors_per_recorded_step']:.0f} tensors; "
                         + ", ".join(f"{k.replace('_', ' ')} {v} B" for k, v in w["sizes"].items())
                         + f"; close {r['close_s']:.2f} s")
        elif w:
            extra.append(f"- {_model(r)}, {r['instrument']}: {w['recorded_steps']} recorded steps × "
                         f"{w['tensors_per_recorded_step']:.0f} tensors; tensors table {w['sizes']['tensors']} B, "
                         f"steps table {w['sizes']['steps']} B, manifest {w['sizes']['manifest']} B, "
                         f"reference {w['sizes']['reference'] / MiB:.1f} MiB; close {r['close_s']:.2f} s")
        h = r.get("helper")
        if h:
            extra.append(f"- {_model(r)}, {r['instrument']}: service processes {', '.join(h['names']) or '—'}: "
                         f"{h['cpu_ms_per_pair']:.1f} ms CPU per step, of which {h['cpu_ms_in_plain_window']:.1f} ms "
                         f"ran during the plain model's step (\"svc CPU in A\"); drain "
                         f"{r['drain_ms_mean']:.1f} ms per step")
    if extra:
        lines += ["## Details", "", *extra, ""]
    text = "\n".join(lines)
    if kept:
        text = text.rstrip("\n") + "\n\n" + kept + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
