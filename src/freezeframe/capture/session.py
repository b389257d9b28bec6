"""What a recording session starts from: its options, the versions it runs with, and the check
that an appended run is of the same model (W_ref: capture/reference.py)."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .._version import __version__
from ..errors import FreezeFrameError


@dataclass
class Options:
    """Keyword options of `watch()` and the framework callbacks."""

    budget: float = 0.03             # overhead budget when every=None, as a fraction of step time
    reference: bool = True           # keep W_ref of tensors that train (and of buffers) to measure drift
    reference_device: str | None = None  # where W_ref lives for drift ("cpu" spares accelerator memory)
    scaler: object = None            # a torch.amp.GradScaler: count the steps it skips (else null)
    flush_seconds: float = 1.0       # a step is on disk at most about this long after it was recorded
                                     # (the crash window: README "Reliability", docs/run-format.md)
    hash_threads: int = 2            # threads hashing tensors at stage boundaries
    framework: str = "torch"         # set by integrations: "fastai", "lightning"
    skips_known: bool = False        # set by integrations that report cancelled steps
    framework_versions: dict = field(default_factory=dict)  # set by integrations

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "Options":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise FreezeFrameError(f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
        opts = cls(**kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        """Bad values are refused before anything is written, naming the option."""
        def bad(name, want):
            value = getattr(self, name)
            raise FreezeFrameError(f"option {name}={value!r} ({type(value).__name__}): expected {want}")

        def number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not number(self.budget) or not 0 < self.budget < 1:
            bad("budget", "a fraction between 0 and 1 (e.g. 0.03)")
        if not number(self.flush_seconds) or self.flush_seconds < 0:
            bad("flush_seconds", "a number of seconds >= 0")
        if not isinstance(self.hash_threads, int) or isinstance(self.hash_threads, bool) or self.hash_threads < 1:
            bad("hash_threads", "a positive integer")
        if not isinstance(self.reference, bool):
            bad("reference", "True or False")
        if self.reference_device is not None:
            try:
                torch.device(self.reference_device)
            except (RuntimeError, TypeError):
                bad("reference_device", "a torch device such as 'cpu' or 'cuda:0'")
        if self.scaler is not None and not all(callable(getattr(self.scaler, a, None)) for a in ("step", "update", "scale")):
            bad("scaler", "a torch.amp.GradScaler")
        if not isinstance(self.framework, str):
            bad("framework", "a string")
        if not isinstance(self.framework_versions, dict):
            bad("framework_versions", "a dict")


def versions(extra: dict) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "freezeframe": __version__, **extra}


def check_same_model(path: Path, stored: list | None, mine: list, any_order: bool = False) -> None:
    """mode="append" continues only a run of the same model: same parameter names, shapes, dtypes.
    `any_order`: a run whose parameters grew while recording lists them in the order they
    appeared, so this model's own order may differ (docs/recording.md)."""
    if stored == mine:
        return
    if any_order and stored is not None and sorted(stored, key=lambda r: r[0]) == sorted(mine, key=lambda r: r[0]):
        return
    raise FreezeFrameError(f"{str(path)!r} holds a run of a different model ({_first_difference(stored or [], mine)}); "
                           "use another run directory or mode='overwrite'")


def _first_difference(stored: list, mine: list) -> str:
    a = {row[0]: row for row in stored}
    b = {row[0]: row for row in mine}
    for name in b:
        if name not in a:
            return f"{name!r} is not in the stored run"
    for name in a:
        if name not in b:
            return f"{name!r} is missing from this model"
    for name in b:
        if a[name] != b[name]:
            return f"{name!r} was {a[name][1]} {a[name][2]}, now {b[name][1]} {b[name][2]}"
    return "parameter order differs"
