"""The summary (schema "freezeframe.summary/1") of a stored run: pure functions of its data."""

from __future__ import annotations

import math

import numpy as np

from ..store.reader import StoredRun
from .layers import build_layers
from .aggregate import tensor_aggregates
from .tables import StageLookup, StepView, step_view
from .transitions import attach as attach_transitions

SCHEMA = "freezeframe.summary/1"


def clean(x):
    """JSON never holds NaN or Infinity: null instead (recursively)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.floating,)):
        return clean(float(x))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def stage_records(run: StoredRun, view: StepView) -> list[dict]:
    """The manifest's stages, plus placeholders for stages whose steps reached the disk but
    whose manifest entry did not (an interrupted run)."""
    stages = [dict(s) for s in run.manifest.get("stages", [])]
    known = {s["index"] for s in stages}
    for idx in sorted(set(view.stage.tolist()) - known):
        stages.append({"index": idx, "name": f"stage {idx}", "kind": "train", "explicit": False,
                       "recovered": True, "trainable": None, "groups": [], "start_hashes": [],
                       "end_hashes": None, "complete": False, "forward_passes": {"train": None, "eval": None}})
    stages.sort(key=lambda s: s["index"])
    return stages


def _active_sum(counts: list | None, active: set) -> int | None:
    """Tensors holding optimizer state, over the optimizers that stepped in the stage."""
    if not counts:
        return None
    vals = [c for j, c in enumerate(counts) if j in active]
    return None if not vals or any(c is None for c in vals) else int(sum(vals))


def _at(values: list, i: int):
    return values[i] if i < len(values) else None


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def _group_stats(rows: np.ndarray, view: StepView, g: int, nominal, floor=None) -> dict:
    def series(values: np.ndarray) -> np.ndarray:
        """Group g's finite values over `rows`, in row order."""
        col = values[rows, g] if g < values.shape[1] else np.zeros(0)
        return col[np.isfinite(col)]

    def first_max(x: np.ndarray):  # the element Python's max() gives (the first of equals: 0.0 before -0.0)
        return float(x[np.argmax(x)]) if len(x) else None

    def first_min(x: np.ndarray):
        return float(x[np.argmin(x)]) if len(x) else None

    lr, mom, wd = series(view.lr), series(view.momentum), series(view.weight_decay)
    applied_max, lr_min = first_max(lr), first_min(lr)
    if nominal is not None and floor is not None and len(lr):
        # A peak left in the group by a finished schedule (OneCycleLR's max_lr) is taken only
        # when this stage's lrs move within that schedule's range.
        tol = 1e-9 * nominal
        if not (applied_max > lr_min and lr_min >= floor - tol and applied_max <= nominal + tol):
            nominal = None
    return {
        "lr_max": nominal if nominal is not None else applied_max,
        "lr_applied_max": applied_max,
        "lr_min": lr_min,
        "lr_first": float(lr[0]) if len(lr) else None,
        "lr_last": float(lr[-1]) if len(lr) else None,
        "momentum_min": first_min(mom),
        "momentum_max": first_max(mom),
        "weight_decay": float(wd[-1]) if len(wd) else None,
    }


def _epochs(s: dict) -> dict:
    """What the stage ran: `epochs` is the number of epochs begun (len(epoch_starts)) when epochs
    were announced; `epochs_planned` the count an integration asked for."""
    starts = s.get("epoch_starts")
    starts = [int(x) for x in starts] if isinstance(starts, list) else None
    epochs = len(starts) if starts is not None else s.get("epochs")
    cont = s.get("first_epoch_continued")
    return {"epochs": epochs, "epoch_starts": starts, "epochs_planned": s.get("epochs_planned"),
            "first_epoch_continued": cont if starts and isinstance(cont, bool) else None}


