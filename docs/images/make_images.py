"""Remake the README's pictures from the demo's run: the PNG figures (`freezeframe report --png`)
and a screenshot of the report's layer view in headless Chromium (docs/report.md, "Layer view").

    .venv/bin/freezeframe demo --out /tmp/ff-demo
    .venv/bin/python docs/images/make_images.py /tmp/ff-demo
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(run_dir: str) -> None:
    run = Path(run_dir)
    report = run / "report.html"
    freezeframe = Path(sys.executable).with_name("freezeframe")
    subprocess.run([str(freezeframe), "report", str(run), "-o", str(report), "--png", str(HERE)], check=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900}, device_scale_factor=1)
        page.goto(report.resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        page.add_style_tag(content="nav{display:none}")  # the sticky section links would cover it
        page.locator("#layers").screenshot(path=str(HERE / "layers.png"))
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "freezeframe-demo")
