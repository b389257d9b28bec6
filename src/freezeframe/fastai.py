"""fastai integration: `FreezeFrame`, a Callback making every training fit a stage, with fastai's facts as data."""

from __future__ import annotations

from fastai.callback.core import Callback  # importing freezeframe.fastai imports fastai; `import freezeframe` does not

from .integrations.adapter import SessionCallback, StageSession
from .integrations.events import guarded_event
from .integrations.fastai_facts import Call, fit_call, nominal_peaks
from .integrations.fastai_fits import Fit, FitState, epoch_values, recorded_epochs

__all__ = ["FreezeFrame"]


class FreezeFrame(SessionCallback, Callback):
    """Record what every optimizer step of a fastai `Learner` does to every parameter tensor.

    `learn = vision_learner(dls, resnet34, cbs=FreezeFrame("runs/pets"))`: each training `fit*`
    call becomes a stage named after the call (`fit_one_cycle(4)`, `fine_tune(4) · frozen`),
    `lr_find` a trial stage; validate/get_preds/summary are no stage. Options are those of
    `freezeframe.watch` (`every`, `mode`, `budget`, `reference`, ...). Read the run with
    `freezeframe.load(run_dir)` between fits or after training. The shared event-to-stage
    mapping is in docs/integrations.md.
    """

    # After fastai's step-changing callbacks (GradientAccumulation 6, MixedPrecision 10,
    # GradientClip 11: a step they cancel never reaches before_step here), after the
    # ParamSchedulers (60) and after SaveModelCallback (61) and every other tracker, so that a
    # stage's end is taken after every other callback's after_fit.
    order = 100
    run_valid = False  # no inner-loop event of validation is needed
    # learn.export() pickles the callback without its fit state; the session drops its recorder
    # (threads and open files) when pickled
    _stateattrs = ("_ff",)

    def __init__(self, run_dir, *, every: int | None = None, mode: str = "append", **options):
        super().__init__()
        self._session = StageSession(run_dir, framework="fastai", label="fastai", every=every, mode=mode,
                                     options=options)  # refused now, not at the first fit
        self._init_state()

    def _init_state(self):
        super()._init_state()
        object.__setattr__(self, "_ff", FitState(self.__dict__.get("_session")))

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
        self._ff.name_next(name, meta)
        return self

    def close(self) -> None:
        """End this recording session: everything on disk, the run marked complete, every hook
        removed. A later training fit starts a new session on the same run directory."""
        self._ff.fits.clear()
        self._ff.view = None
        self._session.close()

    # ------------------------------------------------------------------ events
    @guarded_event
    def before_fit(self):
        call = fit_call(self.learn)
        fit = self._ff.push(call.depth)
        if call.entry == "fit":
            self._open_stage(fit, call)
        elif self._ff.rec is not None:
            self._ff.rec.set_counting(False)  # validate / get_preds / summary: no stage, passes not counted

    @guarded_event
    def before_train(self):
        fit = self._ff.current()
        if fit is not None and not fit.training:
            # Not recognised as Learner.fit from the stack (a subclass, a future fastai), but it trains.
            self._open_stage(fit, fit_call(self.learn))
            self._session.epoch()  # this epoch's before_epoch came before the stage
            self._ff.epochs_before = recorded_epochs(self.learn)

    @guarded_event
    def before_epoch(self):
        if self._ff.training() is not None:
            self._session.epoch()  # the stage states the epochs it ran (docs/fastai.md)
            self._ff.epochs_before = recorded_epochs(self.learn)

    @guarded_event
    def after_epoch(self):
        if self._ff.training() is not None:
            # after fastai's Recorder (order 50) appended this epoch's values (docs/fastai.md)
            self._session.log_epoch(**epoch_values(self.learn, self._ff.epochs_before))

    @guarded_event
    def before_batch(self):
        self._ff.on_current(Fit.new_batch)

    @guarded_event
    def before_step(self):
        if (fit := self._ff.training()) is not None:
            fit.step_begin(self._ff.rec)

    @guarded_event
    def after_cancel_step(self):
        self._ff.on_current(Fit.cancel)

    @guarded_event
    def after_step(self):
        if (fit := self._ff.training()) is not None:
            fit.after_step(self._ff.rec, getattr(self.learn, "loss", None))

    @guarded_event
    def after_cancel_batch(self):
        """GradientAccumulation (CancelBatchException): no step was applied or skipped; the
        gradients keep accumulating into the next applied step."""
        self._ff.on_current(Fit.new_batch)

    @guarded_event
    def after_fit(self):
        ff = self._ff
        fit = ff.pop(fit_call(self.learn).depth)
        if fit is None or ff.rec is None:
            return  # its before_fit never reached us (cancelled by an earlier callback), or no stage yet
        outer = ff.current()
        if fit.training:
            # every other after_fit has run: this is the model as the fit returns; then everything
            # is on disk (a Learner has no "closed" event: the run is readable between fits)
            self._session.end(close=False)
            ff.last_opt, ff.last_hypers = self.learn.opt, getattr(self.learn.opt, "hypers", None)
        if ff.view is not None:
            ff.view.nominal = outer.nominal if outer is not None else None
        ff.rec.set_counting(bool(outer is not None and outer.training))

    # ------------------------------------------------------------------ internals
    def _open_stage(self, fit: Fit, call: Call) -> None:
        ff, learn = self._ff, self.learn
        reload_between = ff.reloaded_between(learn)  # before a new session forgets the last fit
        ff.ensure_open(learn)
        fit.training = True
        name, kind, epochs, meta = ff.stage(call, learn, reload_between)
        fit.nominal = nominal_peaks(learn, len(learn.opt.param_lists))
        ff.view.nominal = fit.nominal
        self._session.begin(name, kind=kind, epochs=epochs, meta=meta)
