"""The values `Recorder.log()` stores: real numbers; anything else is skipped (docs/recording.md)."""

from __future__ import annotations

import numpy as np
import torch


def scalar(value) -> float | None:
    """A value `log()` can store: a real number (int, float, bool as 1.0 / 0.0, a numpy scalar,
    a tensor or array of exactly one real element), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        return float(value.detach().float().item())  # a sync point, as the user's own .item() would be
    if isinstance(value, np.ndarray):
        if value.size != 1 or not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_) \
                or np.iscomplexobj(value):
            return None
        return float(value.reshape(-1)[0])
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        try:
            return float(value)
        except (OverflowError, ValueError):  # an int too large for a float
            return None
    return None


def describe(value) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        kind = "tensor" if isinstance(value, torch.Tensor) else "numpy array"
        return f"a {kind} of shape {tuple(value.shape)} ({str(value.dtype).removeprefix('torch.')})"
    return f"a value of type {type(value).__name__}"
