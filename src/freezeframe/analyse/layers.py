"""The summary's `layers[]` and `run.layer_counts`: the modules that own parameters, in the order
the forward pass first ran them, with their block, body/head part, branch and weight-layer number
(docs/summary-format.md, "layers[]")."""

from __future__ import annotations

import re

CONTAINERS = frozenset({"Sequential", "ModuleList", "ModuleDict"})
HEAD_NAMES = frozenset({"head", "fc", "classifier", "heads"})
SHORTCUT_NAMES = frozenset({"downsample", "shortcut", "skip"})
OPTIMIZER_ONLY = "optimizer-only"  # tensors only an optimizer holds (docs/recording.md): no part
_WEIGHT_TYPE = re.compile(r"^(Conv\w*[123]d|Linear)$")  # Conv1d..3d, ConvTranspose2d, Linear


def is_weight_type(type_name: str) -> bool:
    """A convolution or a Linear layer: what "a 34-layer network" counts."""
    return bool(_WEIGHT_TYPE.match(type_name or ""))


def _ancestors(name: str) -> list[str]:
    """Proper ancestors of a dotted module name, nearest first, the root ("") left out."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def block_of(name: str, types: dict[str, str]) -> str:
    """The nearest ancestor that is not a container (Sequential, ModuleList, ModuleDict) and not
    the root; else the top-level child the module sits in; "" for the root's own parameters."""
    if not name:
        return ""
    for anc in _ancestors(name):
        if types.get(anc) not in CONTAINERS:
            return anc
    return name.split(".")[0]


def part_rule(modules: list[dict]) -> dict | None:
    """How top-level children map to "body" / "head": fastai's layout (a Sequential root with
    children "0", the body, and "1", the head), else a child named head / fc / classifier /
    heads is the head and the rest the body; None when neither applies."""
    root_type = next((m["type"] for m in modules if m["name"] == ""), None)
    top = {m["name"] for m in modules if m["name"] and "." not in m["name"] and m["name"] != OPTIMIZER_ONLY}
    if root_type == "Sequential" and top == {"0", "1"}:
        return {"0": "body", "1": "head"}
    if top & HEAD_NAMES:
        return {t: "head" if t in HEAD_NAMES else "body" for t in top}
    return None


def part_of(name: str, rule: dict | None) -> str | None:
    if rule is None or not name or name == OPTIMIZER_ONLY:
        return None  # the root's own tensors sit in no child
    return rule.get(name.split(".")[0], "body")


def branch_of(name: str) -> str:
    """"shortcut" for a module inside (or named) downsample / shortcut / skip, else "main"."""
    return "shortcut" if any(p in SHORTCUT_NAMES for p in name.split(".")) else "main"


def _owned(params: list[dict]) -> dict[str, list[str]]:
    """Module name -> the tensor names it owns directly (a tied tensor under each of its names)."""
    out: dict[str, list[str]] = {}
    for p in params:
        for n in [p["name"], *(p.get("aliases") or [])]:
            owner = p["module"] if n == p["name"] else n.rpartition(".")[0]
            out.setdefault(owner, []).append(n)
    return out


def _groups(params: list[dict], stages: list[dict]) -> dict[str, int | None]:
    """Per tensor name: its param-group index in the last training stage where an optimizer that
    stepped held it (None when none ever did)."""
    train = [k for k, s in enumerate(stages) if s.get("kind", "train") != "trial"]
    out = {}
    for p in params:
        g = next((p["stages"][k]["group"] for k in reversed(train)
                  if k < len(p["stages"]) and p["stages"][k]["group"] is not None), None)
        for n in [p["name"], *(p.get("aliases") or [])]:
            out[n] = g
    return out


def build_layers(model: dict, params: list[dict], stages: list[dict]) -> tuple[list[dict], dict]:
    """(`layers[]`, `run.layer_counts`) from the manifest's model map (`model`, with its
    `forward_order`) and the summary's `params[]` and `stages[]`."""
    modules = [m for m in model.get("modules") or [] if isinstance(m, dict)]
    types = {m["name"]: m["type"] for m in modules}
    owned = _owned(params)
    in_model_order = [m["name"] for m in modules if m["name"] in owned]
    in_model_order += [n for n in owned if n not in types]  # not in the map (defensive): last
    order = model.get("forward_order")
    if isinstance(order, list):
        first = []
        for n in order:
            if n in owned and n not in first:
                first.append(n)
        seen = set(first)
        rows = [(n, True) for n in first] + [(n, False) for n in in_model_order if n not in seen]
    else:
        rows = [(n, None) for n in in_model_order]
    rule = part_rule(modules)
    group_of = _groups(params, stages)
    adapter = {n: p.get("adapter") for p in params for n in [p["name"], *(p.get("aliases") or [])]}

    def adapter_only(tensors: list[str]) -> bool:  # a LoRA factor (lora_A / lora_B): not a layer of the network
        return all(adapter.get(n) for n in tensors)

    layers = []
    number = 0
    for i, (name, ran) in enumerate(rows):
        typ = types.get(name, "Parameter")
        branch = branch_of(name)
        weight = None
        if branch == "main" and is_weight_type(typ) and not adapter_only(owned[name]):
            number += 1
            weight = number
        tensors = owned[name]
        layers.append({
            "index": i + 1, "module": name, "type": typ,
            "group": next((group_of[n] for n in tensors if group_of.get(n) is not None), None),
            "block": block_of(name, types), "part": part_of(name, rule), "branch": branch,
            "weight_layer": weight, "params": list(tensors), "ran": ran,
        })
    counts = {
        "modules": len(layers),
        "weight_layers": number,
        "shortcut_weight_layers": sum(1 for x in layers if x["branch"] == "shortcut" and is_weight_type(x["type"])
                                      and not adapter_only(x["params"])),
        "head_weight_layers": sum(1 for x in layers if x["weight_layer"] is not None and x["part"] == "head"),
    }
    return layers, counts
