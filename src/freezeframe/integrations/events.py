"""The rule every framework callback follows: an internal error in one of its event handlers
becomes one warning, recording stops and training goes on; a FreezeFrameError (bad input, such
as a run directory of another model) is raised to the user."""

from __future__ import annotations

import functools
import sys
import warnings

from ..errors import FreezeFrameError


def guarded_event(fn):
    """Decorate a callback's event handler. The callback provides `_ff_failed()` (recording has
    stopped: handlers do nothing) and `_ff_fail(where, exc)` (stop recording, warn once);
    `adapter.SessionCallback` provides both from its StageSession."""
    @functools.wraps(fn)
    def handler(self, *args, **kwargs):
        if self._ff_failed():
            return None
        try:
            return fn(self, *args, **kwargs)
        except FreezeFrameError:
            raise
        except Exception as e:  # noqa: BLE001
            self._ff_fail(fn.__name__, e)
            return None
    return handler


def warn_stopped(run_dir, framework: str, where: str, exc: BaseException) -> None:
    """The one warning of a callback that stopped recording. It points at the first caller
    outside freezeframe: the framework code that called the event handler."""
    warnings.warn(f"freezeframe stopped recording {str(run_dir)!r} after an internal error in the {framework} "
                  f"callback ({where}): {type(exc).__name__}: {exc}. Training is not affected; steps recorded "
                  "so far are kept.", RuntimeWarning, stacklevel=_first_outside())


def _first_outside() -> int:
    """The stacklevel, for warn_stopped's warnings.warn, of the first frame not in freezeframe."""
    level, f = 1, sys._getframe(1)  # warn_stopped's own frame is stacklevel 1
    while f is not None and f.f_globals.get("__name__", "").partition(".")[0] == "freezeframe":
        level, f = level + 1, f.f_back
    return level
