"""Setting up the Recorder's per-step state and wiring its hooks (optimizer steps, forward
passes, gradients, the scaler), and removing them again."""

from __future__ import annotations

import functools
import time
import weakref

import numpy as np

from .boundaries import BoundaryTracker
from .layerorder import LayerOrder
from .optim import build_layout
from .passes import PassHooks
from .scaler import ScalerWatch
from .stagebook import StageBook


class HookWiring:
    """The Recorder's set-up and hook wiring (a mixin)."""

    def _init_state(self) -> None:
        P = self._P
        self._layout = build_layout(self._views, self._index_of, P)
        self._count_idx = [np.union1d(m, self._layout.orphans) for m in self._layout.members]
        self._grad_flags = np.zeros(P, dtype=np.uint8)
        self._flags_set = False  # _grad_flags holds marks (else all zero: the step's fast path)
        self._mask_keys: list | None = None  # the last fast-path step's gradient marks, its mask and bytes
        self._mask = self._mask_bytes = None
        self._hooked = np.zeros(P, dtype=bool)
        self._unhooked: list = []  # the tensors without a gradient hook (frozen when last looked at)
        self._req_flags: list[bool] | None = None  # requires_grad per tensor at the last step
        self._trainable: list[int] = []
        self._pending_train_fwd = 0
        self._pending: dict | None = None
        self._own_s = 0.0                       # time spent in our hooks since the last pre-step
        self._last_pre_t: float | None = None
        self._last_rec_s: float | None = None
        self._fwd_t0: float | None = None     # first training forward since the last step (calibration)
        self._own_before_fwd = 0.0
        self._last_flush = time.monotonic()
        self._count_forwards = True
        self._structure_checked = time.perf_counter()
        self._warned: set = set()
        self._seen_new: set[str] = set()   # names the model gained (reported once)
        self._seen_gone: set[str] = set()  # names it lost (reported once)
        self._stepped: dict[int, set[int]] = {}  # per stage index: the optimizers that applied a step in it
        self._bounds = BoundaryTracker(self._params, self._buffers, self.options.hash_threads,
                                       agree=self._concord.check)
        self._book = StageBook(stages=self._stages, session=self.session, names=self._names, params=self._params,
                               buffers=self._buffers, bounds=self._bounds, views=self._views, refs=self._ref,
                               skips_known=self.options.skips_known or self.options.scaler is not None,
                               hash_threads=self.options.hash_threads)
        self._book.p0 = self._p0

    def _install_hooks(self) -> None:
        for j, view in enumerate(self._views):
            opt = view.hookable
            if opt is not None:
                self._handles.append(opt.register_step_pre_hook(functools.partial(_weak(self._hook_pre_step), j)))
                self._handles.append(opt.register_step_post_hook(functools.partial(_weak(self._hook_post_step), j)))
        if self.options.scaler is not None:
            me = weakref.ref(self)
            self._handles.append(ScalerWatch(self.options.scaler, lambda: getattr(me(), "_step", None),
                                             _weak(self._hook_skipped)))
        self._passes = PassHooks(self.model, _weak(self._hook_forward_pre), _weak(self._hook_forward_post), _weak,
                                 post_needed=bool(self._buffers))  # _forward_post follows buffers only
        self._handles.append(self._passes)  # removed with the others (PassHooks.remove)
        self._order = LayerOrder(self.model, _weak(self._hook_layer), getattr(self, "_first_order", None))
        self._handles.append(self._order)  # removed at the first applied step, or with the others
        self._hook_new_trainable()

    def _hook_new_trainable(self) -> None:
        """Place a post-accumulate-grad hook on every trainable tensor that has none yet (a hook
        cannot be placed on a frozen tensor; tensors unfrozen later get theirs at the next forward)."""
        # The hook runs once per tensor per backward, so it does no Python work: `got[i] = tensor`
        # in C, taken by the step (StepPath._drain_grads). It holds the dict, never the recorder.
        mark = self._got.__setitem__
        for i in np.flatnonzero(~self._hooked):
            p = self._params[i]
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(mark, int(i))))
                self._hooked[i] = True
        self._note_unhooked()

    def _note_unhooked(self) -> None:
        self._unhooked = [self._params[i] for i in np.flatnonzero(~self._hooked)]

    def _unlock(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock.unlink(missing_ok=True)

    def _remove_hooks(self) -> None:
        _remove(getattr(self, "_handles", []), getattr(self, "_got", {}))

def _weak(method):
    """A hook that calls `method` through a weak reference: framework objects keep hooks alive
    (and torch's tensor hooks are invisible to the garbage collector), so a recorder nobody
    closed must not be kept alive by them, nor keep the model alive."""
    ref = weakref.WeakMethod(method)

    def hook(*args, **kwargs):
        m = ref()
        return None if m is None else m(*args, **kwargs)

    return hook


def _remove(handles: list, got: dict) -> None:
    """Remove every hook (the list is emptied in place: the finalizer holds it too) and drop the
    tensors the gradient hooks marked since the last step."""
    for h in list(handles):
        try:
            h.remove()
        except Exception:  # noqa: BLE001
            pass
    handles.clear()
    got.clear()


def _abandon(writer, lock, handles: list, got: dict) -> None:
    """What a recorder dropped without close() leaves behind: its writer thread stops, its lock
    goes, and its hooks go (a gradient hook's dict holds the tensors it marked: torch's tensor
    hooks are invisible to the garbage collector, so that cycle is cut here)."""
    _remove(handles, got)
    writer.close(False)
    if lock is not None:
        lock.unlink(missing_ok=True)


