"""What a PEFT (LoRA) model states about itself, read duck-typed from the model's own attributes
(peft and transformers are never imported): the adapter configuration, which parameter belongs
to which adapter, the LoRA-wrapped modules and, at a captured stage end, the update each adapter
makes to its base weight, whether a factor is all zero and whether it is merged; and, at a
stage's start, the merge state and the model's gradient checkpointing facts (docs/peft.md)."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("freezeframe")

# Module names under which PEFT keeps adapter tensors (LoraLayer.adapter_layer_names) and the
# trainable copies of `modules_to_save` (ModulesToSaveWrapper): the segment after one of them is
# the adapter's name, e.g. `...c_attn.lora_A.default.weight`, `...score.modules_to_save.default.weight`.
ADAPTER_SEGMENTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                              "lora_magnitude_vector", "modules_to_save"})
# The forward hook that makes the input embeddings' output require grad: transformers'
# `enable_input_require_grads` registers `make_inputs_require_grads`, PEFT's fallback for models
# without that method `make_inputs_require_grad`.
_INPUT_GRAD_HOOKS = frozenset({"make_inputs_require_grads", "make_inputs_require_grad"})


def _names(value) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    try:
        return sorted(str(v) for v in value)
    except TypeError:
        return None


def _text(value) -> str | None:
    value = getattr(value, "value", value)
    return None if value is None else str(value)


def _active(model, names: list[str]) -> list[str]:
    try:
        act = getattr(model, "active_adapters", None)
        act = act() if callable(act) else act
        if act is None:
            act = getattr(model, "active_adapter", None)
    except Exception:  # noqa: BLE001 - a property of the user's model may raise
        act = None
    if isinstance(act, str):
        act = [act]
    if not isinstance(act, (list, tuple)):
        return names[:1]
    return [str(a) for a in act if str(a) in names]


def config_facts(model: nn.Module) -> dict | None:
    """The manifest's `model.peft` (docs/peft.md): null for a model without `peft_config`."""
    try:
        configs = getattr(model, "peft_config", None)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(configs, dict) or not configs:
        return None
    names = [str(n) for n in configs]
    active = _active(model, names)
    cfg = configs.get(active[0] if active else names[0])
    ptype = getattr(cfg, "peft_type", None)
    ptype = getattr(ptype, "value", ptype)

    def number(key):
        v = getattr(cfg, key, None)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return {
        "type": None if ptype is None else str(ptype),
        "r": number("r"), "lora_alpha": number("lora_alpha"),
        "target_modules": _names(getattr(cfg, "target_modules", None)),
        "modules_to_save": _names(getattr(cfg, "modules_to_save", None)),
        "use_rslora": bool(getattr(cfg, "use_rslora", False)),
        "use_dora": bool(getattr(cfg, "use_dora", False)),
        "bias": _text(getattr(cfg, "bias", None)),
        "adapters": names, "active": active,
    }


def adapter_of(name: str, adapters: list[str]) -> str | None:
    """The adapter a parameter belongs to, from its name (null for a base tensor)."""
    parts = name.split(".")
    for i, seg in enumerate(parts[:-1]):
        if seg in ADAPTER_SEGMENTS and parts[i + 1] in adapters:
            return parts[i + 1]
    return None


def _is_lora(mod: nn.Module) -> bool:
    children = vars(mod).get("_modules") or {}
    return "base_layer" in children and "lora_A" in children and "lora_B" in children


def _adapter(mod: nn.Module) -> str | None:
    """The module's active adapter that it holds (else the first it holds)."""
    held = [str(k) for k in list(mod.lora_A.keys()) + list(getattr(mod, "lora_embedding_A", {}).keys())]
    try:
        act = mod.active_adapters
    except Exception:  # noqa: BLE001
        act = []
    for a in act if isinstance(act, (list, tuple)) else []:
        if a in held:
            return a
    return held[0] if held else None


