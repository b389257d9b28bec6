"""fastai integration: `FreezeFrame`, a Callback making every training fit a stage, with fastai's facts as data."""

from __future__ import annotations

import functools
import math
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastai.callback.core import Callback  # importing freezeframe.fastai imports fastai; `import freezeframe` does not

from .capture.modelmap import unwrap
from .capture.optim import OptimizerView
from .capture.session import Options
from .errors import FreezeFrameError
from .store.writer import MODES

__all__ = ["FreezeFrame"]

# Learner methods that call `Learner.fit` and give a stage its name (the outermost one wins:
# fine_tune over fit_one_cycle). Looked up on the class when used: fastai adds the schedule
# methods to Learner only when fastai.callback.schedule is imported.
_SCHEDULE_METHODS = ("fit_one_cycle", "fit_flat_cos", "fit_sgdr", "fine_tune", "lr_find")
# Parameters never shown in a stage name.
_HIDDEN = frozenset({"self", "cbs", "show_plot", "suggest_funcs"})
# Methods whose lr argument fastai resolves to one value per group before calling fit (a slice
# becomes the per-group list); the frame local then holds the resolved np.array.
_RESOLVED_LR = {"fit_one_cycle": "lr_max", "fit_sgdr": "lr_max", "fit_flat_cos": "lr"}

_NORM_TRAINS_REASON = ("fastai train_bn=True keeps the norm layers (BatchNorm) of frozen groups trainable "
                       "(optimizer state force_train)")
_NORM_FROZEN_REASON = ("fastai train_bn=False freezes the norm layers of frozen groups with the rest of the group; "
                       "their running statistics still update in train mode")


# --------------------------------------------------------------------------- the optimizer, as the recorder reads it
class FastaiOptimizerView(OptimizerView):
    """fastai's optimizer (`Optimizer` or `OptimWrapper`) of a Learner: its layer groups
    (`param_lists`), its per-group hyperparameters, and the nominal lr peak the running
    ParamScheduler was built for. Reads `learn.opt` afresh each time (fastai may replace it)."""

    hookable = None  # fastai's optimizer has no torch step hooks: the callback calls the recorder

    def __init__(self, learn):
        # Weakly: a recorder nobody closed must not keep the whole Learner (its data) alive.
        self._learn = weakref.ref(learn)
        self.nominal: list[float | None] | None = None  # per group, for the running fit

    @property
    def opt(self):
        return self._learn().opt

    def groups(self):
        return [(None, list(pl)) for pl in self.opt.param_lists]

    def membership_key(self) -> tuple:
        return tuple(tuple(map(id, pl)) for pl in self.opt.param_lists)

    def hypers(self):
        nominal = self.nominal
        out = []
        for g, h in enumerate(self.opt.hypers):
            peak = nominal[g] if nominal is not None and g < len(nominal) else None
            out.append((_float(h.get("lr")), _float(h.get("mom")), _float(h.get("wd")), peak))
        return out


def _float(v) -> float | None:
    if v is None or isinstance(v, (str, bytes)):
        return None
    if isinstance(v, (tuple, list)):
        return _float(v[0]) if v else None
    try:
        return float(v)  # np.float64 under a ParamScheduler, float otherwise; never a tensor here
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- what the stack says about a fit
@dataclass
class _Call:
    entry: str | None          # "fit" (Learner.fit: trains), "enter" (validate/get_preds/summary), None
    depth: int                 # Learner.fit / __enter__ / __exit__ frames of this learner on the stack
    method: str = "fit"        # the outermost schedule method calling this fit, else "fit"
    fn: object = None          # that method's function
    f_locals: dict = field(default_factory=dict)  # its live arguments (fastai rebinds some to resolved values)
    frame_id: int | None = None


def _fit_call(learn) -> _Call:
    """Walk the stack outward from the event: the innermost `Learner.fit` frame (training) or
    `Learner.__enter__`/`__exit__` frame (validate/get_preds/summary) of `learn` says what fired
    it; the schedule methods between it and the next such frame out name the fit; the number of
    such frames pairs a before_fit with its after_fit."""
    from fastai.learner import Learner

    entries = {Learner.fit.__code__: "fit", Learner.__enter__.__code__: "enter", Learner.__exit__.__code__: "enter"}
    methods = {}
    for name in _SCHEDULE_METHODS:
        fn = getattr(Learner, name, None)
        code = getattr(fn, "__code__", None)
        if code is not None:
            methods[code] = (name, fn)
    call = _Call(entry=None, depth=0)
    f = sys._getframe(1)
    while f is not None:
        code = f.f_code
        if (code in entries or code in methods) and f.f_locals.get("self") is learn:
            if code in entries:
                call.depth += 1
                if call.entry is None:
                    call.entry = entries[code]
                    if call.entry == "fit":
                        call.f_locals, call.frame_id = dict(f.f_locals), id(f)
            elif call.depth == 1 and call.entry == "fit":
                call.method, call.fn = methods[code]
                call.f_locals, call.frame_id = dict(f.f_locals), id(f)
        f = f.f_back
    if call.fn is None:
        call.fn = Learner.fit
    return call


