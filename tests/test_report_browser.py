"""The HTML report in a real headless Chromium (Debian's, driven by Playwright): it loads from file://
offline with no console error, every figure is drawn, hovering the heatmap names the module, and a
model whose names are HTML runs no script."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

import freezeframe
from freezeframe.render.html import write_html
from test_report_data import EVIL_MODULE, EVIL_STAGE, evil_run
from test_report_panels import epoch_run

pytestmark = pytest.mark.browser

# the `browser` fixture (Debian's Chromium via Playwright) is in tests/conftest.py

class Page:
    """A page that records console errors, page errors, requests and dialogs."""

    def __init__(self, browser, path: Path):
        self.page = browser.new_page(viewport={"width": 1300, "height": 900})
        self.errors, self.requests, self.dialogs = [], [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", self._dialog)
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_function("document.body.dataset.ready === '1'", timeout=30_000)   # every figure drawn

    def _dialog(self, d):
        self.dialogs.append(d.message)
        d.dismiss()

    def hover_heatmap(self, row: int, step: float) -> str:
        """Move the mouse over cell (row, step) of the update heatmap; returns plotly's hover text."""
        page = self.page
        page.locator("#heatmap").scroll_into_view_if_needed()
        fig = json.loads(page.evaluate(
            "JSON.stringify((g => ({range: g._fullLayout.xaxis.range, rows: g._fullLayout.yaxis.tickvals.length}))"
            "(document.getElementById('fig-heatmap')))"))
        box = page.locator("#fig-heatmap .nsewdrag").first.bounding_box()
        (x0, x1), rows = fig["range"], fig["rows"]
        x = box["x"] + (step - x0) / (x1 - x0) * box["width"]
        y = box["y"] + (row + 0.5) / rows * box["height"]
        # leave the plot first and wait for the previous hover label to go: otherwise the label
        # read below may still be the last cell's
        page.mouse.move(0, 0)
        page.wait_for_selector("#fig-heatmap .hovertext", state="detached", timeout=5_000)
        page.mouse.move(x - 3, y)
        page.mouse.move(x, y)
        page.wait_for_selector("#fig-heatmap .hovertext", timeout=5_000)
        return page.locator("#fig-heatmap .hovertext").first.text_content()

    def close(self):
        self.page.close()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    truth = epoch_run(root / "run")
    evil_run(root / "evil")
    run = freezeframe.load(root / "run")
    return {"run": run, "truth": truth, "html": write_html(run, root / "report.html"),
            "evil": write_html(freezeframe.load(root / "evil"), root / "evil.html")}


def test_report_loads_offline_and_draws_every_figure(browser, reports):
    page = Page(browser, reports["html"])
    try:
        assert page.page.locator(".js-plotly-plot").count() == 6
        for name in ("freeze_map", "heatmap", "lr", "drift", "loss", "epochs"):
            assert page.page.locator(f"#fig-{name} .main-svg").count() >= 1, name
        assert page.page.locator("#fig-heatmap .hm").count() >= 2        # heatmap layers drawn
        assert page.page.locator("#fig-lr .scatterlayer .trace").count() >= 6
        assert page.errors == []
        assert page.requests and all(u.startswith(("file://", "data:")) for u in page.requests), page.requests
        png = page.page.screenshot(full_page=True)
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
        assert pixels.std() > 20 and len(np.unique(pixels)) > 50        # not blank
    finally:
        page.close()


def test_hovering_a_heatmap_cell_shows_module_step_stage_value(browser, reports):
    summary = reports["run"].summary()
    page = Page(browser, reports["html"])
    try:
        names = page.page.evaluate("document.getElementById('fig-heatmap')._fullLayout.yaxis.tickvals")
        labels = page.page.evaluate("document.getElementById('fig-heatmap')._fullLayout.yaxis.ticktext")
        assert labels == names                                          # the axis shows what the hover says
        row = next(k for k, n in enumerate(names) if n.endswith("head[0]"))
        s1 = summary["stages"][1]
        step = (s1["first_step"] + s1["last_step"]) // 2
        epoch = max(k for k, x in enumerate(s1["epoch_starts"]) if x <= step)
        when = f"stage 1 · epoch {epoch + 1} · batch {step - s1['epoch_starts'][epoch] + 1} · step {step}"
        text = page.hover_heatmap(row, step)
        assert names[row] in text and when in text and "stage 1: unfrozen" in text and "log10" in text
        conv = next(k for k, n in enumerate(names) if n.endswith("body[0]"))   # frozen while the head trained
        text = page.hover_heatmap(conv, 3)
        assert names[conv] in text and "frozen" in text and "stage 0" in text
        assert page.errors == []
    finally:
        page.close()


def test_names_from_the_model_run_no_script(browser, reports):
    page = Page(browser, reports["evil"])
    try:
        names = page.page.evaluate("document.getElementById('fig-heatmap')._fullLayout.yaxis.tickvals")
        for row in range(len(names)):                                   # render every hover label too
            page.hover_heatmap(row, 4)
        page.page.locator("#freeze_map").scroll_into_view_if_needed()
        labels = page.page.locator("#fig-freeze_map .ytick text").all_text_contents()
        assert any(EVIL_MODULE in t for t in labels)                   # shown as text
        assert page.page.locator("img").count() == 0
        assert page.page.locator("script").count() == 4
        assert EVIL_STAGE in page.page.evaluate("document.body.innerText")   # the stage name, as text
        assert page.dialogs == []
        assert page.errors == []
        assert all(u.startswith(("file://", "data:")) and not u.endswith("/q") for u in page.requests), page.requests
    finally:
        page.close()


