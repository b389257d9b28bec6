"""W_ref, the reference for drift, kept only for the tensors that train: a parameter's W_ref is
taken when it first becomes trainable, once its content hash proves its bytes are still those
watching began with; a tensor that stays frozen has no copy (its hashes prove it unchanged).
Buffers keep theirs from the start (docs/recording.md, "The reference"; docs/run-format.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..store import layout
from ..store import writer as store
from ..store.indexspace import reader_list, stored_list
from . import metrics

log = logging.getLogger("freezeframe")

# codes of the decision for one tensor (rank 0's, under torch.distributed: every rank acts on it)
_LEAVE, _TAKE, _LOAD = 0, 1, 2


def refused_reason(step: int) -> str:
    return (f"its bytes when it first became trainable (before step {step}) differ from those watching "
            "began with: it was written or replaced while frozen, so W_ref is unknown and drift is not measured")


class References:
    """W_ref per tensor in the recorder's order [params, buffers] (None where none is kept), with
    ||W_ref||, the step each W_ref was taken at, why one was refused, and the content hash a
    W_ref must have (`targets`: the run's `reference_hashes`). The lists are mutated in place:
    the stage book holds `values`."""

    def __init__(self, path: Path, names: list[str], params: list, buffers: list, *, keep: bool,
                 device: str | None, writes: bool, concord, p0: int):
        self.path, self.names, self.params, self.buffers = path, names, params, buffers
        self.keep, self.device, self.writes, self.concord = keep, device, writes, concord
        self.p0 = p0
        n = len(params) + len(buffers)
        self.values: list = [None] * n
        self.norms: list = [None] * n
        self.taken: list = [None] * n
        self.refused: list = [None] * n
        self.targets: list = [None] * n
        self._stored: set[str] = set()    # names in reference.safetensors not loaded (appended runs)
        self._pending: dict = {}           # name -> W_ref to add to the file at the next hand-over
        self._ends_done: set[int] = set()  # stages whose end drift was completed from hashes

    @property
    def tensors(self) -> list:
        return self.params + self.buffers

    # ------------------------------------------------------------------ start
    def start(self, existing: dict | None, baseline: list[str], step: int) -> None:
        """Watching begins: ||W|| of every tensor (a pass, no copy); W_ref of every buffer and of
        every parameter trainable now; the file written now (the first thing a run writes)."""
        P, B = len(self.params), len(self.buffers)
        if not self.keep:
            return
        self.targets[:] = list(baseline)
        if existing is not None:
            p0 = self.p0
            stored = lambda key: reader_list(existing.get(key), p0, P, B) or [None] * (P + B)  # noqa: E731
            self.targets[:] = stored("reference_hashes")
            self.norms[:] = stored("ref_norms")
            self.refused[:] = stored("reference_refused")
            ref = self.path / layout.REFERENCE
            damaged = False
            if ref.exists():
                from safetensors import safe_open

                try:
                    with safe_open(str(ref), framework="pt") as f:
                        self._stored = set(f.keys())
                except Exception as e:  # noqa: BLE001 - unreadable: its refs are taken again, hash-checked
                    damaged = True
                    log.warning("freezeframe: %s could not be read (%s); W_ref is taken again, checked "
                                "against the run's hashes, as tensors train", ref, e)
            taken = existing.get("reference_taken")
            if damaged:
                self.taken[:] = [None] * (P + B)
            elif taken is None:  # written before W_ref was lazy: whatever the file holds was taken at the start
                self.taken[:] = [0 if n in self._stored else None for n in self.names]
            else:
                self.taken[:] = stored("reference_taken")
        # ||W|| of every tensor (the same collectives on every rank: DTensors' norms are summed
        # across ranks); an appended run keeps the values it stored
        deferred: list = []
        got = metrics.norms(self.tensors, deferred)
        metrics._reduced(deferred, self.concord.check if self.concord.on else None)
        for i, x in enumerate(metrics.to_host(got)):
            if self.norms[i] is None:
                self.norms[i] = float(x)
        want = [i for i, p in enumerate(self.params) if p.requires_grad] + list(range(P, P + B))
        self.take(want, baseline, step, checked=existing is not None)
        if self.writes:
            store.write_reference(self.path, self._pending)
        self._pending = {}

    # ------------------------------------------------------------------ taking
    def take(self, indices, hashes, step: int, *, checked: bool = True) -> None:
        """Take W_ref of each tensor of `indices` that has none, if its bytes now (`hashes`, the
        recorder's order, or a dict index -> hash) are proved those watching began with
        (`checked=False`: they are, at the moment watching begins). Every rank calls this with
        the same indices; rank 0 decides."""
        if not self.keep:
            return
        idx = [int(i) for i in indices if self.values[i] is None]
        if not idx:
            return
        codes = [self._decide(i, hashes, checked, step) for i in idx]
        if self.concord.on:  # rank 0's decisions for every rank (one agreement, then one all_reduce)
            from .dist import Dist

            self.concord.check()
            codes = [int(c) for c in Dist().agree_max([float(c) if self.writes else 0.0 for c in codes])]
        for i, code in zip(idx, codes):
            if code == _LEAVE:
                continue
            self.refused[i] = None
            if code == _TAKE or self.taken[i] is None:
                self.taken[i] = step
            if code == _TAKE:
                self._copy(i)
            else:
                self._load(i)

    def take_trainable(self, step: int, threads: int = 2) -> None:
        """W_ref of the parameters trainable now that have none (`track()`, after an unfreeze),
        each hashed now for the check."""
        idx = [i for i, p in enumerate(self.params) if p.requires_grad and self.values[i] is None]
        if idx and self.keep:
            hashes = metrics.content_hashes([self.params[i] for i in idx], threads=threads,
                                            agree=self.concord.check if self.concord.on else None)
            self.take(idx, dict(zip(idx, hashes)), step)

    def _decide(self, i: int, hashes, checked: bool, step: int) -> int:
        if not self.writes:
            return _LEAVE
        name = self.names[i]
        if name in self._stored:
            return _LOAD
        if self.refused[i] is not None:
            return _LEAVE
        if not checked:
            return _TAKE
        h = hashes.get(i) if isinstance(hashes, dict) else (hashes[i] if i < len(hashes) else None)
        if h is not None and self.targets[i] is not None and h == self.targets[i]:
            return _TAKE
        self.refused[i] = refused_reason(step)
        return _LEAVE

    def _copy(self, i: int) -> None:
        """W_ref = the tensor now: one copy (on `reference_device`, else the tensor's own); the
        file gets it at the next hand-over (a DTensor: its gathered whole, on rank 0)."""
        t = self.tensors[i].detach()
        if metrics.is_sharded(t):
            from ..hashing import gathered

            whole = gathered(t)  # a collective: every rank takes the same tensors in the same order
            if self.writes:
                self._pending[self.names[i]] = whole.to("cpu", copy=True)
            self.values[i] = t.clone()
            return
        target = torch.device(self.device) if self.device else t.device
        ref = torch.empty(t.shape, dtype=t.dtype, device=target)
        ref.copy_(t)
        self.values[i] = ref
        if self.writes:
            self._pending[self.names[i]] = ref

    def _load(self, i: int) -> None:
        """W_ref read back from the run's file (an appended session), scattered as shards for a DTensor."""
        t = self.tensors[i]
        name = self.names[i]
        src = None
        if self.writes:
            from safetensors import safe_open

            with safe_open(str(self.path / layout.REFERENCE), framework="pt") as f:
                src = f.get_tensor(name)
            self._stored.discard(name)
        if metrics.is_sharded(t):
            from torch.distributed.tensor import distribute_tensor

            mesh = t.device_mesh
            src = src if src is not None and tuple(src.shape) == tuple(t.shape) else torch.empty(tuple(t.shape))
            src = src.to(device=mesh.device_type, dtype=t.dtype)
            self.values[i] = distribute_tensor(src, mesh, t.placements, src_data_rank=0)
            return
        if not self.writes:  # other ranks: a stand-in, never written (rank 0 writes the run)
            self.values[i] = t.detach().clone()
        elif tuple(src.shape) == tuple(t.shape):
            self.values[i] = src.to(device=self.device or t.device, dtype=t.dtype)
        else:  # not this tensor's W_ref
            self.taken[i], self.refused[i] = None, "the stored W_ref has another shape than the tensor"

    def pending(self) -> dict:
        """The W_ref taken since the last hand-over, for the writer thread to add to the file."""
        out, self._pending = self._pending, {}
        return out

    # ------------------------------------------------------------------ the model's tensors change
    def grow(self, first: int, hashes: list[str], step: int) -> None:
        """Parameters `first`.. were appended (new names): known from now, as they are now."""
        n = len(hashes)
        for lst, fill in ((self.values, None), (self.taken, None), (self.refused, None),
                          (self.norms, None), (self.targets, None)):
            lst[first:first] = [fill] * n
        if not self.keep:
            return
        self.targets[first:first + n] = list(hashes)
        new = list(range(first, first + n))
        got = metrics.to_host(metrics.norms([self.tensors[i] for i in new]))
        for i, x in zip(new, got):
            self.norms[i] = float(x)
        self.take([i for i in new if self.params[i].requires_grad], {}, step, checked=False)

    def reshaped(self, indices: list[int], step: int) -> None:
        """Tensors replaced by ones of another shape or dtype: their drift counts from their
        value now (W_ref taken now if trainable, else when they first train, hash-checked)."""
        if not self.keep or not indices:
            return
        hashes = metrics.content_hashes([self.params[i] for i in indices],
                                        agree=self.concord.check if self.concord.on else None)
        got = metrics.to_host(metrics.norms([self.params[i] for i in indices]))
        for i, h, x in zip(indices, hashes, got):
            self.values[i] = self.taken[i] = self.refused[i] = None
            self.targets[i], self.norms[i] = h, float(x)
            self._stored.discard(self.names[i])
        self.take([i for i in indices if self.params[i].requires_grad], {}, step, checked=False)

    # ------------------------------------------------------------------ stage ends
    def complete_end(self, stage, internal, stored) -> None:
        """A stage's end was just stored: a tensor with no W_ref whose end bytes are those W_ref
        holds (its end hash equals its reference hash) has drift 0, by proof."""
        if not self.keep or stage is None or stage.index in self._ends_done or stage.end_metrics is None:
            return
        self._ends_done.add(stage.index)
        end = internal(stage.end_hashes)
        drift = internal(stage.end_metrics.get("drift"))
        if not end or drift is None:
            return
        for i, (v, t) in enumerate(zip(self.values, self.targets)):
            if v is None and t is not None and i < len(end) and end[i] == t and drift[i] is None:
                drift[i] = 0.0
        stage.end_metrics["drift"] = stored(drift)

    # ------------------------------------------------------------------ the manifest
    def manifest_fields(self, p0: int, n_params: int, n_buffers: int) -> dict:
        if not self.keep:
            return {"reference_taken": None, "reference_refused": None}
        return {"reference_taken": stored_list(self.taken, p0, n_params, n_buffers),
                "reference_refused": stored_list(self.refused, p0, n_params, n_buffers)}