def _plain(v):
    """A JSON-able plain value (np arrays as lists of floats), or the _SKIP marker."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else _SKIP
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.ndim else _plain(v.item())
    if isinstance(v, (list, tuple)):
        out = [_plain(x) for x in v]
        if any(x is _SKIP for x in out):
            return _SKIP
        return tuple(out) if isinstance(v, tuple) else out  # a tuple shows as the user wrote it
    return _SKIP


class _Skip:
    pass


_SKIP = _Skip()


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, list):
        if v and all(x == v[0] for x in v) and not isinstance(v[0], list):
            return _fmt(v[0])  # one value for every group
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v)


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        eq = a == b
        if isinstance(eq, np.ndarray):
            return np.shape(a) == np.shape(b) and bool(eq.all())
        return bool(eq)
    except Exception:  # noqa: BLE001 - incomparable: show it
        return False


def _call_arguments(call: _Call, learn) -> tuple[list, dict]:
    """The arguments a stage name shows: positional ones, then keyword ones whose value fastai
    resolved to something other than the default's resolution (a slice: the per-group list)."""
    fn = call.fn
    code = fn.__code__
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    defaults = dict(zip(code.co_varnames[code.co_argcount - len(fn.__defaults__ or ()):code.co_argcount],
                        fn.__defaults__ or ()))
    defaults.update(fn.__kwdefaults__ or {})
    loc = call.f_locals
    pos, kw = [], {}
    for name in names:
        if name in _HIDDEN or name not in loc:
            continue
        v = loc[name]
        if name not in defaults:
            value = _plain(v)
            if value is not _SKIP:
                pos.append(value)
            continue
        if _RESOLVED_LR.get(call.method) == name:
            value = _plain(v)
            if isinstance(value, list) and all(x == learn.lr for x in value):
                continue  # lr_max=None: fastai used learn.lr for every group
        elif call.method == "fit" and name == "lr":
            if v is None:
                continue
            value = [_plain(h.get("lr")) for h in learn.opt.hypers]  # fit set them from `lr` (a slice: per group)
        else:
            if _same(v, defaults[name]):
                continue
            value = _plain(v)
        if value is not _SKIP:
            kw[name] = value
    extra = loc.get("kwargs")  # fine_tune passes **kwargs on to fit_one_cycle
    if isinstance(extra, dict):
        for name, v in extra.items():
            value = _plain(v)
            if name not in _HIDDEN and value is not _SKIP:
                kw[name] = value
    return pos, kw


def _stage_label(method: str, pos: list, kw: dict) -> str:
    args = [_fmt(v) for v in pos] + [f"{k}={_fmt(v)}" for k, v in kw.items()]
    return f"{method}({', '.join(args)})"


# --------------------------------------------------------------------------- the nominal lr peak of a schedule
def _nominal_peaks(learn, n_groups: int) -> list[float | None] | None:
    """The peak lr per group that the ParamScheduler setting `lr` was built for (fit_one_cycle's
    lr_max, fit_flat_cos's lr, fit_sgdr's lr_max, LRFinder's end_lr), read from the schedule it
    holds — never from opt.hypers, which fit has just reset. None when no schedule states it."""
    mod = sys.modules.get("fastai.callback.schedule")
    if mod is None:
        return None
    scheds = [cb for cb in learn.cbs.sorted("order")
              if isinstance(cb, mod.ParamScheduler) and "lr" in (getattr(cb, "scheds", None) or {})]
    if not scheds:
        return None
    peak = _peak(scheds[-1].scheds["lr"], mod)  # the last one to set lr in before_batch wins
    if peak is None:
        return None
    try:
        arr = np.broadcast_to(np.asarray(peak, dtype=np.float64), (n_groups,))
    except (ValueError, TypeError):
        return None
    return [float(x) if math.isfinite(x) else None for x in arr]


