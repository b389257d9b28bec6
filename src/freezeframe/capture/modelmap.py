"""The model map: every parameter tensor (tied tensors once), floating-point buffer and module, by name."""

from __future__ import annotations

import json

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FreezeFrameError
from .peft import ModelFacts

# Name segments that wrappers insert inside a model (torch.compile of a submodule, FSDP1,
# activation checkpointing). Names are always the unwrapped model's. A DDP / DataParallel
# root's `module.` is removed by unwrapping the root, never by editing names, so a user's own
# submodule called `module` keeps its name.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)


def normalise_name(name: str) -> str:
    """Drop wrapper segments (`_orig_mod`, `_fsdp_wrapped_module`, ...) from a dotted name."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)  # DistributedDataParallel, DataParallel
        if isinstance(inner, nn.Module) and type(model).__name__ in {"DistributedDataParallel", "DataParallel"}:
            model = inner
            continue
    return model


def is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


@dataclass
class ParamInfo:
    name: str
    aliases: list[str]
    module: str
    module_type: str
    shape: list[int]
    numel: int
    dtype: str
    is_norm: bool
    from_stage: int | None = None  # set for a parameter that appeared after watching began
    adapter: str | None = None     # the PEFT adapter it belongs to (docs/peft.md); absent: a base tensor

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        for key in ("from_stage", "adapter"):
            if d[key] is None:
                del d[key]
        return d


@dataclass
class BufferInfo:
    name: str
    module: str
    module_type: str
    shape: list[int]
    numel: int
    dtype: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


class ParamTensors(list):
    """The map's parameter tensors. `facts` carries what capture/peft.py reads from the model at
    stage boundaries to the stage book, which is handed this list."""

    facts: ModelFacts | None = None


@dataclass
class ModelMap:
    """What the recorder knows about the model's structure. Tensors are addressed by index:
    parameters 0..P-1, then floating-point buffers P..P+B-1."""

    params: list[ParamInfo]
    buffers: list[BufferInfo]
    modules: list[dict]  # name, type, is_norm, in model order
    param_tensors: list[torch.Tensor] = field(repr=False, default_factory=ParamTensors)
    buffer_tensors: list[torch.Tensor] = field(repr=False, default_factory=list)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.param_tensors + self.buffer_tensors

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params] + [b.name for b in self.buffers]

    def signature(self) -> list[list]:
        """What must match for a run to be appended to: names, shapes and dtypes of the parameters."""
        return [[p.name, p.shape, p.dtype] for p in self.params]

    @property
    def peft(self) -> dict | None:
        """The manifest's `model.peft` (docs/peft.md)."""
        facts = getattr(self.param_tensors, "facts", None)
        return None if facts is None else facts.peft

    buffers_at: int | None = None  # P0 once parameters were added (docs/run-format.md, "Tensor indices")

    # the three lists and the signature as JSON text, encoded once per tensor-set change
    _text: tuple | None = field(default=None, repr=False, compare=False)
    _version: int = field(default=0, repr=False, compare=False)

    def changed(self) -> None:
        """The tensor set changed (tensors replaced, added or gone): encode the lists anew."""
        self._version += 1

    def _lists(self) -> tuple:
        key = (self._version, len(self.params), len(self.buffers), len(self.modules))
        if self._text is None or self._text[0] != key:
            enc = json.JSONEncoder(allow_nan=False).encode
            self._text = (key, enc(self.signature()), enc([p.to_json() for p in self.params]),
                          enc([b.to_json() for b in self.buffers]), enc(self.modules))
        return self._text

    def signature_json(self) -> str:
        """`json.dumps(self.signature())`, encoded once per tensor-set change."""
        return self._lists()[1]

    def model_json(self, forward_order) -> str:
        """The manifest's `model` object (docs/run-format.md) as what `json.dumps` gives for it;
        at thousands of tensors encoding the lists again on every flush (once a second) was most
        of a flush's cost."""
        _, _, params, buffers, modules = self._lists()
        rest = {"peft": self.peft}
        if self.buffers_at is not None and self.buffers_at != len(self.params):
            rest["buffers_at"] = self.buffers_at
        rest["forward_order"] = forward_order
        return ('{"params": ' + params + ', "buffers": ' + buffers + ', "modules": ' + modules + ", "
                + json.JSONEncoder(allow_nan=False).encode(rest)[1:])


