"""The report-scaling benchmark's tables: the console table, the fitted growth, the budget verdict
and the block of docs/benchmarks.md between `<!-- report-scaling:begin -->` and
`<!-- report-scaling:end -->`."""

from __future__ import annotations

from pathlib import Path

from scaling_runner import CLI_MAX_S, log

MiB = 1024 * 1024
# DESIGN.md "Budgets": `freezeframe report` on 1,000 tensors × 100,000 steps ≤ 10 s and ≤ 1.5 GiB RSS,
# its summary ≤ 3 s; report.html ≤ 3 MiB whatever the step count, interactive in Chromium within 3 s
BUDGET_CASE = (1_000, 100_000)
BUDGET_S, BUDGET_RSS_MIB, BUDGET_SUMMARY_S, BUDGET_HTML_MIB, BUDGET_BROWSER_S = 10.0, 1536.0, 3.0, 3.0, 3.0
BEGIN, END = "<!-- report-scaling:begin -->", "<!-- report-scaling:end -->"
PLOTLY_MIB = (Path(__file__).resolve().parents[1] / "src" / "freezeframe" / "render" / "vendor"
              / "plotly-cartesian.min.js").stat().st_size / MiB


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


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def budget_verdict(results: list[dict]) -> str | None:
    """The budgets' line: the command's time and memory and the summary's time on the budget case
    (the CLI subprocess where it ran, else the measuring process), every case's HTML size, and
    Chromium drawing the budget case's report."""
    r = next((r for r in results if (r["tensors"], r["steps"]) == BUDGET_CASE), None)
    if r is None:
        return None
    cli = r.get("cli")
    wall = cli["wall"] if cli else r["build_wall"]
    rss = cli["peak_rss_mib"] if cli else r["peak_rss_mib"]
    summary = r["phases"]["summary"]["wall"]
    how = "the whole `freezeframe report` command" if cli else "load + summary + figures + HTML in one process"
    parts = [f"report {wall:.1f} s ({how}) ≤ {BUDGET_S:.0f} s: {_met(wall <= BUDGET_S)}",
             f"peak RSS {rss:.0f} MiB ≤ {BUDGET_RSS_MIB:.0f} MiB: {_met(rss <= BUDGET_RSS_MIB)}",
             f"summary {summary:.2f} s ≤ {BUDGET_SUMMARY_S:.0f} s: {_met(summary <= BUDGET_SUMMARY_S)}"]
    big = max(results, key=lambda x: x["html_bytes"])
    html = big["html_bytes"] / MiB
    parts.append(f"largest report.html {html:.2f} MiB ({big['tensors']:,} × {big['steps']:,}) ≤ "
                 f"{BUDGET_HTML_MIB:.0f} MiB: {_met(html <= BUDGET_HTML_MIB)}")
    b = r.get("browser")
    if b:
        best = min(b["first_s"], b["second_s"])
        parts.append(f"every figure drawn in headless Chromium in {best:.1f} s (first load {b['first_s']:.1f} s; "
                     f"a page with only plotly.js: {min(b['plotly_only_s']):.1f} s) ≤ {BUDGET_BROWSER_S:.0f} s: "
                     f"{_met(best <= BUDGET_BROWSER_S)}"
                     + (" (on this machine loading plotly.js alone already takes longer than the budget)"
                        if best > BUDGET_BROWSER_S and min(b["plotly_only_s"]) > BUDGET_BROWSER_S else "")
                     + (f" ({len(b['errors'])} page errors)" if b["errors"] else ""))
    else:
        parts.append("Chromium not measured (no /usr/bin/chromium or playwright)")
    return (f"Budgets (DESIGN.md, on {BUDGET_CASE[0]:,} tensors × {BUDGET_CASE[1]:,} steps, every={r['every']}, "
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
        out += (f" The HTML ({min(html):.1f}–{max(html):.1f} MiB, of which the vendored plotly.js bundle is "
                f"{PLOTLY_MIB:.1f} MiB) is bounded whatever the tensors and steps: the heatmap bins steps into at most "
                f"2,000 columns and 100,000 cells and rolls modules up to about 120 rows, the learning-rate and loss lines keep at most "
                f"2,000 points (each bin's lowest and highest), the scrubber a bounded number of frames; a line "
                f"through the cases gives {f['html_bytes']['per_step']:.1f} bytes per step.")
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

