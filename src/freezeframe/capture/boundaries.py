"""What is known of every tensor's bytes at stage boundaries: content hashes at known points,
version counters in between, and buffers written outside forward passes."""

from __future__ import annotations

import torch

from . import metrics


class BoundaryTracker:
    """Keeps enough state to state each stage's start and the previous stage's end exactly.

    - At a known point (watch start, an explicit or framework stage end, close) every tensor
      is hashed: the *baseline*.
    - After every applied step the parameters' version counters are noted and the buffers
      copied (small: BatchNorm statistics), so that a boundary discovered only at the next
      step still knows the previous end: a parameter whose version did not move was not
      written; a written one's end is unknown (None).
    - Buffers also change in forward passes, which is training; a buffer written outside a
      forward pass or a step (load_state_dict) is hashed right after the write and that is
      its state at the next stage's start.
    """

    def __init__(self, params: list[torch.Tensor], buffers: list[torch.Tensor], hash_threads: int = 2,
                 agree=None):
        self.params, self.buffers = params, buffers
        self.threads = hash_threads
        self.agree = agree  # called before gathering sharded tensors (see dist.Concord)
        self.baseline = self.hash_all()
        self.end_known = True              # the baseline is at or after the last applied step
        self._written: dict[int, str] = {}
        self._buf_versions = [b._version for b in buffers]
        self._param_versions = [p._version for p in params]
        self.buffer_copies = metrics.snapshot(buffers)

    def hash_all(self) -> list[str]:
        return metrics.content_hashes(self.params + self.buffers, threads=self.threads, agree=self.agree)

    def detect_buffer_writes(self) -> None:
        versions = [b._version for b in self.buffers]
        if versions == self._buf_versions:  # the usual case, checked at C speed
            return
        for b, (v, v0) in enumerate(zip(versions, self._buf_versions)):
            if v != v0:
                self._written[b] = metrics.content_hash(self.buffers[b])
        self._buf_versions = versions

    def after_forward(self) -> None:
        self._buf_versions = [b._version for b in self.buffers]

    def after_step(self) -> None:
        self._param_versions = [p._version for p in self.params]
        if self.buffers:
            torch._foreach_copy_(self.buffer_copies, self.buffers)
            self._buf_versions = [b._version for b in self.buffers]
        self._written.clear()
        self.end_known = False

    def known_end(self) -> list[str]:
        """Hash everything now: a stage end whose time is known. Returns the hashes."""
        self.baseline = self.hash_all()
        self.end_known = True
        self._written.clear()
        self._buf_versions = [b._version for b in self.buffers]
        return self.baseline

    def discovered_end(self, now_params: list[str]) -> tuple[list, list[bool]]:
        """The end of the stage whose last step was the previous applied step, found only now.
        Returns (end hashes with None for params written since that step, written mask)."""
        written = [p._version != v0 for p, v0 in zip(self.params, self._param_versions)]
        end_p = [None if w else h for h, w in zip(now_params, written)]
        end_b = metrics.content_hashes(self.buffer_copies, threads=self.threads)
        self.baseline = end_p + end_b
        self.end_known = True
        return self.baseline, written

    def start(self, now_params: list[str]) -> list[str]:
        """A stage's start: params as they are now; buffers as at the baseline unless written since."""
        P = len(self.params)
        return now_params + [self._written.get(b, self.baseline[P + b]) for b in range(len(self.buffers))]
