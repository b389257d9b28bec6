"""What runs on every training step: the guarded hook entry points, the forward-pass counts, and
the optimizer-step pre/post work. An unrecorded step does no per-tensor Python work here: tensor
flags and version counters are read with one C-level `map` each, the gradient hooks only store
their index (a C call), and what they stored is taken with one numpy call at the step
(docs/recording.md, "The step path")."""

from __future__ import annotations

import operator
import time

import numpy as np
import torch

from ..store.indexspace import stored_tensor_index
from . import metrics
from .optim import build_layout, unwrap_optimizer
from .stages import StageRecord

STRUCTURE_CHECK_S = 2.0  # how often (at most) a step looks for replaced parameters: a walk of the model

requires_grad_of = operator.attrgetter("requires_grad")


class StepPath:
    """The Recorder's per-step work (a mixin: the state it reads is set up by capture/wiring.py)."""

    def _guard(self, where: str, fn, *args, grad_off: bool = True):
        """Run one of the recorder's entry points: its errors become `_fail`, its time counts as
        the recorder's own, and autograd records nothing of it (`grad_off`; the forward hooks
        do no tensor arithmetic and skip the switch: they run on every forward pass)."""
        if self._dead:
            return None
        timing = self.sampler.every is None  # own time matters only while `every` is calibrated
        t0 = time.perf_counter() if timing else 0.0
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
            if timing:
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
        # a tensor unfrozen since it was last looked at gets its hook (training in eval mode too)
        if grad_enabled and self._unhooked and any(map(requires_grad_of, self._unhooked)):
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
        flags = list(map(requires_grad_of, self._params))  # one C-level pass, no Python loop
        if flags != self._req_flags:  # the trainable set changed (or a tensor was rebound)
            self._req_flags = flags
            self._trainable = [i for i, f in enumerate(flags) if f]
        trainable = self._trainable
        if self._unhooked and not self._hooked[trainable].all():
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
        got_keys = list(self._got)
        if len(idx) == self._P and not self._flags_set:
            # the usual case: one optimizer counts every tensor, and only the gradient hooks
            # marked any; the same tensors as the step before (most steps) reuse its mask
            self._got.clear()
            if got_keys != self._mask_keys:
                mask = np.zeros(self._P, dtype=np.uint8)
                mask[got_keys] = 1
                self._mask_keys, self._mask, self._mask_bytes = got_keys, mask, np.packbits(mask).tobytes()
            stage.grad_steps += self._mask
            mask_bytes = self._mask_bytes
        else:  # marks set outside the hooks, or tensors this optimizer does not count
            self._drain_grads(got_keys)
            got = self._grad_flags[idx]
            stage.grad_steps[idx] += got
            mask = np.zeros(self._P, dtype=np.uint8)
            mask[idx] = got
            self._grad_flags[idx] = 0
            if len(idx) == self._P:
                self._flags_set = False
            mask_bytes = np.packbits(mask).tobytes()
        self._cols.add_step(step, stage.index, self.session, j, time.time(), pending["recorded"],
                            pending["hypers"], mask_bytes)
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

    def _skip_step(self, j: int) -> None:
        self._pending = None
        self._drain_grads(list(self._got))
        idx = self._count_idx[j]
        self._grad_flags[idx] = 0  # those gradients were never applied
        self._book.skip()

    def _drain_grads(self, keys: list) -> None:
        """The gradient hooks' marks since the last drain (`keys`, the dict's keys) into the
        per-tensor flags: one numpy call. A hook is `functools.partial(self._got.__setitem__, i)`
        (capture/wiring.py): it stores `got[i] = tensor` in C, and this drain drops those
        references again. (The usual step skips the flags: StepPath._post_step.)"""
        self._got.clear()
        if keys:
            self._grad_flags[keys] = 1  # a gradient was accumulated into these tensors during this step
            self._flags_set = True
