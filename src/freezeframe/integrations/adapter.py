"""The event-to-stage mapping every framework callback shares (docs/integrations.md): a callback
translates its framework's events into these calls and keeps only what its framework differs in.

    training begins  -> StageSession.open(model, optimizers, versions=...) then .begin(name, ...)
    an epoch begins  -> .epoch()
    an epoch's values -> .log_epoch(**scalars)
    a step           -> the optimizer's own step hooks (or Recorder.step_begin/step_end)
    training ends    -> .end(close=...)
    an unfreeze      -> nothing: a change of the trainable set inside a stage starts "<name> (part 2)"

A recording error in any event becomes one warning (`fail`), recording stops and training goes on;
a FreezeFrameError (bad input such as a run directory of another model) reaches the user."""

from __future__ import annotations

from pathlib import Path

from .events import warn_stopped
from .options import check_options


class StageSession:
    """One callback's recording of one run directory: the options are checked when the callback
    is built; each `open` starts a recording session (the first with `mode`, later ones append).
    A copy made by pickling starts afresh: no recorder, its first session uses `mode` again."""

    def __init__(self, run_dir, *, framework: str, label: str, every: int | None = None,
                 mode: str = "append", options: dict | None = None):
        options = dict(options or {})
        check_options(mode, every, options)  # refused when the callback is built, not at the first fit
        self.run_dir = Path(run_dir)
        self.framework = framework   # the manifest's `framework`
        self.label = label           # how the warning names the framework ("Lightning")
        self.every = every
        self.mode = mode
        self.options = options
        self._reset()

    def _reset(self) -> None:
        self.recorder = None
        self.sessions = 0
        self.failed = False

    def __getstate__(self) -> dict:
        # a recorder holds threads and open files: a pickled callback carries its options only
        return {k: v for k, v in self.__dict__.items() if k not in ("recorder", "sessions", "failed")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def open(self, model, optimizers, *, versions: dict | None = None, **extra):
        """Start a recording session of `model` (closing one left open). `extra` are recorder
        options the integration sets (scaler, skips_known); they override the user's options."""
        from ..capture.recorder import Recorder

        self.close()
        options = {**self.options, **extra, "framework": self.framework,
                   "framework_versions": {**self.options.get("framework_versions", {}), **(versions or {})}}
        mode = self.mode if self.sessions == 0 else "append"
        self.recorder = Recorder(model, list(optimizers), self.run_dir, every=self.every, mode=mode, **options)
        self.sessions += 1
        return self.recorder

    def begin(self, name: str, *, kind: str = "train", epochs: int | None = None, meta: dict | None = None) -> None:
        """A training call begins: an explicit stage with the framework's facts."""
        rec = self.recorder
        if rec is not None:
            rec.begin_stage(name, kind=kind, epochs=epochs, meta=meta)
            rec.set_counting(True)

    def epoch(self) -> None:
        """A training epoch begins: the stage states the epochs it ran (docs/recording.md)."""
        if self.recorder is not None:
            self.recorder.epoch()

    def log_epoch(self, **scalars) -> None:
        """Scalars of the epoch begun last (train_loss, valid_loss, metrics): the stage's
        `epoch_metrics` (docs/recording.md)."""
        if self.recorder is not None:
            self.recorder.log_epoch(**scalars)

    def end(self, *, close: bool, observed: bool = True) -> None:
        """The training call ended: its end state is hashed now; then the session closes
        (`close`) or stays open with everything on disk (`settle`: readable between fits)."""
        rec = self.recorder
        if rec is None:
            return
        rec.end_stage(observed=observed)
        if close:
            self.close()
        else:
            rec.settle()

    def close(self, complete: bool = True) -> None:
        rec, self.recorder = self.recorder, None
        if rec is not None:
            rec.close(complete=complete)  # the recorder turns its own errors into a warning

    def fail(self, where: str, exc: BaseException) -> None:
        """Stop recording after an internal error: one warning, what was recorded is kept."""
        self.failed = True
        warn_stopped(self.run_dir, self.label, where, exc)
        try:
            self.close(complete=False)
        except Exception:  # noqa: BLE001
            pass


class SessionCallback:
    """What a framework callback built on a StageSession (kept as `_session`) has in common:
    the options it was built with, its repr, and the pair `guarded_event` calls."""

    _session: StageSession

    @property
    def run_dir(self) -> Path:
        return self._session.run_dir

    @property
    def every(self) -> int | None:
        return self._session.every

    @property
    def mode(self) -> str:
        return self._session.mode

    @property
    def options(self) -> dict:
        return self._session.options

    def __repr__(self) -> str:
        return f"FreezeFrame({str(self.run_dir)!r})"

    def _ff_failed(self) -> bool:
        return self._session.failed

    def _ff_fail(self, where: str, exc: BaseException) -> None:
        self._session.fail(where, exc)
