"""The layer view and the step scrubber in a real headless Chromium (Debian's, driven by Playwright),
loaded from disk: moving the slider (by script and by keyboard) and playing change the label, the
layer rows' update sizes and lrs and the marker on every chart over steps; the page makes no
request and logs no error; with JavaScript off the structure and the stage cells still show, in
the legend's colours."""

from __future__ import annotations

import json
import math
import re

import pytest

import freezeframe
from freezeframe.analyse.figures import from_run
from freezeframe.render.html import plotly_js, script_json, write_html
from freezeframe.render.layers import frame_label, layers_script, layers_section
from test_layer_view import resnet_run

pytestmark = pytest.mark.browser

# the `browser` fixture (Debian's Chromium via Playwright) is in tests/conftest.py

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    resnet_run(root / "run", every=1)
    run = freezeframe.load(root / "run")
    data = from_run(run)
    return {"run": run, "data": data, "html": write_html(run, root / "report.html", data=data), "root": root}


class Page:
    """A page from disk that records console errors, page errors and every request that is not
    for a file (those are refused)."""

    def __init__(self, browser, path, *, js: bool = True, ready: str | None = "document.body.dataset.ready === '1'"):
        self.context = browser.new_context(viewport={"width": 1300, "height": 900}, java_script_enabled=js)
        self.page = self.context.new_page()
        self.errors, self.refused = [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.route("**/*", self._route)
        self.page.goto(path.resolve().as_uri())
        if js and ready:
            self.page.wait_for_function(ready, timeout=30_000)

    def _route(self, route):
        url = route.request.url
        if url.startswith(("file://", "data:")):
            route.continue_()
        else:
            self.refused.append(url)
            route.abort()

    def js(self, expr: str):
        return self.page.evaluate(expr)

    def move(self, f: int):
        self.js(f"(() => {{ const s = document.getElementById('step'); s.value = {f}; "
                "s.dispatchEvent(new Event('input', {bubbles: true})); })()")

    def label(self) -> str:
        return self.js("document.getElementById('step-label').textContent")

    def _rows(self, sel: str) -> list[str]:
        """The text of `sel` in each layer row, in layer order (data-i; the page shows a block's
        shortcut rows beside its main path, so page order differs)."""
        pairs = self.js(f"Array.from(document.querySelectorAll('#layers .r[data-i]')).map(r => "
                        f"[+r.dataset.i, r.querySelector('{sel}').textContent])")
        return [t for _, t in sorted(pairs)]

    def updates(self) -> list[str]:
        return self._rows(".u > em")

    def lrs(self) -> list[str]:
        return self._rows(".l")

    def wait_marker(self, x: float):
        self.page.wait_for_function(
            """x => { const divs = Array.from(document.querySelectorAll('.ff-timechart'));
                      return divs.length > 0 && divs.every(d => d.layout && (d.layout.shapes || [])
                        .some(s => s.name === 'ff-marker' && s.x0 === x && s.x1 === x)); }""", arg=x, timeout=10_000)

    def close(self):
        self.context.close()


def _js_exp(x: float) -> str:
    """What JavaScript's x.toExponential(1) writes (Python pads the exponent: 2.2e-03)."""
    return re.sub(r"e([+-])0*(\d+)$", r"e\1\2", f"{x:.1e}")


def _expected_updates(data: dict, f: int) -> list[str]:
    """The text layers.js must show in each row at frame f (every step is measured here)."""
    lv, tl = data["layer_view"], data["timeline"]
    col = [s["index"] for s in lv["stages"]].index(tl["frames"]["stage"][f])
    out = []
    for r, layer in enumerate(lv["layers"]):
        v = float(tl["update"][r, f])
        if v == -math.inf:
            out.append("0 (no update)")
        elif math.isnan(v):
            out.append("frozen" if layer["states"][col].startswith(("frozen", "changed")) else "–")
        else:
            out.append(_js_exp(10 ** v))
    return out


def test_moving_the_slider_shows_the_step_on_rows_label_and_charts(browser, report):
    data = report["data"]
    tl = data["timeline"]
    frames = len(tl["frames"]["step"])
    page = Page(browser, report["html"])
    try:
        assert page.js("document.getElementById('step').max") == str(frames - 1)
        assert page.label() == frame_label(tl, 0) == "stage 0 · epoch 1 · batch 1 · step 0"
        first, first_lr = page.updates(), page.lrs()
        assert first == _expected_updates(data, 0)
        f = frames - 3                                   # stage 1, epoch 3
        page.move(f)
        assert page.label() == frame_label(tl, f) == f"stage 1 · epoch 3 · batch 1 · step {tl['frames']['step'][f]}"
        later = page.updates()
        assert later == _expected_updates(data, f) and later != first
        assert "frozen" in first and "frozen" not in later   # the body trains in stage 1
        lr = page.lrs()
        assert lr != first_lr and lr[-1].startswith("lr ")                # fc's row: its group's lr
        assert float(lr[-1][3:]) == pytest.approx(float(tl["lr"][2, f]), rel=0.05)
        # the current stage's column is outlined
        assert "nth-child(2)" in page.js("Array.from(document.querySelectorAll('#layers style')).pop().textContent")
        # the marker line on every chart over steps, each chart's own shapes kept
        page.wait_marker(tl["frames"]["step"][f])
        kept = page.js("""Array.from(document.querySelectorAll('.ff-timechart')).map(d =>
            [d.layout.shapes.filter(s => s.name !== 'ff-marker').length, JSON.parse(d.dataset.baseShapes).length,
             d.layout.shapes.filter(s => s.name === 'ff-marker').length])""")
        assert len(kept) >= 3 and all(a == b and m == 1 for a, b, m in kept), kept
        assert all(b > 0 for _, b, _ in kept)            # the charts had shapes of their own (stages, epochs)
        assert page.errors == [] and page.refused == []
    finally:
        page.close()


def test_the_keyboard_and_play_move_the_scrubber(browser, report):
    tl = report["data"]["timeline"]
    frames = len(tl["frames"]["step"])
    page = Page(browser, report["html"])
    try:
        page.page.focus("#step")
        page.page.keyboard.press("ArrowRight")
        page.page.keyboard.press("ArrowRight")
        assert page.label() == frame_label(tl, 2) == "stage 0 · epoch 1 · batch 3 · step 2"
        page.wait_marker(2)
        page.page.keyboard.press("End")
        assert page.label() == frame_label(tl, frames - 1)
        page.page.keyboard.press("Home")
        assert page.label() == frame_label(tl, 0)
        before = page.updates()
        page.page.click("#play")
        assert page.js("document.getElementById('play').getAttribute('aria-pressed')") == "true"
        page.page.wait_for_function("+document.getElementById('step').value >= 4", timeout=10_000)
        page.page.click("#play")                         # pause
        assert page.js("document.getElementById('play').textContent") == "▶ play"
        at = int(page.js("document.getElementById('step').value"))
        page.page.wait_for_timeout(300)
        assert int(page.js("document.getElementById('step').value")) == at
        assert page.label() == frame_label(tl, at) and page.updates() != before
        # a stage button jumps to the stage's first step
        page.page.click("#layers .stg[data-s='1']")
        assert page.label() == frame_label(tl, tl["frames"]["stage"].index(1))
        assert page.errors == [] and page.refused == []
    finally:
        page.close()


def test_without_javascript_the_view_still_shows_its_states_in_the_legends_colours(browser, report):
    """A notebook's inline HTML: the section alone, no script run."""
    path = report["root"] / "static.html"
    path.write_text(f"<!DOCTYPE html><html><head><meta charset=utf-8></head><body>{layers_section(report['data'])}"
                    "</body></html>", encoding="utf-8")
    page = Page(browser, path, js=False)
    try:
        rows = page.page.locator("#layers .r[data-i]")
        assert rows.count() == 73 and rows.nth(0).is_visible() and rows.nth(72).is_visible()
        assert not page.page.locator("#layers .r[data-i] .u").first.is_visible()   # no update column without JS
        colours = page.js("""(() => { const bg = e => getComputedStyle(e).backgroundColor;
            return {legend: Array.from(document.querySelectorAll('#layers .ffl-legend i')).map(bg),
                    cells: Array.from(new Set(Array.from(document.querySelectorAll('#layers .s > i')).map(bg)))}; })()""")
        assert sorted(colours["legend"]) == sorted(colours["cells"]) and len(colours["legend"]) == 4
        text = page.js("document.getElementById('layers').innerText")
        assert "layer4[2]" in text and "Conv2d" in text and "#34" in text and "shortcut branch" in text
        png = page.page.locator("#layers").screenshot()
        assert len(png) > 20_000
        assert page.errors == [] and page.refused == []
    finally:
        page.close()


def test_the_script_needs_only_its_section_a_timeline_and_plotly(browser, report):
    """A page made of the section, the script, plotly.js and one chart whose own shapes are in its
    layout only (no data-base-shapes): the marker joins them, the label moves, nothing is fetched."""
    data = report["data"]
    tl = data["timeline"]
    own = [{"type": "line", "xref": "x", "yref": "paper", "x0": 7.5, "x1": 7.5, "y0": 0, "y1": 1, "name": "stage"}]
    fig = {"data": [{"type": "scatter", "x": tl["frames"]["step"], "y": [float(v) for v in tl["loss"]]}],
           "layout": {"shapes": own, "height": 300}}
    path = report["root"] / "tiny.html"
    path.write_text(
        "<!DOCTYPE html><html><head><meta charset=utf-8>"
        f"<script>{plotly_js()}</script></head><body>{layers_section(data)}"
        '<div class="ff-timechart" id="chart"></div>'
        f'<script type="application/json" id="fig">{script_json(fig)}</script>'
        "<script>var f = JSON.parse(document.getElementById('fig').textContent);"
        "Plotly.newPlot('chart', f.data, f.layout);"
        f"window.FF_TIMELINE = {script_json(tl)};</script>"
        f"<script>{layers_script()}</script></body></html>", encoding="utf-8")
    page = Page(browser, path, ready="!!document.querySelector('#chart .main-svg')")
    try:
        page.move(5)
        assert page.label() == frame_label(tl, 5)
        page.wait_marker(5)
        names = page.js("document.getElementById('chart').layout.shapes.map(s => s.name)")
        assert names == ["stage", "ff-marker"]
        page.move(9)
        page.wait_marker(9)
        assert page.js("document.getElementById('chart').layout.shapes.map(s => s.name)") == ["stage", "ff-marker"]
        assert page.updates() == _expected_updates(data, 9)
        assert page.errors == [] and page.refused == []
        assert json.loads(page.js("JSON.stringify(window.FF_TIMELINE.frames.step)")) == tl["frames"]["step"]
    finally:
        page.close()


def test_each_row_shows_the_lr_of_the_group_holding_it_in_that_stage(browser, tmp_path):
    """A new optimizer for the second stage renumbers the groups (0 in stage 0, 1 in stage 1):
    each stage's frames show that stage's lr on every row, not blanks or the other stage's."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    first = torch.optim.SGD(model.parameters(), lr=0.25)
    with freezeframe.watch(model, first, tmp_path / "run", every=1, mode="new") as rec:
        lrs = {}
        for k, opt_lr in enumerate((0.25, 0.05)):
            opt = first if k == 0 else torch.optim.SGD(model.parameters(), lr=opt_lr)
            if k == 1:
                rec.track(opt)
            with rec.stage(f"stage {k}"):
                for _ in range(3):
                    rec.epoch()
                    opt.zero_grad()
                    model(torch.randn(8, 4)).square().mean().backward()
                    opt.step()
                lrs[k] = opt.param_groups[0]["lr"]
    run = freezeframe.load(tmp_path / "run")
    data = from_run(run)
    html = write_html(run, tmp_path / "report.html", data=data)
    tl = data["timeline"]
    page = Page(browser, html)
    try:
        for f, stage in enumerate(tl["frames"]["stage"]):
            page.move(f)
            want = "lr " + str(+float(f"{lrs[stage]:.2g}"))
            assert page.lrs() == [want] * len(data["layer_view"]["layers"]), (f, stage, page.lrs())
        assert page.errors == [] and page.refused == []
    finally:
        page.close()
