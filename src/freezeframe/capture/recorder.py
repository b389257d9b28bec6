"""The Recorder: owns every hook, finds the stages, measures each step, and hands rows to the store."""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import sys
import time
import warnings
import weakref
from pathlib import Path
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..errors import FreezeFrameError
from ..store import writer as store
from . import metrics
from .boundaries import BoundaryTracker
from .columns import Columns
from .dist import Concord, Dist, NullWriter, PeerFailed
from .scaler import ScalerWatch
from .session import Options, check_same_model, versions
from .reference import References
from .growth import ModelChanges, adopt_order
from .modelmap import add_optimizer_only, build_model_map
from ..store.indexspace import stored_list, stored_tensor_index
from .passes import PassHooks
from .layerorder import LayerOrder
from .optim import OptimizerView, as_view, build_layout, unwrap_optimizer
from .logvalues import describe as _describe, scalar as _scalar
from .sampling import Sampler
from .stagebook import StageBook
from .stages import StageRecord

log = logging.getLogger("freezeframe")

STRUCTURE_CHECK_S = 2.0  # how often (at most) a step looks for replaced parameters: a walk of the model


class Recorder(ModelChanges):
    """Watches one model and its optimizers; see `freezeframe.watch`. Use as a context manager
    or call `close()`. Every hook it places is removed by `close()`."""

    def __init__(self, model: nn.Module, optimizers, run_dir, *, every: int | None = None,
                 mode: str = "append", **options):
        self.options = Options.from_kwargs(options)
        if not isinstance(model, nn.Module):
            raise FreezeFrameError(f"watch() expects a torch.nn.Module as the model, got {type(model).__name__}")
        if optimizers is None:
            optimizers = []
        elif not isinstance(optimizers, (list, tuple)):
            optimizers = [optimizers]
        self._views: list[OptimizerView] = [as_view(o) for o in optimizers]
        self.sampler = Sampler(every, self.options.budget)
        # Under torch.distributed every rank records (so all take the same decisions), rank 0
        # writes, and the ranks agree before each collective (dist.Concord): set up first, before
        # anything that could fail on one rank only.
        self._dist = Dist()
        self._concord = Concord(self._dist)
        self.model = model
        self.path = run_dir
        self._handles: list = []
        self._lock = None
        self._closed = False
        self._dead = False
        try:
            self.map = build_model_map(model)
            add_optimizer_only(self.map, self._views)
            self._params = self.map.param_tensors
            self._buffers = self.map.buffer_tensors
            self._names = self.map.names
            self._bind_map()
            self._p0 = self._P  # parameters known when the run began (docs/run-format.md, "Tensor indices")
            if self._dist.writes:
                self.path, existing = store.prepare_run_dir(run_dir, mode)
            else:
                self.path, existing = Path(run_dir), None
            self._stages: list[StageRecord] = []
            self._sessions: list[dict] = []
            self._step = 0
            self._created = time.time()
            if existing is not None:
                self._adopt(existing)
            self._lock = store.acquire_lock(self.path) if self._dist.writes else None
        except BaseException as e:
            self._concord.fail(e)  # the other ranks stop at their first agreement
            raise
        try:
            # W_ref only of what trains (capture/reference.py); the lists are shared, mutated in place
            self._refs = References(self.path, self._names, self._params, self._buffers, keep=self.options.reference,
                                    device=self.options.reference_device, writes=self._dist.writes,
                                    concord=self._concord, p0=self._p0)
            self._ref, self._ref_norms = self._refs.values, self._refs.norms
            self.session = len(self._sessions)
            self._sessions.append({
                "index": self.session, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.time(), "ended": None, "first_step": self._step, "every": self.sampler.every,
                "calibration": None, "argv": list(sys.argv), "versions": versions(self.options.framework_versions),
            })
            self._cols = Columns(self._P)
            self._writer = (store.RunWriter(self.path, self.session, pull=self._cols.take,
                                            interval=self.options.flush_seconds, lock=self._lock)
                            if self._dist.writes else NullWriter())
            # A recorder dropped without close(): its writer thread stops (never relied on to
            # remove hooks: those are weak, and close() removes them).
            self._finalizer = weakref.finalize(self, _abandon, self._writer, self._lock)
            self._init_state()
            # The content hashes of the weights watching first began with (W_ref's bytes), in the
            # stored tensor order: the proof behind "bitwise equal to W_ref" (docs/run-format.md).
            self._reference_hashes = (list(self._bounds.baseline) if existing is None
                                      else existing.get("reference_hashes"))
            self._refs.start(existing, self._bounds.baseline, self._step)  # writes the reference file
            self._install_hooks()
            self._flush()
        except FreezeFrameError as e:
            self._concord.fail(e)
            self._remove_hooks()
            self._unlock()
            raise
        except Exception as e:  # noqa: BLE001 - an internal error must not stop the user's training
            self._concord.fail(e)
            self._remove_hooks()
            self._error = f"start: {type(e).__name__}: {e}"
            if isinstance(e, PeerFailed) and getattr(self, "_writer", None) is not None:
                # another rank failed while this one started: its run says so (docs/distributed.md)
                try:
                    self._flush(complete=False)
                    self._writer.close(compact=False)
                except BaseException:  # noqa: BLE001 - the disk may be the fault
                    pass
            self._unlock()
            if getattr(self, "_finalizer", None) is not None:
                self._finalizer()  # stops the writer thread if it was started
            self._dead = self._closed = True
            warnings.warn(f"freezeframe could not start recording {str(self.path)!r}: {type(e).__name__}: {e}. "
                          "Training is not affected; nothing is recorded.", RuntimeWarning, stacklevel=3)
            log.debug("freezeframe internal error", exc_info=e)

    # ------------------------------------------------------------------ set-up
    def _adopt(self, manifest: dict) -> None:
        """Continue a stored run (mode="append"): same model map or a clear refusal."""
        stored_model = manifest.get("model") or {}
        grown = stored_model.get("buffers_at", len(stored_model.get("params") or [])) != len(stored_model.get("params") or [])
        check_same_model(self.path, manifest.get("signature"), self.map.signature(), any_order=grown)
        if grown:  # parameters were added while recording: this session uses the stored order
            self._p0 = adopt_order(self.path, self.map, stored_model)
            self._bind_map()
        if manifest.get("framework") not in (None, self.options.framework):
            log.info("freezeframe: appending %s stages to a %s run", self.options.framework, manifest["framework"])
        self._created = manifest.get("created", self._created)
        self._first_order = stored_model.get("forward_order")  # kept by every later session
        self._stages = [StageRecord.from_json(s) for s in manifest.get("stages", [])]
        self._sessions = list(manifest.get("sessions", []))
        from ..store.reader import read_run  # the steps on disk may be ahead of the manifest

        stored_run = read_run(self.path)
        last = stored_run.steps.column("step").to_pylist()
        self._step = max([manifest.get("steps_total", 0)] + [s + 1 for s in last[-1:]])

    def _bind_map(self) -> None:
        self._names = self.map.names
        self._P, self._B = len(self._params), len(self._buffers)
        self._index_of = {id(p): i for i, p in enumerate(self._params)}

    def _init_state(self) -> None:
        P = self._P
        self._layout = build_layout(self._views, self._index_of, P)
        self._count_idx = [np.union1d(m, self._layout.orphans) for m in self._layout.members]
        self._grad_flags = np.zeros(P, dtype=np.uint8)
        self._hooked = np.zeros(P, dtype=bool)
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
        self._passes = PassHooks(self.model, _weak(self._hook_forward_pre), _weak(self._hook_forward_post), _weak)
        self._handles.append(self._passes)  # removed with the others (PassHooks.remove)
        self._order = LayerOrder(self.model, _weak(self._hook_layer), getattr(self, "_first_order", None))
        self._handles.append(self._order)  # removed at the first applied step, or with the others
        self._hook_new_trainable()

    def _hook_new_trainable(self) -> None:
        """Place a post-accumulate-grad hook on every trainable tensor that has none yet (a hook
        cannot be placed on a frozen tensor; tensors unfrozen later get theirs at the next forward)."""
        me = weakref.ref(self)  # (see _weak: hooks must not keep the recorder alive)
        for i in np.flatnonzero(~self._hooked):
            p = self._params[i]
            if p.requires_grad:
                def on_grad(param, i=int(i)):  # runs once per tensor per backward: kept to one call
                    rec = me()
                    if rec is not None:
                        rec._hook_grad(i, param)
                self._handles.append(p.register_post_accumulate_grad_hook(on_grad))
                self._hooked[i] = True

    def _unlock(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock.unlink(missing_ok=True)

    def _remove_hooks(self) -> None:
        for h in getattr(self, "_handles", []):
            try:
                h.remove()
            except Exception:  # noqa: BLE001
                pass
        self._handles = []

    # ------------------------------------------------------------------ guarded entry points
    def _fail(self, where: str, exc: BaseException) -> None:
        """Any error inside the recorder: one warning, recording stops, training goes on."""
        if self._dead:
            return
        self._dead = True
        self._remove_hooks()
        self._concord.fail(exc)  # the other ranks stop at their next agreement, wherever it is
        what = (f"in {where}: {exc}" if isinstance(exc, PeerFailed)
                else f"after an internal error in {where}: {type(exc).__name__}: {exc}")
        kept = ("steps recorded so far are kept" if Path(self.path).is_dir()
                else "the run directory is gone, so nothing of this run is kept")
        warnings.warn(f"freezeframe stopped recording {str(self.path)!r} {what}. "
                      f"Training is not affected; {kept}.", RuntimeWarning, stacklevel=3)
        log.debug("freezeframe internal error", exc_info=exc)
        self._error = f"{where}: {type(exc).__name__}: {exc}"
        try:
            self._flush(complete=False)
        except BaseException:  # noqa: BLE001 - the disk may be the fault
            pass
        try:
            self._writer.close(compact=False)
        except BaseException:  # noqa: BLE001
            pass
        self._unlock()
        self._closed = True

    def _guard(self, where: str, fn, *args, grad_off: bool = True):
        """Run one of the recorder's entry points: its errors become `_fail`, its time counts as
        the recorder's own, and autograd records nothing of it (`grad_off`; the forward hooks
        do no tensor arithmetic and skip the switch: they run on every forward pass)."""
        if self._dead:
            return None
        t0 = time.perf_counter()
        was = torch.is_grad_enabled() if grad_off else False
        if was:
            torch._C._set_grad_enabled(False)
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001
            self._fail(where, e)
            return None
        finally:
            if was:
                torch._C._set_grad_enabled(True)
            self._own_s += time.perf_counter() - t0

    def _hook_pre_step(self, j, optimizer, args, kwargs):
        self._guard("the optimizer step pre-hook", self._pre_step, j)

    def _hook_post_step(self, j, optimizer, args, kwargs):
        self._guard("the optimizer step post-hook", self._post_step, j)

    def _hook_skipped(self, optimizer) -> None:
        opt = unwrap_optimizer(optimizer)
        j = next((k for k, v in enumerate(self._views) if v.hookable is opt), None)
        if j is not None:
            self._guard("the scaler's skipped step", self._skip_step, j)

    def _hook_grad(self, i: int, param) -> None:
        try:
            self._grad_flags[i] = 1  # a gradient was accumulated into tensor i during this step
        except Exception as e:  # noqa: BLE001 - runs inside the user's backward: never raise there
            self._fail("the gradient hook", e)

    def _hook_forward_pre(self, module, count: bool = True):
        self._guard("the forward pre-hook", self._forward_pre, module, torch.is_grad_enabled(), count, grad_off=False)

    def _hook_forward_post(self):
        self._guard("the forward hook", self._forward_post, grad_off=False)

    def _hook_layer(self, fn, *args):
        self._guard("the forward-order hook", fn, *args, grad_off=False)

    # ------------------------------------------------------------------ forward passes
    def _forward_pre(self, module, grad_enabled: bool, count: bool = True) -> None:
        """A pass begins (`count`: it is one to count; see capture/passes.py)."""
        if self._fwd_t0 is None and module.training and self.sampler.calibrating:
            self._fwd_t0, self._own_before_fwd = time.perf_counter(), self._own_s
        self._bounds.detect_buffer_writes()
        if grad_enabled and not self._hooked.all():  # training in eval mode (frozen BN stats) too
            self._hook_new_trainable()
        if not count:
            return
        self._order.pass_begins()  # the forward order counts a pass's calls once one has autograd on
        if module.training:
            if self._count_forwards:
                self._pending_train_fwd += 1
        elif self._count_forwards and self._book.current is not None:
            self._book.current.forward_passes["eval"] += 1

    def _forward_post(self) -> None:
        self._bounds.after_forward()

    # ------------------------------------------------------------------ steps
    def _pre_step(self, j: int) -> None:
        t_start = time.perf_counter()
        if self._last_pre_t is not None and self.sampler.calibrating:
            sample = None
            if self._last_rec_s is not None:
                # The step's own work: from its first forward pass to now (data loading and
                # whatever else the loop does are left out: the budget is then conservative),
                # or from the previous step when no forward pass of the watched module was seen.
                since = self._fwd_t0 if self._fwd_t0 is not None else self._last_pre_t
                training = (t_start - since) - (self._own_s - self._own_before_fwd)
                sample = (max(training, 1e-9), self._last_rec_s, max(self._own_s - self._last_rec_s, 0.0))
            self._calibrated = self.sampler.observe(sample)  # the same step on every rank
            if self._calibrated:
                self._agree_every()
        self._last_pre_t, self._own_s, self._last_rec_s = t_start, 0.0, None
        self._fwd_t0, self._own_before_fwd = None, 0.0
        if t_start - self._structure_checked > STRUCTURE_CHECK_S:
            self._check_structure()
        self._bounds.detect_buffer_writes()
        view = self._views[j]
        if view.membership_key() != self._layout.key[j]:
            self._check_structure()  # groups changed: a replaced layer's tensors may come with them
            self._layout = build_layout(self._views, self._index_of, self._P)
            self._count_idx = [np.union1d(m, self._layout.orphans) for m in self._layout.members]
        flags = [p.requires_grad for p in self._params]
        if flags != self._req_flags:  # the trainable set changed (or a tensor was rebound)
            self._req_flags = flags
            self._trainable = [i for i, f in enumerate(flags) if f]
        trainable = self._trainable
        if not self._hooked.all() and not self._hooked[trainable].all():
            # Unfrozen without a forward of the root module since (Lightning's training_step may
            # call submodules only): hooked now, before a closure's backward inside step() runs.
            self._hook_new_trainable()
        began = self._book.starts_new(trainable, self._layout)
        stage = self._book.begin(trainable, self._layout, self._step) if began else self._book.current
        if began:
            self._stage_began(stage, trainable)
            self._flush()  # the new stage's name and facts reach the disk with its first rows
        hypers = [h for v in self._views for h in v.hypers()]
        self._book.note_hypers(hypers)
        recorded = self.sampler.is_recorded(self._step - stage.first_step)
        pending = {"j": j, "recorded": recorded, "hypers": hypers, "rec_s": 0.0, "began": began}
        if recorded:
            t0 = time.perf_counter()
            cand = [int(i) for i in self._layout.members[j]
                    if self._params[i].requires_grad or self._params[i].grad is not None]
            pending["cand"] = cand
            pending["before"] = metrics.snapshot([self._params[i] for i in cand])
            pending["rec_s"] = time.perf_counter() - t0
        self._pending = pending

    def _agree_every(self) -> None:
        """Rank 0's `every`, for every rank (one agreement, on the same step everywhere)."""
        self.sampler.impose(int(self._concord.agree(self.sampler.every if self._dist.writes else 0)))
        self._sessions[self.session]["every"] = self.sampler.every
        self._sessions[self.session]["calibration"] = self.sampler.measured

    def _post_step(self, j: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending["j"] != j:
            return  # the pre-hook did not run for this step (recorder attached mid-step)
        stage = self._book.current
        step = self._step
        rec_s = pending["rec_s"]
        idx = self._count_idx[j]
        if len(idx) == self._P:  # the usual case: one optimizer, every tensor counted by it
            mask = np.array(self._grad_flags[:])
            stage.grad_steps += mask
            self._grad_flags[:] = 0
        else:
            got = self._grad_flags[idx]
            stage.grad_steps[idx] += got
            mask = np.zeros(self._P, dtype=np.uint8)
            mask[idx] = got
            self._grad_flags[idx] = 0
        hypers = pending["hypers"]
        self._cols.add_step(step, stage.index, self.session, j, time.time(), pending["recorded"],
                            [h[0] for h in hypers], [h[1] for h in hypers], [h[2] for h in hypers],
                            np.packbits(mask).tobytes())
        if pending["recorded"]:
            t0 = time.perf_counter()
            self._record_metrics(step, pending["cand"], pending["before"])
            rec_s += time.perf_counter() - t0
        self._book.note_applied(stage, step)
        stepped = self._stepped.get(stage.index)
        if stepped is None or j not in stepped:
            self._note_stepped(stage, j)
        stage.steps += 1
        stage.last_step = step
        stage.forward_passes["train"] += self._pending_train_fwd
        self._pending_train_fwd = 0
        self._passes.after_step()
        self._order.after_step()  # the first applied step ends the forward-order hooks
        self._step += 1
        self._bounds.after_step()  # versions prove what is not written after this step
        flush_s = 0.0
        if time.monotonic() - self._last_flush > self.options.flush_seconds:
            t0 = time.perf_counter()
            self._flush()
            flush_s = time.perf_counter() - t0
        if pending["recorded"] and not pending["began"]:
            # a sample for calibration (not a stage's first step: that one hashes the model);
            # a periodic flush is not part of a step's cost, it is spread over many
            self._last_rec_s = rec_s
            self._own_s -= flush_s

    def _note_stepped(self, stage: StageRecord, j: int) -> None:
        """Optimizer j applies its first step of the stage: tensors that another optimizer which
        stepped in it holds too are stepped twice per iteration."""
        stepped = self._stepped.setdefault(stage.index, set())
        stepped.add(j)
        if len(stepped) > 1:
            counts = np.zeros(self._P, dtype=np.int64)
            for k in stepped:
                counts[self._layout.members[k]] += 1
            stage.shared_between_optimizers = [self._names[i] for i in np.flatnonzero(counts > 1)]

    def _record_metrics(self, step: int, cand: list[int], before: list[torch.Tensor]) -> None:
        P = self._P
        pcols, bcols = metrics.step_metrics([self._params[i] for i in cand], before, [self._ref[i] for i in cand],
                                            self._buffers, self._ref[P:], agree=self._concord.check)
        idx = np.asarray(cand, dtype=np.int32)
        if P != self._p0:  # parameters were added: stored indices put them after the buffers
            idx = stored_tensor_index(idx, self._p0, P, self._B).astype(np.int32)
        self._cols.add_tensors(step, idx, *pcols)
        if self._B:
            self._cols.add_tensors(step, np.arange(self._p0, self._p0 + self._B, dtype=np.int32), *bcols)

    # ------------------------------------------------------------------ boundaries
    def _capture_end(self, detected: str = "stage_end") -> None:
        """A known stage end (explicit stage exit, framework boundary, close): hash everything."""
        if self._book.capture_end(detected):
            self._refs.complete_end(self._book.current, self._book.internal, self._book.stored)
            self._flush()

    def _stage_began(self, stage: StageRecord, trainable: list[int]) -> None:
        """A stage's first step is about to apply: the previous stage's end (if found only now)
        completed, and W_ref taken of tensors trainable for the first time, checked against
        their hash at this stage's start (docs/recording.md, "The reference")."""
        if len(self._stages) > 1 and self._stages[-2].session == self.session:
            self._refs.complete_end(self._stages[-2], self._book.internal, self._book.stored)
        if any(self._ref[i] is None for i in trainable):
            self._refs.take(trainable, self._book.internal(stage.start_hashes), self._step)

    # ------------------------------------------------------------------ the store
    def _manifest(self, complete: bool) -> dict:
        return {
            "schema": "freezeframe.run/1", "schema_version": 1, "framework": self.options.framework,
            "created": self._created, "complete": complete, "steps_total": self._step,
            "reference": bool(self.options.reference),
            "ref_norms": [_finite(x) for x in stored_list(self._ref_norms, self._p0, self._P, self._B)],
            "reference_hashes": getattr(self, "_reference_hashes", None),
            **(self._refs.manifest_fields(self._p0, self._P, self._B) if hasattr(self, "_refs") else {}),
            "signature": self.map.signature(),
            "model": {**self.map.to_json(), "forward_order": getattr(getattr(self, "_order", None), "order",
                                                                   getattr(self, "_first_order", None))},
            "sessions": self._sessions, "stages": [s.to_json() for s in self._stages],
            "error": getattr(self, "_error", None),
        }

    def _flush(self, complete: bool = False) -> None:
        if self._writer.error is not None:
            # kept set: the writer writes nothing after its first failure, so what reaches the
            # disk stays a prefix of the steps (a later flush must not land after a lost one)
            err = self._writer.error
            raise RuntimeError(f"writing the run failed: {err}") from err
        manifest = json.dumps(self._manifest(complete), allow_nan=False).encode()
        reference = self._refs.pending()  # W_ref taken since the last hand-over: written before the manifest
        if reference:
            self._writer.submit(self._cols.take(), manifest, reference)
        else:
            self._writer.submit(self._cols.take(), manifest)
        self._last_flush = time.monotonic()

    # ------------------------------------------------------------------ public API
    @contextmanager
    def stage(self, name: str, *, kind: str = "train", meta: dict | None = None):
        """Name the stage formed by the steps inside the block. A change of the trainable set or
        of param-group membership inside it starts "<name> (part 2)"."""
        if not isinstance(name, str) or not name:
            raise FreezeFrameError(f"a stage name must be a non-empty string, got {name!r}")
        if kind not in ("train", "trial"):
            raise FreezeFrameError(f"stage kind must be 'train' or 'trial', got {kind!r}")
        self.begin_stage(name, kind=kind, meta=meta)
        try:
            yield self
        finally:
            self.end_stage()

    def begin_stage(self, name: str, *, kind: str = "train", epochs: int | None = None,
                    meta: dict | None = None) -> None:
        """The start of an explicit stage (integrations call this at a framework boundary, with
        the framework's facts: planned epochs, and `meta` — e.g. why norm layers train)."""
        self._guard("stage start", self._begin_explicit, name, kind, meta, epochs)

    def end_stage(self, *, observed: bool = True) -> None:
        """The end of an explicit stage: its end state is hashed now. `observed=False` (a fit
        that died with an exception): the end was not seen, so it is decided at the next stage
        by version counters, like an automatic boundary."""
        self._guard("stage end", self._end_explicit, observed)

    def _begin_explicit(self, name, kind, meta, epochs=None) -> None:
        self._capture_end()  # the previous stage's end, before looking for replaced parameters
        self._check_structure()
        self._book.begin_explicit(name, kind, meta, epochs)

    def _end_explicit(self, observed: bool = True) -> None:
        self._book.end_explicit(self._pending_train_fwd)
        self._pending_train_fwd = 0
        if observed:
            self._capture_end()

    def track(self, optimizer) -> None:
        """Follow an optimizer created after watching began (e.g. rebuilt after unfreezing)."""
        view = as_view(optimizer)
        if self._dead or self._closed:
            return
        if view.hookable is not None and any(v.hookable is view.hookable for v in self._views):
            return  # already followed
        self._guard("track()", self._check_structure)
        self._guard("track()", self._refs.take_trainable, self._step, self.options.hash_threads)
        if self._dead:
            return
        j = len(self._views)
        self._views.append(view)
        if view.hookable is not None:
            self._handles.append(view.hookable.register_step_pre_hook(functools.partial(_weak(self._hook_pre_step), j)))
            self._handles.append(view.hookable.register_step_post_hook(functools.partial(_weak(self._hook_post_step), j)))
        self._layout = build_layout(self._views, self._index_of, self._P)
        self._count_idx = [np.union1d(m, self._layout.orphans) for m in self._layout.members]

    def epoch(self) -> None:
        """An epoch begins now: the next applied step is its first. Integrations call this at
        each training epoch start; plain loops may call it at the top of their epoch loop. A
        stage's `epoch_starts` and `epochs` then state the epochs it applied steps in."""
        if not (self._dead or self._closed):
            self._guard("epoch()", self._book.epoch)

    def log(self, **scalars) -> None:
        """Attach scalars (e.g. loss=...) to the most recent applied step."""
        if self._dead or self._closed or self._book.current is None:
            return  # nothing applied yet in this session: there is no step to attach to
        self._guard("log()", self._log, scalars)

    def _log(self, scalars: dict) -> None:
        for name, number in self._numbers("log", scalars):
            self._cols.add_scalar(self._step - 1, name, number)

    def log_epoch(self, **scalars) -> None:
        """Attach scalars (e.g. train_loss=..., valid_loss=..., accuracy=...) to the epoch begun
        last (`epoch()`): the stage's `epoch_metrics`; a second call for one epoch merges."""
        if not (self._dead or self._closed):
            self._guard("log_epoch()", self._log_epoch, scalars)

    def _log_epoch(self, scalars: dict) -> None:
        values = {}
        for name, x in self._numbers("log_epoch", scalars):  # a loop, not a comprehension: the warning's stack
            values[name] = x if np.isfinite(x) else None  # non-finite: null (docs/recording.md)
        if values and not self._book.log_epoch(values) and "log_epoch" not in self._warned:
            self._warned.add("log_epoch")
            warnings.warn("freezeframe: rec.log_epoch() came with no epoch under way that applied a step (call "
                          "rec.epoch() at the start of each epoch); those values are not recorded", RuntimeWarning,
                          stacklevel=4)

    def _numbers(self, call: str, scalars: dict):
        """(name, float) of each real number; any other value is skipped, with one warning per key and type."""
        for name, value in scalars.items():
            number = _scalar(value)
            if number is None:
                what = _describe(value)
                if (call, name, what) not in self._warned:
                    self._warned.add((call, name, what))
                    warnings.warn(f"freezeframe: rec.{call}({name}=...) got {what}, not a real number; that value "
                                  "is not recorded (recording goes on)", RuntimeWarning, stacklevel=5)
                continue
            yield str(name), number

    # -- for integrations whose optimizer has no torch step hooks (fastai): they call these ----
    def step_begin(self, optimizer: int = 0) -> None:
        """Just before optimizer `optimizer` (index into the watched list) applies a step."""
        self._guard("step_begin()", self._pre_step, optimizer)

    def step_end(self, optimizer: int = 0) -> None:
        """Just after the step applied."""
        self._guard("step_end()", self._post_step, optimizer)

    def step_skipped(self, optimizer: int = 0) -> None:
        """The step begun was cancelled (fastai's CancelStepException, an AMP overflow)."""
        self._guard("step_skipped()", self._skip_step, optimizer)

    def _skip_step(self, j: int) -> None:
        self._pending = None
        idx = self._count_idx[j]
        self._grad_flags[idx] = 0  # those gradients were never applied
        self._book.skip()

    def prepare_batch(self) -> None:
        """Hook tensors unfrozen since the last forward of the watched module (integrations call
        this before each training batch when the framework may not call that module itself,
        e.g. a LightningModule whose training_step calls its submodules)."""
        if not self._hooked.all():
            self._guard("prepare_batch()", self._hook_new_trainable)

    def settle(self) -> None:
        """Everything recorded so far on disk, and the run marked complete until more steps come
        (integrations call this at the end of each fit: a Learner has no "closed" event)."""
        def _settle():
            self._capture_end()
            self._concord.check()  # learn of another rank's failure here at the latest
            self._flush(complete=True)
            self._writer.drain()
        self._guard("settle()", _settle)

    def set_counting(self, on: bool) -> None:
        """Integrations switch forward-pass counting off outside training fits."""
        self._count_forwards = bool(on)

    @property
    def every(self) -> int | None:
        return self.sampler.every

    @property
    def steps(self) -> int:
        return self._step

    def close(self, *, complete: bool = True) -> None:
        if self._closed:
            return
        try:
            if not self._dead:
                self._capture_end("close")
                self._concord.check()  # learn of another rank's failure here at the latest
                self._sessions[self.session]["ended"] = time.time()
                self._flush(complete=complete)
                self._writer.close()
                if self._writer.error is not None:
                    raise RuntimeError(f"writing the run failed: {self._writer.error}")
        except Exception as e:  # noqa: BLE001
            self._fail("close()", e)
        finally:
            self._closed = True
            self._remove_hooks()
            self._unlock()
            self._finalizer.detach()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("failed" if self._dead else "recording")
        return f"<freezeframe.Recorder {str(self.path)!r} {state}, {self._step} steps, {len(self._stages)} stages>"


def _weak(method):
    """A hook that calls `method` through a weak reference: framework objects keep hooks alive
    (and torch's tensor hooks are invisible to the garbage collector), so a recorder nobody
    closed must not be kept alive by them, nor keep the model alive."""
    ref = weakref.WeakMethod(method)

    def hook(*args, **kwargs):
        m = ref()
        return None if m is None else m(*args, **kwargs)

    return hook


def _abandon(writer, lock) -> None:
    """What a recorder dropped without close() leaves behind: its writer thread stops, its lock goes."""
    writer.close(False)
    if lock is not None:
        lock.unlink(missing_ok=True)


def _finite(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None
