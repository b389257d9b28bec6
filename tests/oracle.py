"""The slow, obvious re-implementations the tests compare freezeframe against.

Nothing here imports freezeframe: norms are `torch.linalg.vector_norm` in float64, hashes are
hashlib over numpy bytes, medians are `statistics.median`, and the training loop's ground truth
is taken by copying every tensor around each `optimizer.step()`.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics

import torch
from torch import nn

# ------------------------------------------------------------------------------------ tensors


def norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().double()))


def dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return norm(a.detach().double() - b.detach().double())


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and raw_bytes(a) == raw_bytes(b)


def content_hash(t: torch.Tensor) -> str:
    """blake2b-128 over "dtype|shape|" and the C-contiguous bytes."""
    t = t.detach().cpu().contiguous()
    dtype = str(t.dtype).split(".")[-1]
    shape = str(tuple(int(d) for d in t.shape))  # "()", "(4,)", "(3, 4)"
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{dtype}|{shape}|".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def param_names(model: nn.Module) -> list[str]:
    """named_parameters() names, tied tensors once (first name)."""
    return [n for n, _ in model.named_parameters()]


def float_buffer_names(model: nn.Module) -> list[str]:
    return [n for n, b in model.named_buffers() if b.is_floating_point()]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter (tied once) and floating-point buffer, by name."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()})
    return out


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {n for n in a if not same_bytes(a[n], b[n])}


def isclose(got, expected, rel: float = 1e-5, abs_: float = 1e-7) -> bool:
    if got is None or expected is None:
        return got is None and expected is None
    return abs(got - expected) <= rel * abs(expected) + abs_


# ------------------------------------------------------------------------------ ground truth


def _momentum(g: dict):
    if "momentum" in g:
        return float(g["momentum"])
    if "betas" in g:
        return float(g["betas"][0])
    return None


class Tape:
    """Ground truth of a training run, taken by the test around each optimizer step.

    Build it right before `watch()` (it keeps W_ref then), and call `tape.step(opt)` instead of
    `opt.step()`: it records the hyperparameters each group holds, the tensors that should get
    a metrics row (held by the stepping optimizer, trainable or with a gradient), W_before,
    W_after, the gradients read after the step, and the buffers."""

    def __init__(self, model: nn.Module, first_step: int = 0, ref: dict | None = None):
        self.model = model
        self.params = dict(model.named_parameters())
        self.buffers = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
        self.ref = ref if ref is not None else state(model)
        self.first_step = first_step
        self.steps: list[dict] = []

    def step(self, opt: torch.optim.Optimizer, closure=None, *, opt_index: int = 0):
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        rec = {
            "step": self.first_step + len(self.steps), "opt": opt_index,
            "lr": [float(g["lr"]) for g in opt.param_groups],
            "momentum": [_momentum(g) for g in opt.param_groups],
            "weight_decay": [float(g.get("weight_decay", 0.0)) for g in opt.param_groups],
            "rows": [n for n, p in self.params.items() if id(p) in held and (p.requires_grad or p.grad is not None)],
            "before": {n: p.detach().clone() for n, p in self.params.items()},
        }
        out = opt.step(closure) if closure is not None else opt.step()
        rec["after"] = {n: p.detach().clone() for n, p in self.params.items()}
        rec["grad"] = {n: None if p.grad is None else p.grad.detach().clone() for n, p in self.params.items()}
        rec["buffers"] = {n: b.detach().clone() for n, b in self.buffers.items()}
        self.steps.append(rec)
        return out

    def metrics(self, rec: dict) -> dict[str, tuple]:
        """name -> (grad_norm, update_norm, param_norm, drift) the recorder must store for this step."""
        out = {}
        for n in rec["rows"]:
            g = rec["grad"][n]
            out[n] = (None if g is None else norm(g), dist(rec["after"][n], rec["before"][n]),
                      norm(rec["before"][n]), dist(rec["after"][n], self.ref[n]))
        for n, b in rec["buffers"].items():
            out[n] = (None, None, norm(b), dist(b, self.ref[n]))
        return out

    def update_ratio_median(self, name: str, steps: list[int]):
        ratios = []
        for rec in self.steps:
            if rec["step"] in steps and name in rec["rows"]:
                before = norm(rec["before"][name])
                if before > 0:
                    ratios.append(dist(rec["after"][name], rec["before"][name]) / before)
        return statistics.median(ratios) if ratios else None


def stored_metrics(tensors_table) -> dict[int, dict[str, tuple]]:
    """freezeframe's tensors table as {step: {name: (grad_norm, update_norm, param_norm, drift)}}."""
    d = tensors_table.to_pydict()
    out: dict[int, dict[str, tuple]] = {}
    for i in range(len(d["step"])):
        row = (d["grad_norm"][i], d["update_norm"][i], d["param_norm"][i], d["drift"][i])
        rows = out.setdefault(d["step"][i], {})
        assert d["name"][i] not in rows, f"two rows for {d['name'][i]} at step {d['step'][i]}"
        rows[d["name"][i]] = row
    return out