def _closure(fn) -> dict:
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def _peak(f, mod, depth: int = 0):
    """Elementwise peak of a fastai schedule: monotone annealers peak at an end; combine_scheds
    peaks at the largest peak of its parts. None for a schedule of unknown shape."""
    if depth > 16:
        return None
    if isinstance(f, mod._Annealer):
        if f.f is mod.sched_no:
            return np.asarray(f.start, dtype=np.float64)
        if f.f in (mod.sched_lin, mod.sched_cos, mod.sched_exp):
            return np.maximum(np.asarray(f.start, dtype=np.float64), np.asarray(f.end, dtype=np.float64))
        return None
    qual = getattr(f, "__qualname__", "")
    if qual.startswith("combine_scheds.") and hasattr(f, "__code__"):
        parts = _closure(f).get("scheds")
        if not parts:
            return None
        peaks = [_peak(s, mod, depth + 1) for s in parts]
        if any(p is None for p in peaks):
            return None
        return functools.reduce(np.maximum, peaks)
    if qual.startswith("SchedPoly.") and hasattr(f, "__code__"):
        nl = _closure(f)
        if "start" in nl and "end" in nl:
            return np.maximum(np.asarray(nl["start"], dtype=np.float64), np.asarray(nl["end"], dtype=np.float64))
    return None


# --------------------------------------------------------------------------- fastai's facts about a stage
def _freeze_facts(learn) -> dict:
    """Freeze state as fastai defines it: the frozen groups (`opt.frozen_idx`), and the norm-layer
    tensors of frozen groups that train anyway (`train_bn=True` sets `force_train` in the
    optimizer state) or stay frozen with their group (`train_bn=False`)."""
    opt = learn.opt
    frozen_idx = int(getattr(opt, "frozen_idx", 0) or 0)
    frozen = list(range(min(frozen_idx, len(opt.param_lists))))
    train_bn = bool(getattr(learn, "train_bn", True))
    facts = {"frozen_idx": frozen_idx, "frozen_groups": frozen, "train_bn": train_bn}
    if not frozen:
        return facts
    model = unwrap(learn.model)
    names = {id(p): name for name, p in model.named_parameters()}
    norm = {id(p) for p in sys.modules["fastai.torch_core"].norm_bias_params(model, with_bias=False)}
    state = opt.state
    in_frozen = [p for g in frozen for p in opt.param_lists[g] if id(p) in norm and id(p) in names]
    forced = [names[id(p)] for p in in_frozen if (state.get(p) or {}).get("force_train")]
    held = [names[id(p)] for p in in_frozen if not (state.get(p) or {}).get("force_train")]
    if forced:
        facts["norm_trains"] = forced
        facts["norm_trains_reason"] = _NORM_TRAINS_REASON
    if held:
        facts["norm_frozen"] = held
        facts["norm_frozen_reason"] = _NORM_FROZEN_REASON if not train_bn else \
            "norm layers of frozen groups without fastai's force_train flag are frozen with their group"
    return facts


def _reload_at_end(learn) -> dict | None:
    """A callback that will replace the weights at the end of this fit, before the stage's end is
    taken (LRFinder restoring the model, SaveModelCallback loading the best epoch)."""
    schedule = sys.modules.get("fastai.callback.schedule")
    tracker = sys.modules.get("fastai.callback.tracker")
    if schedule is not None and any(isinstance(cb, schedule.LRFinder) for cb in learn.cbs):
        return {"by": "LRFinder", "what": "the weights and optimizer state from before lr_find"}
    if tracker is not None:
        for cb in learn.cbs:
            # TrackerCallback.before_fit (order 60) has set `run`: False during lr_find / get_preds
            if (isinstance(cb, tracker.SaveModelCallback) and getattr(cb, "run", True)
                    and not cb.at_end and not cb.every_epoch):
                return {"by": "SaveModelCallback", "what": "the best epoch's weights", "fname": str(cb.fname),
                        "monitor": str(cb.monitor), "with_opt": bool(cb.with_opt)}
    return None


def _scheduled(learn) -> list[str] | None:
    """The hyperparameters the running ParamScheduler(s) set at every batch."""
    schedule = sys.modules.get("fastai.callback.schedule")
    if schedule is None:
        return None
    keys = {k for cb in learn.cbs if isinstance(cb, schedule.ParamScheduler)
            for k in (getattr(cb, "scheds", None) or {})}
    return sorted(keys) or None


# --------------------------------------------------------------------------- the callback
@dataclass
class _Fit:
    """One fit event pair (before_fit .. after_fit) as seen by the callback."""

    depth: int                   # its _Call.depth (0: fired from neither fit nor a `with learn:`, e.g. tta)
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
    sessions: int = 0
    failed: bool = False