def _last_epochs_partial(out_stages: list[dict], run_complete: bool) -> None:
    """Each stage's `last_epoch_partial`: true when its last epoch goes on in the next stage (a
    split inside the epoch), false when it ended in the stage; null when no epoch was announced,
    when the run did not finish in this stage (its last epoch may be cut short) or an older run
    does not say (docs/summary-format.md)."""
    for k, s in enumerate(out_stages):
        nxt = out_stages[k + 1] if k + 1 < len(out_stages) else None
        if not s.get("epoch_starts") or (nxt is None and not run_complete):
            s["last_epoch_partial"] = None
        elif nxt is None:
            s["last_epoch_partial"] = False
        else:
            s["last_epoch_partial"] = nxt.get("first_epoch_continued") if nxt.get("epoch_starts") else False


def _same_as_start(reference_hashes: list | None, s: dict, i: int) -> bool | None:
    """Are tensor i's bytes at the end of stage `s` those of the weights watching first began with
    (W_ref: the manifest's `reference_hashes`)? None when either hash is missing (an older run,
    a tensor added later, an end not captured)."""
    end = s.get("end_hashes")
    if not end or i >= len(end) or end[i] is None:
        return None
    if not reference_hashes or i >= len(reference_hashes) or reference_hashes[i] is None:
        return None
    return end[i] == reference_hashes[i]


