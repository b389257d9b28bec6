"""fastai integration: `FreezeFrame`, a Callback making every training fit a stage, with fastai's facts as data."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastai.callback.core import Callback  # importing freezeframe.fastai imports fastai; `import freezeframe` does not

from .capture.modelmap import unwrap
from .errors import FreezeFrameError
from .integrations.events import guarded_event, warn_stopped
from .integrations.fastai_facts import (
    Call, FastaiOptimizerView, call_arguments, fit_call, freeze_facts, nominal_peaks, reload_at_end,
    scheduled_hypers, stage_label,
)
from .integrations.fastai_grads import KEY as ZERO_GRADS_KEY
from .integrations.fastai_grads import frozen_with_grads
from .integrations.options import check_options

__all__ = ["FreezeFrame"]

# --------------------------------------------------------------------------- the callback
@dataclass
class _Fit:
    """One fit event pair (before_fit .. after_fit) as seen by the callback."""

    depth: int                   # its Call.depth (0: fired from neither fit nor a `with learn:`, e.g. tta)
    training: bool = False
    nominal: list | None = None
    applied: int = 0             # steps applied in this fit
    deferred_skips: int = 0      # cancelled steps before this fit's first applied step
    step_begun: bool = False     # step_begin called for the current batch
    cancelled: bool = False      # after_cancel_step seen for the current batch


@dataclass
class _State:
    rec: object = None           # the Recorder, created at the first training fit
    view: FastaiOptimizerView | None = None
    fits: list = field(default_factory=list)
    next_name: str | None = None
    next_meta: dict | None = None
    fine_tune: tuple | None = None  # (fine_tune frame id, name, call meta) between its two halves
    last_opt: object = None      # learn.opt and its hypers at the end of the last training fit
    last_hypers: object = None
    last_method: str | None = None  # the Learner method of this callback's last training fit
    sessions: int = 0
    failed: bool = False


class FreezeFrame(Callback):
    """Record what every optimizer step of a fastai `Learner` does to every parameter tensor.

    `learn = vision_learner(dls, resnet34, cbs=FreezeFrame("runs/pets"))`: each training `fit*`
    call becomes a stage named after the call (`fit_one_cycle(4)`, `fine_tune(4) · frozen`),
    `lr_find` a trial stage; validate/get_preds/summary are no stage. Options are those of
    `freezeframe.watch` (`every`, `mode`, `budget`, `reference`, ...). Read the run with
    `freezeframe.load(run_dir)` between fits or after training.
    """

    # After fastai's step-changing callbacks (GradientAccumulation 6, MixedPrecision 10,
    # GradientClip 11: a step they cancel never reaches before_step here), after the
    # ParamSchedulers (60) and after SaveModelCallback (61) and every other tracker, so that a
    # stage's end is taken after every other callback's after_fit.
    order = 100
    run_valid = False  # no inner-loop event of validation is needed
    _stateattrs = ("_ff",)  # never pickled with learn.export(): a recorder holds threads and files

    def __init__(self, run_dir, *, every: int | None = None, mode: str = "append", **options):
        super().__init__()
        check_options(mode, every, options)  # refused now, not at the first fit
        self.run_dir = Path(run_dir)
        self.every = every
        self.mode = mode
        self.options = dict(options)
        self._init_state()

    def _init_state(self):
        super()._init_state()
        object.__setattr__(self, "_ff", _State())

    # fastai sets `cb.learn` when the callback is added to a Learner and None when it is removed
    # (also at the end of `fit(cbs=...)`): a detached callback's recording session ends there.
    @property
    def learn(self):
        return self.__dict__.get("_ff_learn")

    @learn.setter
    def learn(self, value):
        old = self.__dict__.get("_ff_learn")
        self.__dict__["_ff_learn"] = value
        if old is not None and value is not old and "_ff" in self.__dict__:
            try:
                self.close()
            except Exception as e:  # noqa: BLE001 - never break fastai's add_cb / remove_cb
                self._ff_fail("closing on detach", e)

    # ------------------------------------------------------------------ public API
    def name_next(self, name: str | None = None, *, meta: dict | None = None) -> "FreezeFrame":
        """Name the stage of the next training fit (both halves of a `fine_tune`: "<name> ·
        frozen" / "<name> · unfrozen") and/or add facts to its `meta` (e.g. `{"reload_requested":
        True}` after loading weights on purpose, so that the new start is not reported as a
        discontinuity). Returns the callback."""
        if name is not None and (not isinstance(name, str) or not name):
            raise FreezeFrameError(f"a stage name must be a non-empty string, got {name!r}")
        if meta is not None and not isinstance(meta, dict):
            raise FreezeFrameError(f"meta must be a dict, got {type(meta).__name__}")
        self._ff.next_name = name
        self._ff.next_meta = dict(meta) if meta else None
        return self

    def close(self) -> None:
        """End this recording session: everything on disk, the run marked complete, every hook
        removed. A later training fit starts a new session on the same run directory."""
        self._ff.fits.clear()
        self._close_recorder()

    def __repr__(self) -> str:
        return f"FreezeFrame({str(self.run_dir)!r})"

    # ------------------------------------------------------------------ events
    @guarded_event
    def before_fit(self):
        learn = self.learn
        call = fit_call(learn)
        ff = self._ff
        if call.depth:
            # Contexts as deep as this one whose after_fit never came (an exception other than
            # fastai's Cancel* ended that fit) are stale.
            ff.fits[:] = [f for f in ff.fits if not f.depth or f.depth < call.depth]
        fit = _Fit(depth=call.depth)
        ff.fits.append(fit)
        if call.entry == "fit":
            self._open_stage(fit, call)
        elif ff.rec is not None:
            ff.rec.set_counting(False)  # validate / get_preds / summary: no stage, passes not counted

    @guarded_event
    def before_train(self):
        fit = self._current()
        if fit is not None and not fit.training:
            # Not recognised as Learner.fit from the stack (a subclass, a future fastai), but it trains.
            self._open_stage(fit, fit_call(self.learn))
            self._ff.rec.epoch()  # this epoch's before_epoch came before the stage

    @guarded_event
    def before_epoch(self):
        fit = self._current()
        if fit is not None and fit.training and self._ff.rec is not None:
            self._ff.rec.epoch()  # the stage states the epochs it ran (docs/fastai.md)

    @guarded_event
    def before_batch(self):
        fit = self._current()
        if fit is not None:
            fit.step_begun = fit.cancelled = False

    @guarded_event
    def before_step(self):
        fit = self._current()
        if fit is not None and fit.training and self._ff.rec is not None:
            self._ff.rec.step_begin(0)
            fit.step_begun = True

    @guarded_event
    def after_cancel_step(self):
        fit = self._current()
        if fit is not None:
            fit.cancelled = True

    @guarded_event
    def after_step(self):
        """Fires for applied and cancelled steps alike (after_cancel_step tells them apart)."""
        fit = self._current()
        rec = self._ff.rec
        if fit is None or not fit.training or rec is None:
            return
        if fit.cancelled:
            if fit.step_begun or fit.applied:
                rec.step_skipped(0)
            else:
                # The fit's stage only begins at its first applied step: count the skip there.
                fit.deferred_skips += 1
        else:
            rec.step_end(0)
            fit.applied += 1
            for _ in range(fit.deferred_skips):
                rec.step_skipped(0)
            fit.deferred_skips = 0
            loss = getattr(self.learn, "loss", None)
            if loss is not None:
                rec.log(loss=loss)  # a CPU-GPU sync, as fastai's own Recorder makes each batch
        fit.step_begun = fit.cancelled = False

    @guarded_event
    def after_cancel_batch(self):
        """GradientAccumulation (CancelBatchException): no step was applied or skipped; the
        gradients keep accumulating into the next applied step."""
        fit = self._current()
        if fit is not None:
            fit.step_begun = fit.cancelled = False

    @guarded_event
    def after_fit(self):
        ff = self._ff
        fit = self._pop_fit(fit_call(self.learn).depth)
        if fit is None:
            return  # its before_fit never reached us (cancelled by an earlier callback)
        outer = self._current()
        rec = ff.rec
        if rec is None:
            return
        if fit.training:
            rec.end_stage()  # every other after_fit has run: this is the model as the fit returns
            opt = self.learn.opt
            ff.last_opt, ff.last_hypers = opt, getattr(opt, "hypers", None)
        if ff.view is not None:
            ff.view.nominal = outer.nominal if outer is not None else None
        rec.set_counting(bool(outer is not None and outer.training))
        if fit.training:
            rec.settle()  # a Learner has no "closed" event: the run is readable between fits

    # ------------------------------------------------------------------ internals
    def _current(self) -> _Fit | None:
        fits = self._ff.fits
        return fits[-1] if fits else None

    def _pop_fit(self, depth: int) -> _Fit | None:
        fits = self._ff.fits
        if not depth:
            return fits.pop() if fits and not fits[-1].depth else None
        while fits and fits[-1].depth and fits[-1].depth > depth:
            fits.pop()  # stale: inner fits whose after_fit never came
        if fits and fits[-1].depth == depth:
            return fits.pop()
        return None

    def _close_recorder(self) -> None:
        ff = self._ff
        rec, ff.rec, ff.view = ff.rec, None, None
        if rec is not None:
            rec.close()

    def _ensure_recorder(self):
        ff = self._ff
        learn = self.learn
        model = unwrap(learn.model)
        if ff.rec is not None and ff.rec.model is model:
            return ff.rec
        if ff.rec is not None:  # learn.model was replaced: a new session on the same run
            self._close_recorder()
        import fastai

        from .capture.recorder import Recorder

        versions = {"fastai": getattr(fastai, "__version__", None)}
        fastcore = sys.modules.get("fastcore")
        if fastcore is not None:
            versions["fastcore"] = getattr(fastcore, "__version__", None)
        options = {**self.options, "framework": "fastai", "skips_known": True,
                   "framework_versions": {**self.options.get("framework_versions", {}), **versions}}
        view = FastaiOptimizerView(learn)
        mode = self.mode if ff.sessions == 0 else "append"  # "new"/"overwrite" apply to this callback's first session
        ff.rec = Recorder(model, [view], self.run_dir, every=self.every, mode=mode, **options)
        ff.view = view
        ff.sessions += 1
        ff.last_opt = ff.last_hypers = ff.last_method = None
        return ff.rec

    def _open_stage(self, fit: _Fit, call: Call) -> None:
        ff = self._ff
        learn = self.learn
        reload_between = (ff.last_opt is not None and learn.opt is ff.last_opt
                          and _is_fastai_optimizer(learn.opt) and learn.opt.hypers is not ff.last_hypers)
        rec = self._ensure_recorder()
        fit.training = True
        name, meta, user_meta = self._stage_name(call)
        kind = "trial" if call.method == "lr_find" else "train"
        meta.update(freeze_facts(learn))
        held = frozen_with_grads(learn, "unknown" if ff.last_method is None
                                 else "lr_find" if ff.last_method == "lr_find" else "earlier fit")
        if held is not None:
            meta[ZERO_GRADS_KEY] = held
        ff.last_method = call.method
        reload = reload_at_end(learn)
        if reload is not None:
            meta["reload_at_end"] = reload
        if reload_between:
            meta["reload_requested"] = True
            meta["reloaded_before"] = "learn.load() replaced the weights and optimizer state after the previous fit"
        hypers = scheduled_hypers(learn)
        if hypers:
            meta["scheduled"] = hypers
        meta.update(user_meta or {})  # the user's own facts (name_next) last
        fit.nominal = nominal_peaks(learn, len(learn.opt.param_lists))
        ff.view.nominal = fit.nominal
        epochs = getattr(learn, "n_epoch", None)
        epochs = int(epochs) if isinstance(epochs, (int, np.integer)) else None
        rec.begin_stage(name, kind=kind, epochs=epochs, meta=meta)
        rec.set_counting(True)

    def _stage_name(self, call: Call) -> tuple[str, dict, dict | None]:
        """The stage's name, the call's facts, and the facts the user gave with name_next."""
        ff = self._ff
        learn = self.learn
        user_name, user_meta = ff.next_name, ff.next_meta
        ff.next_name = ff.next_meta = None
        if call.method == "fine_tune":
            if ff.fine_tune is not None and ff.fine_tune[0] == call.frame_id:
                _, base, call_meta = ff.fine_tune
                ff.fine_tune = None
                return f"{base} · unfrozen", {**call_meta, "half": "unfrozen"}, None
            pos, kw = call_arguments(call, learn)
            base = user_name or stage_label("fine_tune", pos, kw)
            call_meta = {"method": "fine_tune", "args": pos, "kwargs": kw}
            ff.fine_tune = (call.frame_id, base, call_meta)
            return f"{base} · frozen", {**call_meta, "half": "frozen"}, user_meta
        pos, kw = call_arguments(call, learn)
        meta = {"method": call.method, "args": pos, "kwargs": kw}
        return user_name or stage_label(call.method, pos, kw), meta, user_meta

    def _ff_failed(self) -> bool:
        return self._ff.failed

    def _ff_fail(self, where: str, exc: BaseException) -> None:
        ff = self._ff
        ff.failed = True
        warn_stopped(self.run_dir, "fastai", where, exc)
        rec, ff.rec = ff.rec, None
        if rec is not None:
            try:
                rec.close(complete=False)
            except Exception:  # noqa: BLE001 - the recorder turns its own errors into a warning
                pass


def _is_fastai_optimizer(opt) -> bool:
    mod = sys.modules.get("fastai.optimizer")
    return mod is not None and isinstance(opt, mod.Optimizer)
