"""The Recorder: the session it records and its public API. What runs on every step is in
capture/steppath.py, the set-up and hook wiring in capture/wiring.py, the hand-over to the store
in capture/handover.py."""

from __future__ import annotations

import functools
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
from torch import nn

from ..errors import FreezeFrameError
from ..store import writer as store
from .columns import Columns
from .dist import Concord, Dist, NullWriter, PeerFailed
from .growth import ModelChanges, adopt_order
from .handover import StoreHandover
from .logvalues import describe as _describe, scalar as _scalar
from .modelmap import add_optimizer_only, build_model_map
from .optim import OptimizerView, as_view, build_layout
from .reference import References
from .sampling import Sampler
from .session import Options, check_same_model, versions
from .stages import StageRecord
from .steppath import STRUCTURE_CHECK_S, StepPath  # noqa: F401 - STRUCTURE_CHECK_S: part of this module's API
from .wiring import HookWiring, _abandon, _weak

log = logging.getLogger("freezeframe")


class Recorder(StepPath, HookWiring, StoreHandover, ModelChanges):
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
            self._got: dict = {}  # tensor index -> tensor: the gradient hooks' marks since the last step
            self._finalizer = weakref.finalize(self, _abandon, self._writer, self._lock, self._handles, self._got)
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
                    raise RuntimeError(f"writing the run failed: {self._writer.failure}")
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