def build_summary(run: StoredRun) -> dict:
    m = run.manifest
    params = m["model"]["params"]
    buffers = m["model"]["buffers"]
    P, B = len(params), len(buffers)
    ref_norms = list(m.get("ref_norms") or [None] * (P + B))
    view = step_view(run)
    stages = stage_records(run, view)
    # the tensors table's aggregates, streamed from its chunks (before `unreadable` is read below:
    # the scan names a chunk found damaged)
    view.tensors = tensor_aggregates(run, StageLookup(view.step, view.stage), [s["index"] for s in stages], P + B)
    agg = {"update_ratio_median": view.tensors.update_ratio_median, "last_drift": view.tensors.last_drift}
    numel = np.array([p["numel"] for p in params], dtype=np.int64)

    stage_rows: dict[int, np.ndarray] = {s["index"]: np.flatnonzero(view.stage == s["index"]) for s in stages}
    out_stages = []
    per_tensor: list[list[dict]] = [[] for _ in range(P + B)]
    for s in stages:
        si = s["index"]
        rows = stage_rows[si]
        steps_here = view.step[rows]
        trainable = set(s["trainable"]) if s.get("trainable") is not None else set()
        # Only the optimizers that applied steps in this stage: one replaced by a new optimizer
        # (followed with rec.track) still holds the tensors but moves none of them.
        active = set(view.optimizer[rows].tolist())
        groups = [g for g in (s.get("groups") or []) if g["optimizer"] in active]
        group_of = {}
        for g in groups:
            for i in g["params"]:
                group_of.setdefault(i, g["index"])
        grad_steps = view.grad_steps(rows)
        start, end = s.get("start_hashes") or [], s.get("end_hashes")
        end_metrics = s.get("end_metrics") or {}
        out_groups = []
        for g in groups:
            gp = g["params"]
            out_groups.append({
                "index": g["index"], "optimizer": g["optimizer"], "name": g["name"],
                "tensors": len(gp), "params": int(numel[gp].sum()),
                "trainable_params": int(sum(numel[i] for i in gp if i in trainable)),
                **_group_stats(rows[view.optimizer[rows] == g["optimizer"]], view, g["index"],
                               _at(s.get("lr_nominal") or [], g["index"]),
                               _at(s.get("lr_nominal_floor") or [], g["index"])),
            })
        out_stages.append({
            "index": si, "name": s["name"], "kind": s.get("kind", "train"), "complete": bool(s.get("complete")),
            "first_step": int(steps_here.min()) if len(rows) else s.get("first_step"),
            "last_step": int(steps_here.max()) if len(rows) else s.get("last_step"),
            "steps": int(len(rows)), "skipped_steps": s.get("skipped_steps"), **_epochs(s),
            "forward_passes": s.get("forward_passes"),
            "params_trainable": int(sum(numel[i] for i in trainable)), "tensors_trainable": len(trainable),
            "groups": out_groups,
            "starts_from_previous_end": s.get("starts_from_previous_end"),
            "continuity": s.get("continuity"),
            "changed_since_previous_end": list(s.get("changed_since_previous_end") or []),
            "meta": s.get("meta") or {},
            "optimizer_state_start": _active_sum(s.get("optimizer_state_start"), active),
            "optimizer_state_end": _active_sum(s.get("optimizer_state_end"), active),
            "outside_writes": [dict(w) for w in s.get("outside_writes") or []],
            "model_changes": s.get("model_changes") or None,
            "shared_between_optimizers": list(s.get("shared_between_optimizers") or []),
            "lora": lora_record(s.get("lora")),
        })
        for i in range(P + B):
            changed = None
            if end is not None and i < len(end) and i < len(start) and end[i] is not None and start[i] is not None:
                changed = end[i] != start[i]
            drift_abs = None
            if end_metrics.get("drift") and i < len(end_metrics["drift"]) and end_metrics["drift"][i] is not None:
                drift_abs = end_metrics["drift"][i]
            else:
                drift_abs = agg["last_drift"].get(si * (P + B) + i)
            same = _same_as_start(m.get("reference_hashes"), s, i)
            if drift_abs is None and same is True and ref_norms[i] is not None:
                drift_abs = 0.0  # bytes equal to those watching began with: drift 0 by proof
            entry = {"changed": changed, "same_as_start": same, "drift_abs": drift_abs,
                     "drift_rel": _ratio(drift_abs, ref_norms[i])}
            if i < P:
                entry = {"group": group_of.get(i), "trainable": i in trainable if s.get("trainable") is not None
                         and si >= (params[i].get("from_stage") or 0) else None,  # null: not in the model yet
                         "in_optimizer": i in group_of, "grad_steps": int(grad_steps[i]), **entry,
                         "update_ratio_median": agg["update_ratio_median"].get(si * (P + B) + i)}
            per_tensor[i].append(entry)

    out_params = []
    for i, p in enumerate(params):
        present = next((k for k, e in enumerate(per_tensor[i]) if e["trainable"] is not None), 0)
        out_params.append({
            "name": p["name"], "aliases": p["aliases"], "module": p["module"], "module_type": p["module_type"],
            "shape": p["shape"], "numel": p["numel"], "is_norm": p["is_norm"], "ref_norm": ref_norms[i],
            "reference_refused": _at(m.get("reference_refused") or [], i),  # why no W_ref: drift unknown
            "adapter": p.get("adapter") if isinstance(p.get("adapter"), str) else None,
            "present_from_stage": stages[present]["index"] if stages else None,
            "stages": [{"stage": stages[k]["index"], **e} for k, e in enumerate(per_tensor[i])],
        })
    out_buffers = [{"name": b["name"], "module": b["module"],
                    "stages": [{"stage": stages[k]["index"], "changed": e["changed"], "drift_rel": e["drift_rel"]}
                               for k, e in enumerate(per_tensor[P + bi])]}
                   for bi, b in enumerate(buffers)]
    out_modules = module_rollup(out_params, ref_norms[:P], m["model"]["modules"], out_stages)

    sessions = [{"index": s["index"], "every": s.get("every"), "calibration": s.get("calibration"),
                 "versions": s.get("versions"), "started": s.get("started"), "ended": s.get("ended"),
                 "pid": s.get("pid"), "host": s.get("host")} for s in m.get("sessions", [])]
    skipped = [s.get("skipped_steps") for s in out_stages]
    steps_expected = getattr(run, "steps_expected", m.get("steps_total"))
    steps_expected = steps_expected if isinstance(steps_expected, int) and not isinstance(steps_expected, bool) else None
    unreadable = [str(x) for x in getattr(run, "unreadable", None) or []]
    summary = {
        "schema": SCHEMA,
        "run": {
            "path": str(run.path), "framework": m.get("framework", "torch"),
            "params_total": int(numel.sum()), "tensors_total": P, "buffers_total": B,
            "steps": int(len(view.step)),
            "skipped_steps": None if not skipped or any(x is None for x in skipped) else int(sum(skipped)),
            "complete": bool(m.get("complete")) and not unreadable
                        and (steps_expected is None or len(view.step) >= steps_expected),
            "in_progress": bool(getattr(run, "live", False)), "steps_expected": steps_expected,
            "unreadable": unreadable, "recovered_steps": int(len(view.step)),
            "error": m.get("error"), "reference": bool(m.get("reference", True)),
            "sessions": sessions, "warnings": list(run.warnings),
            "peft": m["model"].get("peft") if isinstance(m["model"].get("peft"), dict) else None,
        },
        "stages": out_stages,
        "params": out_params,
        "modules": out_modules,
        "buffers": out_buffers,
    }
    _last_epochs_partial(out_stages, summary["run"]["complete"])
    summary["layers"], summary["run"]["layer_counts"] = build_layers(m["model"], out_params, out_stages)
    attach_transitions(summary, stages)  # stages[].epoch_metrics, stages[].initial_state, transitions
    from .findings import find

    summary["findings"] = find(summary, view)
    from .answers import answers

    summary["answers"] = answers(summary)
    return clean(summary)


