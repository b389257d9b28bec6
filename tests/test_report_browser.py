"""The HTML report in a real headless Chromium (Debian's, driven by Playwright): it loads from file://
offline with no console error, every figure is drawn, hovering the heatmap names the module, and a
model whose names are HTML runs no script."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

import freezeframe
from freezeframe.render.html import write_html
from test_report_data import EVIL_MODULE, EVIL_STAGE, evil_run, two_stage_run

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} is missing (Debian package 'chromium'; `make browser` installs it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


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
        self.page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 4", timeout=30_000)

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
    two_stage_run(root / "run")
    evil_run(root / "evil")
    run = freezeframe.load(root / "run")
    return {"run": run, "html": write_html(run, root / "report.html"),
            "evil": write_html(freezeframe.load(root / "evil"), root / "evil.html")}


def test_report_loads_offline_and_draws_every_figure(browser, reports):
    page = Page(browser, reports["html"])
    try:
        assert page.page.locator(".js-plotly-plot").count() == 5
        for name in ("freeze_map", "heatmap", "lr", "drift", "loss"):
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
        row = names.index("head.0")
        s1 = summary["stages"][1]
        step = (s1["first_step"] + s1["last_step"]) // 2
        text = page.hover_heatmap(row, step)
        assert "head.0" in text and f"step {step}" in text and "stage 1: unfrozen" in text and "log10" in text
        conv = names.index("body.0")                                    # frozen while the head trained
        text = page.hover_heatmap(conv, 3)
        assert "body.0" in text and "frozen" in text and "stage 0" in text
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
        assert page.page.locator("script").count() == 3
        assert EVIL_STAGE in page.page.evaluate("document.body.innerText")   # the stage name, as text
        assert page.dialogs == []
        assert page.errors == []
        assert all(u.startswith(("file://", "data:")) and not u.endswith("/q") for u in page.requests), page.requests
    finally:
        page.close()
