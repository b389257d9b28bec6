"""The options every framework callback takes, checked when the callback is built
(docs/integrations.md): a bad one is refused at once, not at the first fit."""

from __future__ import annotations

from ..capture.session import Options
from ..errors import FreezeFrameError
from ..modes import MODES


def check_options(mode: str, every, options: dict) -> None:
    """`mode` one of the run directory's modes, `every` a positive integer or None, and every
    other keyword one of `freezeframe.watch`'s options."""
    if mode not in MODES:
        raise FreezeFrameError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise FreezeFrameError(f"every must be a positive integer or None, got {every!r}")
    Options.from_kwargs(options)
