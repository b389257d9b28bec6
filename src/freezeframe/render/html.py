"""The report as one self-contained HTML file: plotly.js (the vendored cartesian bundle), CSS and the
figure data inlined (opens from disk offline, makes no network request); every name from the
model is escaped. The figures are in render/charts.py, the HTML panels in render/panels.py."""

from __future__ import annotations

import base64
import json
import time
from functools import lru_cache
from html import escape as e
from importlib import resources
from pathlib import Path

import numpy as np

from .charts import (FROZEN_CELL, GROUP_COLORS, MARKED_CELLS, STAGE_COLORS, STATE_COLORS,  # noqa: F401 (shared)
                     TIME_CHARTS, UNKNOWN_COLOR, drift_figure, freeze_map_figure, heatmap_figure, loss_figure,
                     lr_figure, plotly_figures)
from .panels import (answers_html, bn_html, epochs_html, facts, findings_html, glossary_html, slice_note,
                     stages_table, transitions_html)
from .layers import layers_script, layers_section  # the layer view and step scrubber (docs/report.md)

VENDOR_JS = "plotly-cartesian.min.js"   # render/vendor/README.md says which version and why


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """The vendored plotly.js partial bundle (package data, render/vendor/)."""
    return resources.files(__package__).joinpath("vendor", VENDOR_JS).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- JSON in a <script>
_DTYPES = {np.dtype("float32"): "f4", np.dtype("float64"): "f8", np.dtype("int32"): "i4", np.dtype("int16"): "i2",
           np.dtype("int8"): "i1", np.dtype("uint32"): "u4", np.dtype("uint16"): "u2", np.dtype("uint8"): "u1"}


def _typed_array(a: np.ndarray) -> dict | list:
    """A numpy array as plotly.js's typed-array spec {dtype, bdata (base64, little-endian), shape}."""
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    elif a.dtype.kind in "iu" and a.dtype not in _DTYPES:
        a = a.astype(np.int32) if a.size == 0 or (a.min() >= -2**31 and a.max() < 2**31) else a.astype(np.float64)
    elif a.dtype.kind == "f" and a.dtype not in _DTYPES:
        a = a.astype(np.float64)
    elif a.dtype.kind not in "iuf":
        return [_plain(v) for v in a.tolist()]
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    out = {"dtype": _DTYPES[a.dtype.newbyteorder("=")], "bdata": base64.b64encode(a.tobytes()).decode("ascii")}
    if a.ndim > 1:
        out["shape"] = ", ".join(str(n) for n in a.shape)
    return out


QUANTIZE_CELLS = 100_000  # a scrubber grid larger than this goes into the page as 16-bit codes (docs/report.md)
_Q_NEG_INF, _Q_POS_INF, _Q_NAN = 0, 65534, 65535  # codes 1..65533 span [lo, hi] evenly


def quantized(a: np.ndarray) -> dict:
    """A float grid as 16-bit codes, {dtype: "u2", bdata, shape, q: [lo, step]}: value = lo +
    (code - 1) * step, off by at most step / 2 = (hi - lo) / 131,064 (of log10 values spanning 14
    decades: 0.025 % of the ratio); NaN and ±inf keep codes of their own. Half the bytes of float32."""
    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
    step = (hi - lo) / (_Q_POS_INF - 2) or 1.0
    codes = np.full(a.shape, _Q_NAN, dtype=np.uint16)
    codes[finite] = 1 + np.rint((a[finite] - lo) / step).astype(np.uint16)
    codes[a == -np.inf] = _Q_NEG_INF
    codes[a == np.inf] = _Q_POS_INF
    return {**_typed_array(codes), "q": [lo, step]}


def _page_timeline(timeline: dict | None) -> dict | None:
    """The timeline as the page carries it: a large update grid quantized (`quantized`)."""
    if not timeline or not isinstance(timeline.get("update"), np.ndarray) or timeline["update"].size <= QUANTIZE_CELLS:
        return timeline
    return {**timeline, "update": quantized(timeline["update"])}


