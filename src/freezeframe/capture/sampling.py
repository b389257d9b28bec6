"""The sampling schedule: which steps get tensor metrics, and the calibration of `every`."""

from __future__ import annotations

import math
import statistics

from ..errors import FreezeFrameError


class Sampler:
    """`every=N` records metrics on every N-th step of a stage (the first step always).
    `every=None` records the first `calibration_steps` steps, measures what recording costs
    against the training step it watches, then fixes N so that the overhead stays within
    `budget` (a fraction of step time), and keeps it for the session."""

    def __init__(self, every: int | None, budget: float, *, calibration_steps: int = 8, warmup: int = 2,
                 max_every: int = 10_000):
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise FreezeFrameError(f"every must be a positive integer or None, got {every!r}")
        if not 0 < budget < 1:
            raise FreezeFrameError(f"option budget={budget!r}: expected a fraction between 0 and 1")
        self.every = every
        self.budget = budget
        self.calibration_steps = calibration_steps
        self.warmup = warmup
        self.max_every = max_every
        self._samples: list[tuple[float, float, float]] = []  # (training s, recording s, cheap s)
        self._seen = 0
        self.measured: dict | None = None

    @property
    def calibrating(self) -> bool:
        return self.every is None

    def is_recorded(self, step_in_stage: int) -> bool:
        if self.every is None:
            return True
        return step_in_stage % self.every == 0

    def observe(self, sample: tuple[float, float, float] | None) -> bool:
        """Count one step (with its (training s, recording s, per-step s) timings, or None when
        the step is not a clean sample: it began a stage or flushed). Returns True when `every`
        was just fixed: always after the same number of steps, so that the ranks of a
        distributed job reach the decision together."""
        if self.every is not None:
            return False
        self._seen += 1
        if sample is not None and self._seen > self.warmup:
            self._samples.append(sample)
        if self._seen < self.warmup + self.calibration_steps:
            return False
        if not self._samples:
            self.every = 1
            self.measured = {"budget": self.budget, "samples": 0}
            return True
        train = statistics.median(s[0] for s in self._samples)
        rec = statistics.median(s[1] for s in self._samples)
        cheap = statistics.median(s[2] for s in self._samples)
        # aim at 60 % of the budget: timings on a shared machine are noisy, and the per-step
        # cost measured here leaves out the gradient hooks that run inside backward
        room = max(0.6 * self.budget * train - cheap, 0.1 * self.budget * train)
        self.every = int(min(self.max_every, max(1, math.ceil(rec / room)))) if room > 0 else self.max_every
        self.measured = {"step_s": train, "recording_s": rec, "per_step_s": cheap, "budget": self.budget,
                         "samples": len(self._samples)}
        return True

    def impose(self, every: int) -> None:
        """Take the `every` another rank decided."""
        self.every = max(1, int(every))