def metric_mismatches(stored: dict[str, tuple], expected: dict[str, tuple], rel: float = 1e-5) -> list[str]:
    labels = ("grad_norm", "update_norm", "param_norm", "drift")
    bad = []
    if set(stored) != set(expected):
        bad.append(f"rows {sorted(stored)} != expected {sorted(expected)}")
    for n in sorted(set(stored) & set(expected)):
        for label, got, exp in zip(labels, stored[n], expected[n]):
            if not isclose(got, exp, rel=rel):
                bad.append(f"{n}.{label}: stored {got!r}, oracle {exp!r}")
    return bad


# ------------------------------------------------------------------------------------- JSON


def _no_constants(name):
    raise ValueError(f"JSON holds {name}, which is not JSON")


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_no_constants)


class SchemaError(AssertionError):
    pass


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise SchemaError(f"{where}: {what}")


def _keys(obj, where: str, spec: dict) -> None:
    _check(isinstance(obj, dict), where, f"expected an object, got {type(obj).__name__}")
    for key, test in spec.items():
        _check(key in obj, where, f"missing key {key!r}")
        _check(test(obj[key]), f"{where}.{key}", f"bad value {obj[key]!r}")


def _opt(test):
    return lambda x: x is None or test(x)


def _list_of(test):
    return lambda x: isinstance(x, list) and all(test(v) for v in x)


_str = lambda x: isinstance(x, str)  # noqa: E731
_bool = lambda x: isinstance(x, bool)  # noqa: E731


def check_summary_schema(doc: dict) -> None:
    """The "freezeframe.summary/1" schema of DESIGN.md: required keys and their types."""
    _keys(doc, "summary", {"schema": lambda x: x == "freezeframe.summary/1", "run": lambda x: isinstance(x, dict),
                           "stages": _list_of(lambda x: isinstance(x, dict)),
                           "params": _list_of(lambda x: isinstance(x, dict)),
                           "modules": _list_of(lambda x: isinstance(x, dict)),
                           "buffers": _list_of(lambda x: isinstance(x, dict)),
                           "findings": _list_of(lambda x: isinstance(x, dict))})
    run = doc["run"]
    _keys(run, "run", {
        "framework": lambda x: x in ("torch", "fastai", "lightning"), "params_total": _is_int,
        "tensors_total": _is_int, "steps": _is_int, "skipped_steps": _opt(_is_int), "complete": _bool,
        "recovered_steps": _is_int, "sessions": _list_of(lambda x: isinstance(x, dict)),
    })
    for i, s in enumerate(run["sessions"]):
        _keys(s, f"run.sessions[{i}]", {"every": _opt(_is_int), "versions": lambda x: isinstance(x, dict)})
        _check(s["every"] is None or s["every"] >= 1, f"run.sessions[{i}].every", "must be >= 1")
    n_stages = len(doc["stages"])
    for k, st in enumerate(doc["stages"]):
        w = f"stages[{k}]"
        _keys(st, w, {
            "index": _is_int, "name": _str, "kind": lambda x: x in ("train", "trial"), "complete": _bool,
            "first_step": _is_int, "last_step": _is_int, "steps": _is_int, "skipped_steps": _opt(_is_int),
            "epochs": _opt(_is_int), "forward_passes": lambda x: isinstance(x, dict),
            "params_trainable": _is_int, "tensors_trainable": _is_int,
            "groups": _list_of(lambda x: isinstance(x, dict)),
            "starts_from_previous_end": _opt(_bool), "continuity": lambda x: x in (None, "bitwise", "written"),
            "changed_since_previous_end": _list_of(_str),
        })
        _check(st["steps"] >= 1, w, "a stage has at least one applied step")
        _keys(st["forward_passes"], f"{w}.forward_passes", {"train": _is_int, "eval": _is_int})
        for gi, g in enumerate(st["groups"]):
            _keys(g, f"{w}.groups[{gi}]", {
                "index": _is_int, "optimizer": _is_int, "name": _str, "tensors": _is_int, "params": _is_int,
                "trainable_params": _is_int, "lr_max": _opt(_is_num), "lr_applied_max": _opt(_is_num),
                "lr_min": _opt(_is_num), "lr_first": _opt(_is_num), "lr_last": _opt(_is_num),
                "momentum_min": _opt(_is_num), "momentum_max": _opt(_is_num), "weight_decay": _opt(_is_num),
            })
    for i, p in enumerate(doc["params"]):
        w = f"params[{i}]"
        _keys(p, w, {"name": _str, "aliases": _list_of(_str), "module": _str, "module_type": _str,
                     "shape": _list_of(_is_int), "numel": _is_int, "is_norm": _bool,
                     "present_from_stage": _is_int, "stages": lambda x: isinstance(x, list) and len(x) == n_stages})
        for k, e in enumerate(p["stages"]):
            _keys(e, f"{w}.stages[{k}]", {
                "group": _opt(_is_int), "trainable": _opt(_bool), "in_optimizer": _bool, "grad_steps": _opt(_is_int),
                "changed": _opt(_bool), "drift_abs": _opt(_is_num), "drift_rel": _opt(_is_num),
                "update_ratio_median": _opt(_is_num),
            })
    for i, m in enumerate(doc["modules"]):
        w = f"modules[{i}]"
        _keys(m, w, {"name": _str, "type": _str, "stages": lambda x: isinstance(x, list) and len(x) == n_stages})
        _check("groups" in m or "group" in m, w, "missing the module's group(s)")
        for k, e in enumerate(m["stages"]):
            _keys(e, f"{w}.stages[{k}]", {"trainable": lambda x: x is None or isinstance(x, bool) or x == "partial",
                                          "changed": _opt(_bool), "drift_rel": _opt(_is_num)})
    for i, b in enumerate(doc["buffers"]):
        w = f"buffers[{i}]"
        _keys(b, w, {"name": _str, "module": _str, "stages": lambda x: isinstance(x, list) and len(x) == n_stages})
        for k, e in enumerate(b["stages"]):
            _keys(e, f"{w}.stages[{k}]", {"changed": _opt(_bool), "drift_rel": _opt(_is_num)})
    for i, f in enumerate(doc["findings"]):
        check_finding(f, f"findings[{i}]")