def lora_modules(root: nn.Module, normalise) -> list[tuple[str, nn.Module]]:
    """Every LoRA-wrapped module (one with `lora_A`, `lora_B` and `base_layer`), by map name."""
    return [(normalise(n), m) for n, m in root.named_modules(remove_duplicate=True) if _is_lora(m)]


def _factor(mod: nn.Module, adapter: str, side: str) -> torch.Tensor | None:
    """The adapter's factor `side` ("A" or "B"): `lora_A/B[adapter].weight`, or the embedding's
    `lora_embedding_A/B[adapter]`."""
    linear = getattr(mod, f"lora_{side}")
    if adapter in linear:
        return linear[adapter].weight
    emb = getattr(mod, f"lora_embedding_{side}", None)
    return emb[adapter] if emb is not None and adapter in emb else None


def _all_zero(t: torch.Tensor | None) -> bool | None:
    """Every element exactly zero (count_nonzero, not a norm); null without the tensor."""
    if t is None:
        return None
    with torch.no_grad():
        return int(torch.count_nonzero(t)) == 0


def _merged(mod: nn.Module) -> bool | None:
    """The layer's own merge state: PEFT's `merged` (`bool(merged_adapters)`), true while an
    adapter's update is merged into the base weight; null when the layer does not say."""
    try:
        merged = getattr(mod, "merged_adapters", None)
    except Exception:  # noqa: BLE001 - an attribute of the user's model may raise
        return None
    return bool(merged) if isinstance(merged, (list, tuple)) else None


def _delta_rel(mod: nn.Module, adapter: str) -> float | None:
    """‖ΔW‖_F / ‖W_base‖_F, ΔW = the module's own `get_delta_weight(adapter)` (scale·B·A,
    transposed where fan_in_fan_out; scale = lora_alpha/r, or lora_alpha/sqrt(r) with rsLoRA).
    Null when it cannot be computed (a quantised or sharded base weight, another layer type)."""
    try:
        with torch.no_grad():
            delta = mod.get_delta_weight(adapter)
            base = getattr(mod.get_base_layer(), "weight", None)
            if (not isinstance(delta, torch.Tensor) or not isinstance(base, torch.Tensor)
                    or not base.is_floating_point() or tuple(delta.shape) != tuple(base.shape)):
                log.info("freezeframe: no LoRA delta for a %s (adapter %r): its base weight is not a plain "
                         "floating-point tensor of ΔW's shape", type(mod).__name__, adapter)
                return None
            num = torch.linalg.vector_norm(delta, dtype=torch.float32)
            den = torch.linalg.vector_norm(base.detach(), dtype=torch.float32)
            num, den = float(num), float(den)
        if not den or num != num or den != den:
            return None
        return num / den
    except Exception as e:  # noqa: BLE001 - a fact missing, never a broken recording
        log.info("freezeframe: the LoRA delta of a %s (adapter %r) could not be computed: %s: %s",
                 type(mod).__name__, adapter, type(e).__name__, e)
        return None


def lora_state(root: nn.Module, normalise, before: dict | None = None) -> dict | None:
    """A stage record's `lora` at a captured end: {module: {adapter, delta_rel, b_zero, a_zero,
    merged}} for every LoRA-wrapped module now in the model, and {adapter, removed: true} for each
    module of `before` (module -> adapter, the LoRA-wrapped modules at the stage's start) that is
    no longer one (`merge_and_unload()` or `unload()`); null when there is none."""
    out = {}
    for name, mod in lora_modules(root, normalise):
        adapter = _adapter(mod)
        if adapter is None:
            continue
        out[name] = {"adapter": adapter, "delta_rel": _delta_rel(mod, adapter),
                     "b_zero": _all_zero(_factor(mod, adapter, "B")), "a_zero": _all_zero(_factor(mod, adapter, "A")),
                     "merged": _merged(mod)}
    for name, adapter in (before or {}).items():
        if name not in out:
            out[name] = {"adapter": adapter, "delta_rel": None, "b_zero": None, "a_zero": None, "merged": None,
                         "removed": True}
    return out or None