TIME_CHARTS = ("heatmap", "lr", "loss", "epochs")


def test_time_axes_carry_epoch_ticks_and_stage_events(browser, reports):
    """Oracle: the epochs and stage starts the training loop itself counted (epoch_run)."""
    truth = reports["truth"]
    page = Page(browser, reports["html"])
    try:
        charts = page.page.evaluate("Array.from(document.querySelectorAll('.ff-timechart')).map(d => d.id)")
        assert sorted(charts) == sorted(f"fig-{n}" for n in TIME_CHARTS)
        for name in TIME_CHARTS:
            drawn = json.loads(page.page.evaluate(
                f"JSON.stringify((g => ({{shapes: g._fullLayout.shapes.map(s => [s.name || '', s.x0]),"
                f" notes: Array.from(g.querySelectorAll('.annotation-text')).map(t => t.textContent)}}))"
                f"(document.getElementById('fig-{name}')))"))
            epoch_lines = sorted(x for n, x in drawn["shapes"] if n == "ff-epoch")
            later = [s - 0.5 for starts in truth["epoch_starts"] for s in starts[1:]]
            assert epoch_lines == sorted(later), name                     # a line at every epoch start
            events = sorted(x for n, x in drawn["shapes"] if n == "ff-event")
            assert events == [s - 0.5 for s in truth["stage_starts"][1:]], name
            labels = [t for t in drawn["notes"] if t.startswith("epoch ")]
            assert len(labels) == sum(len(x) for x in truth["epoch_starts"]), name
            assert any("unfrozen" in t and t.startswith("▸") for t in drawn["notes"]), name
        assert page.errors == []
        assert all(u.startswith(("file://", "data:")) for u in page.requests), page.requests
    finally:
        page.close()


def test_hovering_the_loss_names_stage_epoch_batch_and_step(browser, reports):
    truth = reports["truth"]
    page = Page(browser, reports["html"])
    try:
        page.page.locator("#loss").scroll_into_view_if_needed()
        for step in (3, truth["stage_starts"][1] + 6):
            stage = int(step >= truth["stage_starts"][1])
            starts = truth["epoch_starts"][stage]
            epoch = max(k for k, x in enumerate(starts) if x <= step)
            fig = json.loads(page.page.evaluate(
                "JSON.stringify((g => ({range: g._fullLayout.xaxis.range}))(document.getElementById('fig-loss')))"))
            box = page.page.locator("#fig-loss .nsewdrag").first.bounding_box()
            (x0, x1) = fig["range"]
            y = json.loads(page.page.evaluate(
                f"JSON.stringify((g => g._fullLayout.yaxis.l2p(g._fullData[{stage}].y[{step - (0 if stage == 0 else truth['stage_starts'][1])}]))"
                "(document.getElementById('fig-loss')))"))
            page.page.mouse.move(0, 0)
            page.page.mouse.move(box["x"] + (step - x0) / (x1 - x0) * box["width"], box["y"] + y)
            page.page.wait_for_selector("#fig-loss .hovertext", timeout=5_000)
            text = page.page.locator("#fig-loss .hovertext").first.text_content()
            assert f"stage {stage} · epoch {epoch + 1} · batch {step - starts[epoch] + 1} · step {step}" in text
        assert page.errors == []
    finally:
        page.close()


def test_the_panels_are_in_the_page(browser, reports):
    page = Page(browser, reports["html"])
    try:
        text = page.page.evaluate("document.body.innerText")
        for heading in ("Between the fits", "BatchNorm running statistics", "Per-epoch values", "Glossary"):
            assert page.page.locator("h2", has_text=heading).count() == 1, heading
        assert "geometric, ×10 per group: group 0: 0.0001, group 1: 0.001, group 2: 0.01" in text  # no slice() called
        rows = page.page.locator("#epochs table tr").count()
        assert rows == 1 + sum(len(x) for x in reports["truth"]["epoch_starts"])
        for section in ("answers", "between", "freeze_map", "heatmap", "lr", "drift", "loss", "epochs", "bn",
                        "glossary"):
            assert page.page.locator(f"nav a[href='#{section}']").count() == 1, section
        timeline = json.loads(page.page.evaluate(
            "JSON.stringify({frames: window.FF_TIMELINE.frames.step.length, ticks: window.FF_TIMELINE.epoch_ticks,"
            " update: Object.prototype.toString.call(window.FF_TIMELINE.update[0])})"))
        assert timeline["frames"] == reports["run"].summary()["run"]["steps"]      # set from the page's data
        assert [t["step"] for t in timeline["ticks"]] == [s for x in reports["truth"]["epoch_starts"] for s in x]
        assert timeline["update"] == "[object Float32Array]"                        # typed arrays, decoded
        assert page.errors == [] and page.dialogs == []
    finally:
        page.close()
