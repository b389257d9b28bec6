"""The soak test runs only when asked: `make soak` (`pytest tests/soak`), a path inside tests/soak
on the command line, or FREEZEFRAME_SOAK=1. The default run (`make test`, plain `pytest`) skips it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _asked_for(config) -> bool:
    if os.environ.get("FREEZEFRAME_SOAK") == "1":
        return True
    root = Path(config.invocation_params.dir)
    for arg in config.invocation_params.args:
        arg = str(arg)
        if arg.startswith("-"):
            continue
        path = (root / arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if _asked_for(config):
        return
    skip = pytest.mark.skip(reason="soak test: run it with `make soak` (or FREEZEFRAME_SOAK=1)")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)
