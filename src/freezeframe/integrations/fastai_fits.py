"""The fits of a fastai `Learner` as the callback sees them (docs/fastai.md): a stack of fit event
pairs (a fit may run inside another: `lr_find`, `get_preds` during training), the steps each
applied or cancelled, a stage's name (the two halves of a `fine_tune`) and its facts. The
callback in freezeframe/fastai.py turns these into StageSession calls."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from ..capture.modelmap import unwrap
from ..errors import FreezeFrameError
from .adapter import StageSession
from .fastai_facts import Call, FastaiOptimizerView, call_arguments, freeze_facts, reload_at_end, \
    scheduled_hypers, stage_label
from .fastai_grads import KEY as ZERO_GRADS_KEY
from .fastai_grads import frozen_with_grads


@dataclass
class Fit:
    """One fit event pair (before_fit .. after_fit) as seen by the callback."""

    depth: int                   # its Call.depth (0: fired from neither fit nor a `with learn:`, e.g. tta)
    training: bool = False
    nominal: list | None = None
    applied: int = 0             # steps applied in this fit
    deferred_skips: int = 0      # cancelled steps before this fit's first applied step
    step_begun: bool = False     # step_begin called for the current batch
    cancelled: bool = False      # after_cancel_step seen for the current batch

    def new_batch(self) -> None:
        self.step_begun = self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def step_begin(self, rec) -> None:
        rec.step_begin(0)
        self.step_begun = True

    def after_step(self, rec, loss) -> None:
        """fastai's after_step fires for applied and cancelled steps alike (after_cancel_step
        tells them apart)."""
        if self.cancelled:
            if self.step_begun or self.applied:
                rec.step_skipped(0)
            else:
                # The fit's stage only begins at its first applied step: count the skip there.
                self.deferred_skips += 1
        else:
            rec.step_end(0)
            self.applied += 1
            for _ in range(self.deferred_skips):
                rec.step_skipped(0)
            self.deferred_skips = 0
            if loss is not None:
                rec.log(loss=loss)  # a CPU-GPU sync, as fastai's own Recorder makes each batch
        self.new_batch()


@dataclass
class FitState:
    """The callback's state while attached to a Learner (never pickled: `_stateattrs`)."""

    session: StageSession | None = None
    view: FastaiOptimizerView | None = None
    fits: list = field(default_factory=list)
    next_name: str | None = None
    next_meta: dict | None = None
    fine_tune: tuple | None = None  # (fine_tune frame id, name, call meta) between its two halves
    last_opt: object = None      # learn.opt and its hypers at the end of the last training fit
    last_hypers: object = None
    last_method: str | None = None  # the Learner method of this callback's last training fit
    epochs_before: int = 0       # len(learn.recorder.values) when the current epoch began

    @property
    def rec(self):
        """The Recorder of the session in progress, created at the first training fit."""
        return self.session.recorder if self.session is not None else None

    def name_next(self, name: str | None, meta: dict | None) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise FreezeFrameError(f"a stage name must be a non-empty string, got {name!r}")
        if meta is not None and not isinstance(meta, dict):
            raise FreezeFrameError(f"meta must be a dict, got {type(meta).__name__}")
        self.next_name = name
        self.next_meta = dict(meta) if meta else None

    def ensure_open(self, learn) -> None:
        """A recording session of learn's model: opened at the first training fit, and again
        (on the same run) when learn.model was replaced."""
        model = unwrap(learn.model)
        if self.rec is None or self.rec.model is not model:
            self.view = FastaiOptimizerView(learn)
            self.session.open(model, [self.view], versions=versions(), skips_known=True)
            self.last_opt = self.last_hypers = self.last_method = None

    def stage(self, call: Call, learn, reload_between: bool) -> tuple[str, str, int | None, dict]:
        """The stage a training fit begins: its name, kind, epochs and meta (the call's facts,
        fastai's facts, then the user's own from name_next)."""
        name, meta, user_meta = self.stage_name(call, learn)
        meta = self.stage_facts(learn, call, meta, reload_between)
        meta.update(user_meta or {})
        epochs = getattr(learn, "n_epoch", None)
        epochs = int(epochs) if isinstance(epochs, (int, np.integer)) else None
        return name, "trial" if call.method == "lr_find" else "train", epochs, meta

    def current(self) -> Fit | None:
        return self.fits[-1] if self.fits else None

    def training(self) -> Fit | None:
        """The current fit when it trains and is recorded."""
        fit = self.current()
        return fit if fit is not None and fit.training and self.rec is not None else None

    def on_current(self, fn) -> None:
        fit = self.current()
        if fit is not None:
            fn(fit)

    def push(self, depth: int) -> Fit:
        if depth:
            # Contexts as deep as this one whose after_fit never came (an exception other than
            # fastai's Cancel* ended that fit) are stale.
            self.fits[:] = [f for f in self.fits if not f.depth or f.depth < depth]
        fit = Fit(depth=depth)
        self.fits.append(fit)
        return fit

    def pop(self, depth: int) -> Fit | None:
        fits = self.fits
        if not depth:
            return fits.pop() if fits and not fits[-1].depth else None
        while fits and fits[-1].depth and fits[-1].depth > depth:
            fits.pop()  # stale: inner fits whose after_fit never came
        if fits and fits[-1].depth == depth:
            return fits.pop()
        return None

    def stage_name(self, call: Call, learn) -> tuple[str, dict, dict | None]:
        """The stage's name, the call's facts, and the facts the user gave with name_next."""
        user_name, user_meta = self.next_name, self.next_meta
        self.next_name = self.next_meta = None
        if call.method == "fine_tune":
            if self.fine_tune is not None and self.fine_tune[0] == call.frame_id:
                _, base, call_meta = self.fine_tune
                self.fine_tune = None
                return f"{base} · unfrozen", {**call_meta, "half": "unfrozen"}, None
            pos, kw = call_arguments(call, learn)
            base = user_name or stage_label("fine_tune", pos, kw)
            call_meta = {"method": "fine_tune", "args": pos, "kwargs": kw}
            self.fine_tune = (call.frame_id, base, call_meta)
            return f"{base} · frozen", {**call_meta, "half": "frozen"}, user_meta
        pos, kw = call_arguments(call, learn)
        meta = {"method": call.method, "args": pos, "kwargs": kw}
        return user_name or stage_label(call.method, pos, kw), meta, user_meta

    def stage_facts(self, learn, call: Call, meta: dict, reload_between: bool) -> dict:
        """fastai's facts about the stage a training fit begins, added to the call's `meta`."""
        meta.update(freeze_facts(learn))
        held = frozen_with_grads(learn, "unknown" if self.last_method is None
                                 else "lr_find" if self.last_method == "lr_find" else "earlier fit")
        if held is not None:
            meta[ZERO_GRADS_KEY] = held
        self.last_method = call.method
        reload = reload_at_end(learn)
        if reload is not None:
            meta["reload_at_end"] = reload
        if reload_between:
            meta["reload_requested"] = True
            meta["reloaded_before"] = "learn.load() replaced the weights and optimizer state after the previous fit"
        hypers = scheduled_hypers(learn)
        if hypers:
            meta["scheduled"] = hypers
        return meta

    def reloaded_between(self, learn) -> bool:
        """learn.load() replaced the optimizer's state since the last training fit: the same
        fastai optimizer with new hypers."""
        return (self.last_opt is not None and learn.opt is self.last_opt
                and is_fastai_optimizer(learn.opt) and learn.opt.hypers is not self.last_hypers)