def build_model_map(model: nn.Module) -> ModelMap:
    if not isinstance(model, nn.Module):
        raise FreezeFrameError(f"watch() expects a torch.nn.Module as the model, got {type(model).__name__}")
    root = unwrap(model)
    modules = []
    module_of: dict[str, nn.Module] = {}
    for mname, mod in root.named_modules(remove_duplicate=True):
        name = normalise_name(mname)
        module_of[name] = mod
        modules.append({"name": name, "type": type(mod).__name__, "is_norm": is_norm_module(mod)})

    facts = ModelFacts(root, normalise_name)
    params: list[ParamInfo] = []
    tensors = ParamTensors()
    tensors.facts = facts
    by_id: dict[int, int] = {}
    for pname, p in root.named_parameters(remove_duplicate=False):
        name = normalise_name(pname)
        if id(p) in by_id:  # a tied tensor: one entry, several names
            params[by_id[id(p)]].aliases.append(name)
            continue
        if p.device.type == "meta":
            raise FreezeFrameError(
                f"parameter {name!r} is on the 'meta' device (no data): materialise the model "
                "(e.g. model.to_empty(device=...) and load its weights) before watching it"
            )
        mname, _, _ = name.rpartition(".")
        mod = module_of.get(mname, root)
        by_id[id(p)] = len(params)
        params.append(ParamInfo(
            name=name, aliases=[], module=mname, module_type=type(mod).__name__,
            shape=list(p.shape), numel=p.numel(), dtype=str(p.dtype).removeprefix("torch."),
            is_norm=is_norm_module(mod), adapter=facts.adapter_of(name),
        ))
        tensors.append(p)
    if not params:
        raise FreezeFrameError(f"the model ({type(root).__name__}) has no parameters: there is nothing to watch")

    buffers: list[BufferInfo] = []
    btensors: list[torch.Tensor] = []
    seen_buf: set[int] = set()
    for bname, b in root.named_buffers(remove_duplicate=False):
        if b is None or not b.is_floating_point() or id(b) in seen_buf:
            continue
        seen_buf.add(id(b))
        name = normalise_name(bname)
        if b.device.type == "meta":
            raise FreezeFrameError(
                f"buffer {name!r} is on the 'meta' device (no data): materialise the model "
                "(e.g. model.to_empty(device=...) and load its weights) before watching it")
        mname, _, _ = name.rpartition(".")
        mod = module_of.get(mname, root)
        buffers.append(BufferInfo(name=name, module=mname, module_type=type(mod).__name__,
                                  shape=list(b.shape), numel=b.numel(),
                                  dtype=str(b.dtype).removeprefix("torch.")))
        btensors.append(b)
    return ModelMap(params=params, buffers=buffers, modules=modules,
                    param_tensors=tensors, buffer_tensors=btensors)


OPTIMIZER_ONLY = "optimizer-only"


def add_optimizer_only(model_map: ModelMap, views: list) -> list[int]:
    """Tensors an optimizer holds that the model does not (a learnable temperature kept beside
    the model): recorded as parameters `optimizer-only.pg{g}.{k}` (k: the tensor's place in
    group g; `optimizer-only.opt{j}.pg{g}.{k}` with several optimizers), module
    "optimizer-only", appended after the model's parameters (docs/recording.md). Returns their
    indices. Call before anything is recorded: buffers are numbered after the parameters."""
    known = {id(p) for p in model_map.param_tensors}
    several = len(views) > 1
    added = []
    for j, view in enumerate(views):
        for g, (_, params) in enumerate(view.groups()):
            for k, p in enumerate(params):
                if id(p) in known or not isinstance(p, torch.Tensor):
                    continue
                known.add(id(p))
                name = f"{OPTIMIZER_ONLY}.{f'opt{j}.' if several else ''}pg{g}.{k}"
                model_map.params.append(ParamInfo(
                    name=name, aliases=[], module=OPTIMIZER_ONLY, module_type="Parameter",
                    shape=list(p.shape), numel=p.numel(), dtype=str(p.dtype).removeprefix("torch."), is_norm=False))
                model_map.param_tensors.append(p)
                added.append(len(model_map.params) - 1)
    if added and not any(m["name"] == OPTIMIZER_ONLY for m in model_map.modules):
        model_map.modules.append({"name": OPTIMIZER_ONLY, "type": "Parameter", "is_norm": False})
    return added