def check_finding(f: dict, where: str = "finding") -> None:
    _keys(f, where, {"code": _str, "severity": lambda x: x in ("info", "warning", "error"), "message": _str,
                     "stage": _opt(_is_int), "params": _list_of(_str)})


def compare_with_tape(tensors_table, tape: Tape, steps=None, rel: float = 1e-5) -> list[str]:
    """Every mismatch between the stored metric rows and the tape, step by step (recorded steps
    only when `steps` is given: then no other step may have rows)."""
    stored = stored_metrics(tensors_table)
    bad = []
    wanted = [r for r in tape.steps if steps is None or r["step"] in steps]
    extra = set(stored) - {r["step"] for r in wanted}
    if extra:
        bad.append(f"rows stored for steps {sorted(extra)} that should have none")
    for rec in wanted:
        got = stored.get(rec["step"])
        if got is None:
            bad.append(f"step {rec['step']}: no rows stored")
            continue
        bad += [f"step {rec['step']}: {m}" for m in metric_mismatches(got, tape.metrics(rec), rel=rel)]
    return bad


def aggregates_oracle(stage_of: dict, rows: list[dict]):
    """The summary's tensor aggregates by plain Python over tensor rows (dicts) in stored order,
    with each step's stage from `stage_of` (docs/summary-format.md): per (stage, tensor) the
    median of update_norm / param_norm in float64 over the rows where both are finite and
    param_norm > 0, and the drift of the last row at the largest step with a drift; the first
    row with a measured NaN or Inf (step, tensor, stage) and every tensor with such a row."""
    ratios, last, first_bad, bad_tensors = {}, {}, None, set()
    for r in rows:
        st = stage_of.get(r["step"])
        measured = [r[c] for c in ("grad_norm", "update_norm", "param_norm", "drift") if r[c] is not None]
        if any(not math.isfinite(v) for v in measured):
            bad_tensors.add(r["tensor"])
            if first_bad is None or r["step"] < first_bad[0]:
                first_bad = (r["step"], r["tensor"], st)
        if st is None:
            continue
        key = (st, r["tensor"])
        un, pn = r["update_norm"], r["param_norm"]
        if un is not None and pn is not None and math.isfinite(un) and math.isfinite(pn) and pn > 0:
            ratios.setdefault(key, []).append(float(un) / float(pn))
        d = r["drift"]
        if d is not None and not math.isnan(d) and (key not in last or r["step"] >= last[key][0]):
            last[key] = (r["step"], float(d))
    medians = {k: statistics.median(v) for k, v in ratios.items()}
    return medians, {k: v for k, (_, v) in last.items()}, first_bad, bad_tensors
