"""Compare two checkpoints tensor by tensor: identical bytes or not, relative distance, cosine
distance, shape changes, and a roll-up by module (schema "freezeframe.diff/1")."""

from __future__ import annotations

import math

import torch

from ..hashing import content_hash
from ..store.checkpoint import load_checkpoint
from .summary import clean

SCHEMA = "freezeframe.diff/1"


def _distances(a: torch.Tensor, b: torch.Tensor) -> tuple[float | None, float | None, float, float]:
    """(||b - a|| / ||a||, 1 - cos(a, b), ||b - a||, ||a||) in float64."""
    if not (a.is_floating_point() or a.is_complex()):
        a, b = a.double(), b.double()
    a64, b64 = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    d = float(torch.linalg.vector_norm(b64 - a64))
    na, nb = float(torch.linalg.vector_norm(a64)), float(torch.linalg.vector_norm(b64))
    rel = d / na if na > 0 else None
    cos = None
    if na > 0 and nb > 0:
        cos = 1.0 - float(torch.dot(a64, b64)) / (na * nb)
        cos = max(cos, 0.0) if abs(cos) < 1e-15 else cos
    return rel, cos, d, na


def diff_files(a, b) -> dict:
    """Compare two checkpoint files (a state_dict, a fastai or Lightning checkpoint, safetensors),
    read by the store's checkpoint loader."""
    return diff_state_dicts(load_checkpoint(a), load_checkpoint(b))


def diff_state_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    params = []
    for name in [k for k in a if k in b]:
        ta, tb = a[name], b[name]
        same_shape = tuple(ta.shape) == tuple(tb.shape)
        row = {"name": name, "changed": content_hash(ta) != content_hash(tb),
               "shape_a": list(ta.shape), "shape_b": list(tb.shape), "dtype_a": str(ta.dtype).removeprefix("torch."),
               "dtype_b": str(tb.dtype).removeprefix("torch."), "numel": ta.numel(),
               "drift_rel": None, "cosine_distance": None, "_d": None, "_na": None}
        if same_shape:
            rel, cos, d, na = _distances(ta, tb)
            row.update(drift_rel=rel, cosine_distance=cos, _d=d, _na=na)
        params.append(row)
    modules = _by_module(params)
    for p in params:
        del p["_d"], p["_na"]
    return clean({
        "schema": SCHEMA,
        "params": params,
        "only_in_a": [k for k in a if k not in b],
        "only_in_b": [k for k in b if k not in a],
        "modules": modules,
        "totals": {"compared": len(params), "changed": sum(p["changed"] for p in params),
                   "identical": sum(not p["changed"] for p in params)},
    })


def _by_module(params: list[dict]) -> list[dict]:
    """Per module (the name up to the last dot): how many tensors changed, relative distance of
    its concatenated tensors."""
    groups: dict[str, list[dict]] = {}
    for p in params:
        groups.setdefault(p["name"].rpartition(".")[0], []).append(p)
    out = []
    for module, rows in groups.items():
        known = [r for r in rows if r["_d"] is not None]
        den = math.sqrt(sum(r["_na"] ** 2 for r in known))
        rel = math.sqrt(sum(r["_d"] ** 2 for r in known)) / den if known and den > 0 and len(known) == len(rows) else None
        changed = sum(r["changed"] for r in rows)
        out.append({"name": module or "(root)", "tensors": len(rows), "changed": changed,
                    "state": "identical" if changed == 0 else ("changed" if changed == len(rows) else "partial"),
                    "drift_rel": rel})
    return out