def recorded_epochs(learn) -> int:
    """How many epochs' values fastai's Recorder holds (`learn.recorder.values`)."""
    return len(getattr(getattr(learn, "recorder", None), "values", None) or [])


def epoch_values(learn, before: int) -> dict:
    """The values fastai's Recorder appended for the epoch that just ended (its after_epoch,
    order 50, ran before the callback's): `learn.recorder.values[-1]` under the Recorder's own
    names (`metric_names` without `epoch` and `time`: train_loss, valid_loss, each metric);
    nothing when it appended none since `before` (`recorded_epochs` at the epoch's start). An
    epoch whose training or validation was cancelled (CancelTrainException,
    CancelValidException) has only the other half's values: they keep their own names. A value
    the Recorder left empty (no validation set) is left out, and so is every value of a row
    whose length matches no reading of the names."""
    if recorded_epochs(learn) <= before:
        return {}
    recorder = learn.recorder
    row = list(recorder.values[-1])
    names = [str(n) for n in getattr(recorder, "metric_names", []) if n not in ("epoch", "time")]
    # the Recorder's layout (fastai.learner.Recorder): the training half (the smoothed loss, and
    # the metrics with train_metrics), then the validation half (the loss and the metrics)
    metrics = len(getattr(recorder, "metrics", None) or [])
    n_train = 1 + (metrics if getattr(recorder, "train_metrics", False) else 0)
    n_valid = 1 + metrics if getattr(recorder, "valid_metrics", True) else 0
    labels = ([] if getattr(recorder, "cancel_train", False) else names[:n_train]) + \
             ([] if getattr(recorder, "cancel_valid", False) else names[n_train:n_train + n_valid])
    if len(labels) != len(row):
        return {}
    return {n: v for n, v in zip(labels, row) if v is not None}


def is_fastai_optimizer(opt) -> bool:
    mod = sys.modules.get("fastai.optimizer")
    return mod is not None and isinstance(opt, mod.Optimizer)


def versions() -> dict:
    """The versions of fastai (and fastcore) running the fit."""
    import fastai

    out = {"fastai": getattr(fastai, "__version__", None)}
    fastcore = sys.modules.get("fastcore")
    if fastcore is not None:
        out["fastcore"] = getattr(fastcore, "__version__", None)
    return out