def _event(fn):
    """Run an event handler; an internal error becomes one warning and recording stops (training
    goes on). A FreezeFrameError (bad input: a run directory of another model) is raised."""
    @functools.wraps(fn)
    def handler(self):
        ff = self._ff
        if ff.failed:
            return
        try:
            fn(self)
        except FreezeFrameError:
            raise
        except Exception as e:  # noqa: BLE001
            self._ff_fail(fn.__name__, e)
    return handler


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
        if mode not in MODES:
            raise FreezeFrameError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise FreezeFrameError(f"every must be a positive integer or None, got {every!r}")
        Options.from_kwargs(options)  # an unknown option is refused now, not at the first fit
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
    @_event
    def before_fit(self):
        learn = self.learn
        call = _fit_call(learn)
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

    @_event
    def before_train(self):
        fit = self._current()
        if fit is not None and not fit.training:
            # Not recognised as Learner.fit from the stack (a subclass, a future fastai), but it trains.
            self._open_stage(fit, _fit_call(self.learn))

    @_event
    def before_batch(self):
        fit = self._current()
        if fit is not None:
            fit.step_begun = fit.cancelled = False

    @_event
    def before_step(self):
        fit = self._current()
        if fit is not None and fit.training and self._ff.rec is not None:
            self._ff.rec.step_begin(0)
            fit.step_begun = True

    @_event
    def after_cancel_step(self):
        fit = self._current()
        if fit is not None:
            fit.cancelled = True

    @_event
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

    @_event
    def after_cancel_batch(self):
        """GradientAccumulation (CancelBatchException): no step was applied or skipped; the
        gradients keep accumulating into the next applied step."""
        fit = self._current()
        if fit is not None:
            fit.step_begun = fit.cancelled = False

    @_event
    def after_fit(self):
        ff = self._ff
        fit = self._pop_fit(_fit_call(self.learn).depth)
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
        ff.last_opt = ff.last_hypers = None
        return ff.rec

    def _open_stage(self, fit: _Fit, call: _Call) -> None:
        ff = self._ff
        learn = self.learn
        reload_between = (ff.last_opt is not None and learn.opt is ff.last_opt
                          and _is_fastai_optimizer(learn.opt) and learn.opt.hypers is not ff.last_hypers)
        rec = self._ensure_recorder()
        fit.training = True
        name, meta, user_meta = self._stage_name(call)
        kind = "trial" if call.method == "lr_find" else "train"
        meta.update(_freeze_facts(learn))
        reload = _reload_at_end(learn)
        if reload is not None:
            meta["reload_at_end"] = reload
        if reload_between:
            meta["reload_requested"] = True
            meta["reloaded_before"] = "learn.load() replaced the weights and optimizer state after the previous fit"
        scheduled = _scheduled(learn)
        if scheduled:
            meta["scheduled"] = scheduled
        meta.update(user_meta or {})  # the user's own facts (name_next) last
        fit.nominal = _nominal_peaks(learn, len(learn.opt.param_lists))
        ff.view.nominal = fit.nominal
        epochs = getattr(learn, "n_epoch", None)
        epochs = int(epochs) if isinstance(epochs, (int, np.integer)) else None
        rec.begin_stage(name, kind=kind, epochs=epochs, meta=meta)
        rec.set_counting(True)

    def _stage_name(self, call: _Call) -> tuple[str, dict, dict | None]:
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
            pos, kw = _call_arguments(call, learn)
            base = user_name or _stage_label("fine_tune", pos, kw)
            call_meta = {"method": "fine_tune", "args": pos, "kwargs": kw}
            ff.fine_tune = (call.frame_id, base, call_meta)
            return f"{base} · frozen", {**call_meta, "half": "frozen"}, user_meta
        pos, kw = _call_arguments(call, learn)
        meta = {"method": call.method, "args": pos, "kwargs": kw}
        return user_name or _stage_label(call.method, pos, kw), meta, user_meta

    def _ff_fail(self, where: str, exc: BaseException) -> None:
        ff = self._ff
        ff.failed = True
        warnings.warn(f"freezeframe stopped recording {str(self.run_dir)!r} after an internal error in the fastai "
                      f"callback ({where}): {type(exc).__name__}: {exc}. Training is not affected; steps recorded "
                      "so far are kept.", RuntimeWarning, stacklevel=3)
        rec, ff.rec = ff.rec, None
        if rec is not None:
            try:
                rec.close(complete=False)
            except Exception:  # noqa: BLE001 - the recorder turns its own errors into a warning
                pass


def _is_fastai_optimizer(opt) -> bool:
    mod = sys.modules.get("fastai.optimizer")
    return mod is not None and isinstance(opt, mod.Optimizer)
