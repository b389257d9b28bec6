"""What a recording session starts from: its options, the versions it runs with, the reference
weights W_ref, and the check that an appended run is of the same model."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .._version import __version__
from ..errors import FreezeFrameError
from ..hashing import gathered
from . import metrics
from .dist import Dist


@dataclass
class Options:
    """Keyword options of `watch()` and the framework callbacks."""

    budget: float = 0.03             # overhead budget when every=None, as a fraction of step time
    reference: bool = True           # keep W_ref (one copy of the parameters) to measure drift
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


def load_or_create_reference(path: Path, names: list[str], tensors: list[torch.Tensor], existing: dict | None,
                              options: Options, *, save: bool = True, agree=None) -> tuple[list, list]:
    """W_ref for each tensor (None where unknown) and ||W_ref||. A new run stores the model as
    it is now in reference.safetensors; an appended run reads it back.

    DTensors (FSDP2): the stored reference is the gathered whole tensor; W_ref for drift is a
    shard like the parameter's, so drift is measured shard by shard and combined like every
    norm. Only rank 0 knows whether the run exists: all ranks agree on it first (`agree(value)`,
    the maximum over ranks, which raises when another rank's recorder failed), so all take the
    same collectives in the same order."""
    from safetensors.torch import load_file, save_file

    refs: list[torch.Tensor | None] = [None] * len(tensors)
    ref_file = path / "reference.safetensors"
    if not options.reference:
        return refs, [None] * len(tensors)
    device = options.reference_device
    sharded = [metrics.is_sharded(t) for t in tensors]
    appending = existing is not None
    if any(sharded) and agree is not None:
        appending = agree(1.0 if appending else 0.0) > 0
    if appending:
        stored = load_file(str(ref_file)) if existing is not None and ref_file.exists() else {}
        for i, (name, t) in enumerate(zip(names, tensors)):
            r = stored.get(name)
            if r is not None and tuple(r.shape) == tuple(t.shape) and not sharded[i]:
                refs[i] = r.to(device=device or t.device, dtype=t.dtype)
        if any(sharded):
            _distribute_stored(refs, names, tensors, sharded, stored)
        return refs, list((existing or {}).get("ref_norms") or [None] * len(tensors))
    cpu, error = {}, None
    with torch.no_grad():  # DTensors gathered whole, one after another on every rank
        for name, t in zip(names, tensors):
            data = gathered(t.detach())  # the collective
            try:  # an error here is raised after the last gather: no rank is left waiting in one
                cpu[name] = data.to("cpu", copy=True).contiguous()
            except Exception as e:  # noqa: BLE001
                error = error or e
    if error is not None:
        raise error
    if save:
        save_file(cpu, str(ref_file))
    for i, (name, t) in enumerate(zip(names, tensors)):
        target = torch.device(device) if device else t.device
        if sharded[i]:
            refs[i] = t.detach().clone()
        else:
            refs[i] = cpu[name] if target.type == "cpu" else t.detach().to(target, copy=True)
    return refs, [float(x) for x in metrics.to_host(metrics.norms(list(cpu.values())))]


def _distribute_stored(refs: list, names: list[str], tensors: list[torch.Tensor], sharded: list[bool],
                       stored: dict) -> None:
    """Rank 0's stored reference of each DTensor, scattered as shards like the parameter's (every
    rank enters the same collectives: first which tensors rank 0 has, then one scatter each)."""
    from torch.distributed.tensor import distribute_tensor

    idx = [i for i, s in enumerate(sharded) if s]

    def usable(i):
        r = stored.get(names[i])
        return r is not None and tuple(r.shape) == tuple(tensors[i].shape)

    have = Dist().agree_max([1.0 if usable(i) else 0.0 for i in idx])  # rank 0's (others hold none)
    for i, h in zip(idx, have):
        if h:
            t = tensors[i]
            mesh = t.device_mesh
            src = stored[names[i]] if usable(i) else torch.empty(tuple(t.shape))
            src = src.to(device=mesh.device_type, dtype=t.dtype)
            refs[i] = distribute_tensor(src, mesh, t.placements, src_data_rank=0)


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