def _plain(x):
    if isinstance(x, np.ndarray):
        return _typed_array(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def script_json(obj) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' survives (a name like `</script>` cannot end the
    element), and no NaN/Infinity (null instead)."""
    text = json.dumps(_plain(obj), allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ----------------------------------------------------------------------------- the page
CSS = """
:root{--fg:#1d1d1f;--muted:#666;--line:#ddd;--ok:#1e7a34;--bad:#b3261e;--warn:#9a6700}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:#fafafa}
header{background:#1d2b3a;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:20px}
header .facts{color:#cfd8e3}header .warn{color:#ffd27a}
nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);padding:6px 28px}
nav a{margin-right:16px;color:#1f5fa8;text-decoration:none}
main{padding:8px 28px 40px;max-width:1500px}
section{background:#fff;border:1px solid var(--line);border-radius:6px;margin:18px 0;padding:12px 18px}
section h2{font-size:17px;margin:4px 0 6px}p.how{color:var(--muted);margin:2px 0 8px}
.qa h3{font-size:15px;margin:12px 0 2px}.qa p{margin:0 0 8px}
table.stages{border-collapse:collapse;margin:6px 0 10px}
table.stages th,table.stages td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
table.stages th{background:#f3f5f8}.yes{color:var(--ok)}.no{color:var(--bad);font-weight:600}.dim{color:var(--muted)}
ul.findings{padding-left:20px}.sev-error{color:var(--bad);font-weight:700}.sev-warning{color:var(--warn);font-weight:700}
.sev-info{color:#1f5fa8;font-weight:700}.fig{width:100%}footer{color:var(--muted);padding:0 28px 20px}
.slice{color:#1f5fa8;font-size:12px}.event{color:var(--bad)}.transition h3{font-size:14px;margin:10px 0 2px}
.transition ul{margin:2px 0 6px;padding-left:20px}details summary{cursor:pointer;color:#1f5fa8}
ul.names{columns:3;font-size:12px;margin:2px 0}dl.glossary dt{font-weight:600;margin-top:6px}
dl.glossary dd{margin:0 0 0 18px;color:#333}li details{display:inline-block;vertical-align:top}
"""


SECTIONS = {
    "freeze_map": ("Freeze map", "Which modules each stage trained. Columns are stages, rows modules in model "
                                 "order with their layer group; green trains, blue frozen, orange partly trains (e.g. "
                                 "only the BatchNorm layers of a frozen block, fastai's train_bn). \"changed\": the "
                                 "bytes differ from the stage's start; \"unchanged\": bitwise equal. The % is the "
                                 "distance from the weights watching began with (W_ref) at the stage's end, as a "
                                 "relative L2 distance; the darker the cell, the further."),
    "heatmap": ("Update heatmap", "What each optimizer step did to each module: colour is log10 of ‖ΔW‖/‖W‖, the "
                                  "step's update relative to the weights (−3 means the step moved them by 0.1 % of "
                                  "their size). Grey cells are frozen for the stage — no update at all, not a small "
                                  "one. Dashed lines are stage starts with what began them (▸ fastai's unfreeze(), or "
                                  "how many tensors a loop unfroze), dotted "
                                  "lines epoch starts. Hover a cell for module, stage, epoch, batch, step and value; "
                                  "drag to zoom."),
    "lr": ("Learning rates", "The learning rate every layer group (pg0, pg1…: the optimizer's parameter groups) got "
                             "at every step, on a log scale: the one-cycle shape of each fit (up to lr_max, then "
                             "down) and the discriminative spread after unfreezing. Groups sharing one lr are drawn "
                             "with their own dash so each stays visible. Click a group in the legend to hide it."),
    "drift": ("Drift from the reference weights", "How far each module is from the weights watching began with "
                                                  "(W_ref, the pretrained weights), at the end of each stage: "
                                                  "‖W − W_ref‖ / ‖W_ref‖, a relative L2 distance. Earlier stages are "
                                                  "rings, the last stage a dot. On the log scale, 0 (bitwise "
                                                  "unchanged) sits on its own tick at the left."),
    "loss": ("Loss", "The loss as logged at each step, stages shaded, epochs dotted."),
}
TITLES = {"answers": "Answers", "layers": "Layers", "between": "Between the fits", "epochs": "Per-epoch values",
          "bn": "BatchNorm statistics", "glossary": "Glossary"}

BOOT = """
(function(){
  var T = {f4: Float32Array, f8: Float64Array, i4: Int32Array, i2: Int16Array, i1: Int8Array,
           u4: Uint32Array, u2: Uint16Array, u1: Uint8Array};
  function decode(v){  // {dtype, bdata, shape} (docs/report.md) -> a typed array, or rows of them
    if (Array.isArray(v)) return v.map(decode);
    if (!v || typeof v !== 'object') return v;
    if (typeof v.bdata === 'string' && T[v.dtype]) {
      var bin = atob(v.bdata), bytes = new Uint8Array(bin.length);
      for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      var flat = new T[v.dtype](bytes.buffer), dims = v.shape ? String(v.shape).split(',').map(Number) : [flat.length];
      if (v.q) {  // 16-bit codes of a float grid (render/html.py quantized): 0 -inf, 65534 +inf, 65535 NaN
        var vals = new Float32Array(flat.length);
        for (var j = 0; j < flat.length; j++) {
          var c = flat[j];
          vals[j] = c === 65535 ? NaN : c === 0 ? -Infinity : c === 65534 ? Infinity : v.q[0] + (c - 1) * v.q[1];
        }
        flat = vals;
      }
      if (dims.length < 2) return flat;
      var rows = [];
      for (var r = 0; r < dims[0]; r++) rows.push(flat.subarray(r * dims[1], (r + 1) * dims[1]));
      return rows;
    }
    var out = {};
    for (var k in v) out[k] = decode(v[k]);
    return out;
  }
  var data = JSON.parse(document.getElementById('ff-data').textContent);
  window.FF_TIMELINE = decode(data.timeline || null);
  var config = {responsive: true, displaylogo: false, scrollZoom: false};
  var drawn = data.order.map(function(name){
    var fig = data.figures[name], div = document.getElementById('fig-' + name);
    div.dataset.baseShapes = JSON.stringify(fig.layout.shapes || []);
    return Plotly.newPlot(div, fig.data, fig.layout, config);
  });
  Promise.all(drawn).then(function(){ window.FF_READY = performance.now(); document.body.dataset.ready = '1'; });
})();
"""


def _lr_how(summary: dict) -> str:
    notes = [f"stage {s['index']}: {n}" for s in summary["stages"]
             if (n := slice_note([g["lr_max"] for g in s["groups"]], summary["run"].get("framework")))]
    return (" Discriminative lrs: " + "; ".join(notes) + " (fastai's lr_max=slice(a, b) spaces the groups' lrs "
            "geometrically from a to b).") if notes else ""


def _section(name: str, figs: dict, summary: dict) -> str:
    heading, how = SECTIONS[name]
    how = e(how + (_lr_how(summary) if name == "lr" else ""))
    cls = "fig ff-timechart" if name in TIME_CHARTS else "fig"
    return f'<section id="{name}"><h2>{heading}</h2><p class=how>{how}</p><div class="{cls}" id="fig-{name}"></div></section>'


def render_html(run, *, data: dict | None = None, depth: int | None = None) -> str:
    """The report of `run` as one HTML string (figure data from `analyse.figures` unless given)."""
    from ..analyse.figures import epoch_values, from_run, time_marks
    from ..analyse.tables import adapters_table
    from .adapters import adapters_html

    summary = run.summary()
    data = from_run(run, depth=depth) if data is None else data
    data.setdefault("timeline", time_marks(summary))
    data.setdefault("epochs", epoch_values(summary))
    figs = plotly_figures(data)
    title = f"freezeframe · {summary['run']['path']}"
    sections = [f'<section id="answers"><h2>The three questions, answered from this run</h2>{answers_html(summary)}'
                f'<h3>Stages</h3>{stages_table(summary)}{adapters_html(adapters_table(summary))}'
                f'{findings_html(summary["findings"])}</section>']
    sections.append(layers_section(data))
    sections.append(transitions_html(summary))
    sections += [_section(name, figs, summary) for name in figs if name in SECTIONS]
    if data["loss"] is None:
        sections.append('<section id="loss"><h2>Loss</h2><p class=how>This run logged no loss '
                        '(<code>rec.log(loss=...)</code> adds it).</p></section>')
    sections += [epochs_html(data["epochs"], "epochs" in figs), bn_html(summary), glossary_html()]
    shown = [n for n in ("answers", "layers", "between", *SECTIONS, "epochs", "bn", "glossary")
             if any(f'<section id="{n}"' in s for s in sections)]
    nav = "".join(f'<a href="#{n}">{TITLES.get(n) or SECTIONS[n][0]}</a>' for n in shown)
    payload = script_json({"order": list(figs), "figures": figs, "timeline": _page_timeline(data.get("timeline"))})
    return "".join([
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style>",
        f"<script>{plotly_js()}</script></head><body>",
        f"<header><h1>freezeframe report · <span>{e(summary['run']['path'])}</span></h1>{facts(summary)}</header>",
        f"<nav>{nav}</nav><main>{''.join(s for s in sections if s)}</main>",
        f"<footer>freezeframe {e(_version())} · built {e(time.strftime('%Y-%m-%d %H:%M'))}</footer>",
        f'<script type="application/json" id="ff-data">{payload}</script>',
        f"<script>{BOOT}</script><script>{layers_script()}</script></body></html>\n",
    ])


def _version() -> str:
    from .._version import __version__

    return __version__


def write_html(run, path, *, data: dict | None = None, depth: int | None = None) -> Path:
    """Write the report to `path` (one self-contained file); returns the path. Refused, before
    any work, over a file of a run, over an existing file that is not HTML, in a directory that
    cannot be written (docs/run-format.md, "What is written where")."""
    from ..store.outputs import check_report_file, replacing

    path = check_report_file(path, runs=(run.path,) if getattr(run, "path", None) else ())
    with replacing(path) as f:
        f.write(render_html(run, data=data, depth=depth).encode("utf-8"))
    return path
