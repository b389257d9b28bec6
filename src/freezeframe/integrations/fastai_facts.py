"""What a fastai `Learner` says about the fit that is running, read for the recorder: the optimizer
(param groups, per-group hyperparameters, the nominal lr peak of the schedule), the `fit*` call
found on the call stack with its resolved arguments (a stage's name), the freeze facts (train_bn,
force_train), and reloads at the end of a fit. No recording happens here."""

from __future__ import annotations

import functools
import math
import sys
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture.modelmap import unwrap
from ..capture.optim import OptimizerView

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


    def state_count(self) -> int | None:
        """Tensors holding optimizer statistics (Adam's averages, momentum, step counts). fastai's
        own `Optimizer` keeps one dict per tensor in `opt.state`, where `clear_state()` (run by
        `freeze()`/`unfreeze()`) leaves only the flags `force_train`/`do_wd`; `OptimWrapper` holds
        a torch optimizer, whose `clear_state()` empties its `state`."""
        opt = self.opt
        inner = getattr(opt, "opt", None)
        if isinstance(inner, torch.optim.Optimizer):  # OptimWrapper
            return sum(1 for st in inner.state.values() if st)
        state = getattr(opt, "state", None)
        if not isinstance(state, dict):
            return None
        keep = set(getattr(type(opt), "_keep_on_clear", ()) or ())
        return sum(1 for st in list(state.values()) if isinstance(st, dict) and any(k not in keep for k in st))


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
class Call:
    entry: str | None          # "fit" (Learner.fit: trains), "enter" (validate/get_preds/summary), None
    depth: int                 # Learner.fit / __enter__ / __exit__ frames of this learner on the stack
    method: str = "fit"        # the outermost schedule method calling this fit, else "fit"
    fn: object = None          # that method's function
    f_locals: dict = field(default_factory=dict)  # its live arguments (fastai rebinds some to resolved values)
    frame_id: int | None = None


def fit_call(learn) -> Call:
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
    call = Call(entry=None, depth=0)
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


def call_arguments(call: Call, learn) -> tuple[list, dict]:
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


def stage_label(method: str, pos: list, kw: dict) -> str:
    args = [_fmt(v) for v in pos] + [f"{k}={_fmt(v)}" for k, v in kw.items()]
    return f"{method}({', '.join(args)})"


# --------------------------------------------------------------------------- the nominal lr peak of a schedule
def nominal_peaks(learn, n_groups: int) -> list[float | None] | None:
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
def freeze_facts(learn) -> dict:
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


def reload_at_end(learn) -> dict | None:
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


def scheduled_hypers(learn) -> list[str] | None:
    """The hyperparameters the running ParamScheduler(s) set at every batch."""
    schedule = sys.modules.get("fastai.callback.schedule")
    if schedule is None:
        return None
    keys = {k for cb in learn.cbs if isinstance(cb, schedule.ParamScheduler)
            for k in (getattr(cb, "scheds", None) or {})}
    return sorted(keys) or None
