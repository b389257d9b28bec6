"""freezeframe: what every optimizer step did to every parameter, stage by stage, with bitwise proof."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
__all__ = ["watch", "load", "Recorder", "Run", "FreezeFrameError", "RunError", "__version__"]

from .errors import FreezeFrameError, RunError

if TYPE_CHECKING:  # pragma: no cover
    from .capture.recorder import Recorder
    from .run import Run


def watch(model, optimizer_or_list, run_dir, *, every: int | None = None, mode: str = "append", **options) -> "Recorder":
    """Record what each step of the optimizer(s) does to every parameter of `model` into `run_dir`.

    `every=N` measures the tensor metrics every N steps (the first step of every stage always);
    `every=None` calibrates N to stay within the overhead budget (option `budget`, default 0.03).
    `mode`: "append" (add stages to an existing run of the same model), "new" (refuse an existing
    run) or "overwrite". Returns a `Recorder`; use it as a context manager or call `close()`.
    """
    from .capture.recorder import Recorder

    return Recorder(model, optimizer_or_list, run_dir, every=every, mode=mode, **options)


def load(run_dir) -> "Run":
    """Read a run directory (complete or interrupted) as a `Run`."""
    from .run import Run

    return Run.load(run_dir)


def __getattr__(name: str):
    if name == "Recorder":
        from .capture.recorder import Recorder

        return Recorder
    if name == "Run":
        from .run import Run

        return Run
    raise AttributeError(f"module 'freezeframe' has no attribute {name!r}")
