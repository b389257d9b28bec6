"""Steps an AMP GradScaler skips: they never reach the optimizer, so no step hook sees them."""

from __future__ import annotations

from ..errors import FreezeFrameError


class ScalerWatch:
    """Wraps `step` on one GradScaler *instance* (an instance attribute shadowing the class's
    method, removed by `remove()`; the class is never touched). After the scaler's own step,
    if the optimizer's step did not run, the step was skipped (inf/NaN gradients)."""

    def __init__(self, scaler, applied_count, on_skipped):
        step = getattr(scaler, "step", None)
        if not callable(step) or not hasattr(scaler, "update"):
            raise FreezeFrameError(f"scaler= expects a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler

        def wrapped(optimizer, *args, **kwargs):
            before = applied_count()
            out = step(optimizer, *args, **kwargs)
            if applied_count() == before:
                on_skipped(optimizer)
            return out

        self._wrapped = wrapped
        scaler.step = wrapped

    def remove(self) -> None:
        if self.scaler.__dict__.get("step") is self._wrapped:
            del self.scaler.step