def lora_start(root: nn.Module, normalise) -> tuple[dict, list[str]]:
    """At a stage's start: the LoRA-wrapped modules (module -> adapter) and those whose layer
    says an adapter is merged into its base weight (stage meta `lora_merged`)."""
    held, merged = {}, []
    for name, mod in lora_modules(root, normalise):
        adapter = _adapter(mod)
        if adapter is not None:
            held[name] = adapter
            if _merged(mod):
                merged.append(name)
    return held, merged


def _reentrant(func) -> bool | None:
    """The `use_reentrant` a `_gradient_checkpointing_func` (a functools.partial of torch's
    checkpoint, as transformers builds it) carries; torch's checkpoint runs reentrant when it is
    not passed. Null for a function that is not such a partial."""
    keywords = getattr(func, "keywords", None)
    if not isinstance(keywords, dict):
        return None
    value = keywords.get("use_reentrant", True)
    return None if value is None else bool(value)


def gradient_checkpointing(root: nn.Module) -> dict | None:
    """Stage meta `gradient_checkpointing`: {enabled, use_reentrant, inputs_require_grad} from the
    modules that carry transformers' `gradient_checkpointing` flag; null when none does."""
    flags, funcs, inputs = [], [], False
    for m in root.modules():
        d = vars(m)
        if "gradient_checkpointing" in d:
            flags.append(d["gradient_checkpointing"] is True)
            if d["gradient_checkpointing"] is True and "_gradient_checkpointing_func" in d:
                funcs.append(d["_gradient_checkpointing_func"])
        hooks = d.get("_forward_hooks") or {}
        if any(getattr(h, "__name__", None) in _INPUT_GRAD_HOOKS for h in hooks.values()):
            inputs = True
    if not flags:
        return None
    enabled = any(flags)
    reentrant = {_reentrant(f) for f in funcs}
    return {"enabled": enabled,
            "use_reentrant": (reentrant.pop() if len(reentrant) == 1 else None) if enabled else None,
            "inputs_require_grad": inputs}


class ModelFacts:
    """What capture/peft.py reads from the watched model, for the model map and the stage book."""

    def __init__(self, root: nn.Module, normalise):
        self.root, self.normalise = root, normalise
        self.peft = config_facts(root)
        self._held: dict | None = None  # the LoRA-wrapped modules at the current stage's start

    def adapter_of(self, name: str) -> str | None:
        return None if self.peft is None else adapter_of(name, self.peft["adapters"])

    def stage_begin(self, meta: dict) -> None:
        """At a stage's start: its `gradient_checkpointing` meta, unless an integration gave one,
        and for a PEFT model `lora_merged` (the LoRA-wrapped modules with an adapter merged)."""
        if self.peft is not None:
            try:
                self._held, merged = lora_start(self.root, self.normalise)
                meta["lora_merged"] = merged
            except Exception as e:  # noqa: BLE001
                self._held = None
                log.info("freezeframe: the LoRA merge state at this stage's start was not read: %s: %s",
                         type(e).__name__, e)
        try:
            gc = gradient_checkpointing(self.root)
        except Exception as e:  # noqa: BLE001
            log.info("freezeframe: gradient checkpointing facts not read: %s: %s", type(e).__name__, e)
            return
        if gc is not None:
            meta.setdefault("gradient_checkpointing", gc)

    def stage_end(self) -> dict | None:
        """At a captured stage end: the stage record's `lora`."""
        if self.peft is None:
            return None
        try:
            return lora_state(self.root, self.normalise, self._held)
        except Exception as e:  # noqa: BLE001 - the rest of the stage's end is recorded
            log.warning("freezeframe: the LoRA facts of this stage end were not recorded: %s: %s",
                        type(e).__name__, e)
            return None
