"""What is known of every tensor's bytes at stage boundaries: content hashes at known points,
version counters in between, and buffers written outside forward passes."""

from __future__ import annotations

import operator

import torch

from . import metrics

# one C-level pass over a tensor list (no Python loop): the step path runs these on every step
_version_of = operator.attrgetter("_version")


def versions(tensors: list) -> list[int]:
    return list(map(_version_of, tensors))


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
        self._buf_versions = versions(buffers)
        self._param_versions = versions(params)
        self.buffer_copies = metrics.snapshot(buffers)
        self.start_versions: list[int] | None = None  # param versions at the current stage's start

    def grow(self, first: int) -> None:
        """Parameters `first`.. were appended to `params` (new names, docs/recording.md): known
        from now, as they are now."""
        new = self.params[first:]
        P = first
        self.baseline = (self.baseline[:P] + metrics.content_hashes(new, threads=self.threads, agree=self.agree)
                         + self.baseline[P:])
        self._param_versions = self._param_versions[:P] + versions(new)

    def hash_all(self) -> list[str]:
        return metrics.content_hashes(self.params + self.buffers, threads=self.threads, agree=self.agree)

    def detect_buffer_writes(self) -> None:
        if not self.buffers:
            return
        now = versions(self.buffers)
        if now == self._buf_versions:  # the usual case, checked at C speed
            return
        for b, (v, v0) in enumerate(zip(now, self._buf_versions)):
            if v != v0:
                self._written[b] = metrics.content_hash(self.buffers[b])
        self._buf_versions = now

    def after_forward(self) -> None:
        if self.buffers:
            self._buf_versions = versions(self.buffers)

    def after_step(self) -> None:
        self._param_versions = versions(self.params)
        if self.buffers:
            torch._foreach_copy_(self.buffer_copies, self.buffers)
            self._buf_versions = versions(self.buffers)
        if self._written:
            self._written.clear()
        self.end_known = False

    def known_end(self, held=frozenset(), start_hashes=None) -> tuple[list[str], list[int], list[int]]:
        """Hash everything now: a stage end whose time is known. Returns (the hashes, params and
        buffers written outside an optimizer step since the last applied step; see `_written_since`)."""
        self.detect_buffer_writes()
        now = self.hash_all()
        wp, wb = ([], []) if self.end_known else self._written_since(now[:len(self.params)], held, start_hashes)
        P = len(self.params)
        wb = [b for b in wb if now[P + b] != self._copy_hash(b)]
        self.baseline = now
        self.end_known = True
        self._written.clear()
        self._buf_versions = versions(self.buffers)
        return self.baseline, wp, wb

    def discovered_end(self, now_params: list[str], held=frozenset(), start_hashes=None
                       ) -> tuple[list, list[bool], list[int], list[int]]:
        """The end of the stage whose last step was the previous applied step, found only now.
        Returns (end hashes with None for params whose bytes after that step are unknown, the mask
        of params whose bytes now are not that end, written params, written buffers)."""
        written = self._versions_moved()
        end_p = []
        for i, (h, w) in enumerate(zip(now_params, written)):
            end_p.append(h if not w else self._unstepped_hash(i, held, start_hashes))
        skip = [e is None or e != h for e, h in zip(end_p, now_params)]
        end_b = metrics.content_hashes(self.buffer_copies, threads=self.threads)
        wb = [b for b, h in self._written.items() if h != end_b[b]]
        self.baseline = end_p + end_b
        self.end_known = True
        return self.baseline, skip, [i for i, s in enumerate(skip) if s], sorted(wb)

    def start(self, now_params: list[str]) -> list[str]:
        """A stage's start: params as they are now; buffers as at the baseline unless written since."""
        P = len(self.params)
        self.start_versions = versions(self.params)
        return now_params + [self._written.get(b, self.baseline[P + b]) for b in range(len(self.buffers))]

    # ------------------------------------------------------------------ writes outside a step
    def _versions_moved(self) -> list[bool]:
        return list(map(operator.ne, versions(self.params), self._param_versions))

    def _unstepped_hash(self, i: int, held, start_hashes) -> str | None:
        """The bytes of param i after the last applied step, when they are known although its
        version moved since: a tensor no optimizer of the stage holds and no step wrote (its
        version then was its version at the stage's start) still has the bytes it started with.
        Optimizers that write `.data` (fastai's) move no version counter, hence `held`."""
        sv = self.start_versions
        if (start_hashes is None or sv is None or i in held or i >= len(sv) or i >= len(start_hashes)
                or self._param_versions[i] != sv[i]):
            return None
        return start_hashes[i]

    def _written_since(self, now_params: list[str], held, start_hashes) -> tuple[list[int], list[int]]:
        """Params and buffers written outside a step since the last applied step, whose bytes now
        differ from their bytes after it (or whose bytes after it are unknown: listed)."""
        wp = [i for i, w in enumerate(self._versions_moved())
              if w and self._unstepped_hash(i, held, start_hashes) != now_params[i]]
        return wp, sorted(self._written)

    def _copy_hash(self, b: int) -> str:
        return metrics.content_hash(self.buffer_copies[b])
