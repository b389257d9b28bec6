"""A large scrubber grid is carried as 16-bit codes (docs/report.md, "Page data"): the page decodes
them to the values within the stated bound, keeps NaN and ±inf, and the file shrinks."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from freezeframe.render.html import QUANTIZE_CELLS, _page_timeline, quantized


def _grid(rows=500, cols=250, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.uniform(-12.0, 2.0, size=(rows, cols)).astype(np.float32)
    g[0, :7] = np.nan
    g[1, 3] = -np.inf
    g[2, 4] = np.inf
    g[3, 5] = -12.0  # the range's ends are exact
    g[3, 6] = 2.0
    return g


def _decode_like_the_page(spec: dict) -> np.ndarray:
    """The boot script's rule, written out: lo + (code - 1) * step; 0 -inf, 65534 +inf, 65535 NaN."""
    codes = np.frombuffer(base64.b64decode(spec["bdata"]), dtype="<u2").astype(np.int64)
    lo, step = spec["q"]
    out = []
    for c in codes.tolist():
        out.append(np.nan if c == 65535 else -np.inf if c == 0 else np.inf if c == 65534 else lo + (c - 1) * step)
    return np.array(out).reshape([int(n) for n in spec["shape"].split(",")])


def test_codes_decode_to_the_values_within_half_a_step():
    g = _grid()
    spec = quantized(g)
    back = _decode_like_the_page(spec)
    fin = np.isfinite(g)
    assert np.array_equal(np.isnan(back), np.isnan(g))
    assert back[1, 3] == -np.inf and back[2, 4] == np.inf
    lo, hi = float(g[fin].min()), float(g[fin].max())
    bound = (hi - lo) / 131_064
    assert np.max(np.abs(back[fin] - g[fin].astype(np.float64))) <= bound * 1.0001
    # two digits of the ratio (toExponential(1)) move by at most 0.025 % at this span
    assert 10 ** bound - 1 < 3e-4


def test_only_large_grids_are_quantized_and_the_page_carries_half_the_bytes():
    small = {"update": _grid(10, 10)}
    assert _page_timeline(small) is small
    big = {"update": _grid(500, 250), "frames": {}}
    assert big["update"].size > QUANTIZE_CELLS
    page = _page_timeline(big)
    assert page["update"]["dtype"] == "u2" and page["frames"] is big["frames"]
    assert len(json.dumps(page["update"])) < 0.55 * len(base64.b64encode(big["update"].tobytes()))


def test_the_browser_decodes_the_codes(browser, tmp_path):
    """The real boot script in Chromium: FF_TIMELINE.update rows are Float32Arrays of the values."""
    from freezeframe.render.html import BOOT, script_json

    g = _grid(500, 250)
    payload = script_json({"order": [], "figures": {}, "timeline": _page_timeline({"update": g})})
    page = tmp_path / "q.html"
    page.write_text("<!DOCTYPE html><html><head><script>window.Plotly={newPlot:function(){return Promise.resolve();}};"
                    f"</script></head><body><script type=\"application/json\" id=\"ff-data\">{payload}</script>"
                    f"<script>{BOOT}</script></body></html>")
    tab = browser.new_page()
    tab.goto(page.as_uri())
    got = tab.evaluate("() => FF_TIMELINE.update.map(r => Array.from(r, v => isNaN(v) ? 'nan' : "
                       "v === Infinity ? 'inf' : v === -Infinity ? '-inf' : v))")
    tab.close()
    got = np.array([[np.nan if v == "nan" else np.inf if v == "inf" else -np.inf if v == "-inf" else v for v in r]
                    for r in got], dtype=np.float64)
    expected = _decode_like_the_page(quantized(g)).astype(np.float32).astype(np.float64)
    assert got.shape == g.shape
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    fin = np.isfinite(expected)
    assert np.array_equal(got[~fin & ~np.isnan(expected)], expected[~fin & ~np.isnan(expected)])
    assert np.max(np.abs(got[fin] - expected[fin])) <= 1e-6 * np.max(np.abs(expected[fin]))