def lora_record(lora) -> dict | None:
    """A stage's `lora` (docs/peft.md) as stored, entries of the wrong shape left out."""
    if not isinstance(lora, dict):
        return None
    out = {}
    for name, e in lora.items():
        if isinstance(e, dict):
            rel = e.get("delta_rel")
            out[str(name)] = {"adapter": e.get("adapter") if isinstance(e.get("adapter"), str) else None,
                              "delta_rel": rel if isinstance(rel, (int, float)) and not isinstance(rel, bool) else None,
                              **{k: e.get(k) if isinstance(e.get(k), bool) else None
                                 for k in ("b_zero", "a_zero", "merged")},
                              "removed": e.get("removed") is True}
    return out or None


def lora_wrapped(name: str) -> str:
    """The LoRA-wrapped module whose base weight module `name` is (`...c_attn.base_layer` ->
    `...c_attn`), else `name` itself."""
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def module_rollup(params: list[dict], ref_norms: list, modules: list[dict],
                  stages: list[dict] | None = None) -> list[dict]:
    """Per module owning parameters: tri-state trainable, changed, drift_rel of its tensors, the
    adapter its tensors belong to and, on a LoRA base layer's row, the adapter's effective
    update at each stage's end (`lora_delta_rel`, docs/peft.md)."""
    by_module: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        by_module.setdefault(p["module"], []).append(i)
    types = {mm["name"]: mm["type"] for mm in modules}
    order = [mm["name"] for mm in modules if mm["name"] in by_module]
    out = []
    for name in order:
        idx = by_module[name]
        n_stages = len(params[idx[0]]["stages"])
        st_out = []
        for k in range(n_stages):
            es = [params[i]["stages"][k] for i in idx]
            tr = [e["trainable"] for e in es]
            trainable = (None if any(t is None for t in tr) else
                         True if all(tr) else False if not any(tr) else "partial")
            ch = [e["changed"] for e in es]
            changed = True if any(c is True for c in ch) else (None if any(c is None for c in ch) else False)
            d = [e["drift_abs"] for e in es]
            r = [ref_norms[i] for i in idx]
            drift_rel = None
            if all(x is not None for x in d) and all(x is not None for x in r) and sum(x * x for x in r) > 0:
                drift_rel = math.sqrt(sum(x * x for x in d)) / math.sqrt(sum(x * x for x in r))
            lora = ((stages[k].get("lora") or {}) if stages is not None and k < len(stages) else {}).get(lora_wrapped(name))
            st_out.append({"stage": es[0]["stage"], "trainable": trainable, "changed": changed, "drift_rel": drift_rel,
                           "lora_delta_rel": lora.get("delta_rel") if isinstance(lora, dict) else None})
        groups = sorted({e["group"] for i in idx for e in params[i]["stages"] if e["group"] is not None})
        adapters = {params[i].get("adapter") for i in idx}
        out.append({"name": name, "type": types.get(name, params[idx[0]]["module_type"]),
                    "groups": groups, "params": [params[i]["name"] for i in idx],
                    "adapter": adapters.pop() if len(adapters) == 1 else None, "stages": st_out})
    return out
