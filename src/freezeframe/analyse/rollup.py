"""Roll the per-module rows of a summary up to a depth of the module tree (a ResNet reads as stem,
layer1..4, head; a 1,000-tensor model stays readable)."""

from __future__ import annotations

import math


def _prefix(name: str, depth: int) -> str:
    parts = name.split(".") if name else []
    return ".".join(parts[:depth]) if parts else ""


def _combine_trainable(values):
    if any(v is None for v in values):
        return None
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "partial"


def rollup(summary: dict, depth: int) -> list[dict]:
    """Modules grouped by the first `depth` parts of their dotted name, in model order:
    [{name, types, params (tensor names), numel, groups, stages: [{stage, trainable, changed, drift_rel}]}]."""
    params = {p["name"]: p for p in summary["params"]}
    rows: dict[str, dict] = {}
    for m in summary["modules"]:
        key = _prefix(m["name"], depth)
        row = rows.setdefault(key, {"name": key, "types": [], "modules": [], "params": [], "groups": set()})
        row["types"].append(m["type"])
        row["modules"].append(m)
        row["params"].extend(m["params"])
        row["groups"].update(m["groups"])
    out = []
    n_stages = len(summary["stages"])
    for key, row in rows.items():
        stages = []
        for k in range(n_stages):
            entries = [params[n]["stages"][k] for n in row["params"]]
            changed = [e["changed"] for e in entries]
            drifts = [e["drift_abs"] for e in entries]
            refs = [params[n].get("ref_norm") for n in row["params"]]
            drift_rel = None
            if all(d is not None for d in drifts) and all(r is not None for r in refs) and sum(r * r for r in refs) > 0:
                drift_rel = math.sqrt(sum(d * d for d in drifts)) / math.sqrt(sum(r * r for r in refs))
            stages.append({
                "stage": summary["stages"][k]["index"],
                "trainable": _combine_trainable([m["stages"][k]["trainable"] for m in row["modules"]]),
                "changed": True if any(c is True for c in changed) else (None if any(c is None for c in changed) else False),
                "drift_rel": drift_rel,
            })
        types = sorted(set(row["types"]), key=row["types"].index)
        out.append({"name": row["name"] or "(root)", "types": types, "params": row["params"],
                    "numel": sum(params[n]["numel"] for n in row["params"]),
                    "groups": sorted(row["groups"]), "stages": stages})
    return out


def auto_depth(summary: dict, max_rows: int = 40) -> int:
    """The deepest level whose rollup has at most `max_rows` rows (at least 1)."""
    names = [m["name"] for m in summary["modules"]]
    deepest = max((len(n.split(".")) for n in names if n), default=1)
    for depth in range(deepest, 0, -1):
        if len({_prefix(n, depth) for n in names}) <= max_rows:
            return depth
    return 1
