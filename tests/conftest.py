"""Shared fixtures of the test suite: offline, seeded, one fresh run directory per test."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # the zoo and the oracle import as plain modules
    sys.path.insert(0, str(TESTS_DIR))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch):
    """No network, and the same random streams in every test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory that does not exist yet (watch() creates it)."""
    return tmp_path / "run"


@pytest.fixture
def cli_env() -> dict:
    """Environment for subprocesses: offline, the source tree importable, few threads."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture
def freezeframe_exe() -> str:
    """The console script installed in the same environment as the interpreter running the tests."""
    exe = Path(sys.executable).parent / "freezeframe"
    assert exe.exists(), f"console script not installed next to {sys.executable}"
    return str(exe)


# -- the headless browser of the report tests: Debian's Chromium driven by Playwright (never
#    `playwright install`); under CI a missing browser fails the tests instead of skipping them
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser_unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        _browser_unavailable(f"{CHROMIUM} is missing (Debian package 'chromium'; `make browser` installs it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _browser_unavailable("the playwright Python package is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
