"""What a recording session starts from: its options, the versions it runs with, the reference
weights W_ref, and the check that an appended run is of the same model."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .. import __version__
from ..errors import FreezeFrameError
from . import metrics


@dataclass
class Options:
    """Keyword options of `watch()` and the framework callbacks."""

    budget: float = 0.03             # overhead budget when every=None, as a fraction of step time
    reference: bool = True           # keep W_ref (one copy of the parameters) to measure drift
    reference_device: str | None = None  # where W_ref lives for drift ("cpu" spares accelerator memory)
    scaler: object = None            # a torch.amp.GradScaler: count the steps it skips (else null)
    flush_seconds: float = 5.0       # the longest a step waits in memory before it is written
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
        return cls(**kwargs)


def versions(extra: dict) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "freezeframe": __version__, **extra}


def load_or_create_reference(path: Path, names: list[str], tensors: list[torch.Tensor], existing: dict | None,
                              options: Options, *, save: bool = True) -> tuple[list, list]:
    """W_ref for each tensor (None where unknown) and ||W_ref||. A new run stores the model as
    it is now in reference.safetensors; an appended run reads it back."""
    from safetensors.torch import load_file, save_file

    refs: list[torch.Tensor | None] = [None] * len(tensors)
    ref_file = path / "reference.safetensors"
    if not options.reference:
        return refs, [None] * len(tensors)
    device = options.reference_device
    if existing is not None:
        stored = load_file(str(ref_file)) if ref_file.exists() else {}
        for i, (name, t) in enumerate(zip(names, tensors)):
            r = stored.get(name)
            if r is not None and tuple(r.shape) == tuple(t.shape):
                refs[i] = r.to(device=device or t.device, dtype=t.dtype)
        return refs, list(existing.get("ref_norms") or [None] * len(tensors))
    with torch.no_grad():
        cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in zip(names, tensors)}
    if save:
        save_file(cpu, str(ref_file))
    for i, (name, t) in enumerate(zip(names, tensors)):
        target = torch.device(device) if device else t.device
        refs[i] = cpu[name] if target.type == "cpu" else t.detach().to(target, copy=True)
    return refs, [float(x) for x in metrics.to_host(metrics.norms(list(cpu.values())))]


def check_same_model(path: Path, stored: list | None, mine: list) -> None:
    """mode="append" continues only a run of the same model: same parameter names, shapes, dtypes."""
    if stored == mine:
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
