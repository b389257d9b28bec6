"""The three questions of transfer learning, answered in plain words from a run's own numbers."""

from __future__ import annotations


def _n(x: int) -> str:
    return f"{x:,}"


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.3g} %"


def answers(summary: dict) -> list[dict]:
    """[{question, answer, facts}] — facts are the numbers the sentence uses, for renderers."""
    run = summary["run"]
    stages = [s for s in summary["stages"] if s["kind"] != "trial"]
    params = summary["params"]
    n_modules = len(summary["modules"])
    out = []

    # 1. Did each step run the data through every layer and update every weight?
    lines = []
    for s in stages:
        k = summary["stages"].index(s)
        frozen = [p for p in params if p["stages"][k]["trainable"] is False]
        frozen_changed = [p for p in frozen if p["stages"][k]["changed"]]
        moved = [p for p in params if p["stages"][k]["trainable"] and p["stages"][k]["changed"]]
        fp = s["forward_passes"] or {}
        sent = (f"Stage {s['index']} ({s['name']}): {_n(fp.get('train') or 0)} training forward passes went through the "
                f"whole model ({n_modules} modules with parameters); {_n(s['steps'])} optimizer steps updated "
                f"{s['tensors_trainable']} of {run['tensors_total']} tensors ({_n(s['params_trainable'])} of "
                f"{_n(run['params_total'])} parameters); {len(moved)} of them changed.")
        if frozen:
            frozen_params = sum(p["numel"] for p in frozen)
            if frozen_changed:
                sent += (f" {len(frozen)} tensors ({_n(frozen_params)} parameters) were frozen, but "
                         f"{len(frozen_changed)} of them changed anyway (see findings).")
            elif all(p["stages"][k]["changed"] is False for p in frozen):
                sent += (f" The other {len(frozen)} tensors ({_n(frozen_params)} parameters) were frozen: every "
                         "forward pass used them, no step updated them, and their bytes are unchanged.")
            else:
                sent += f" The other {len(frozen)} tensors ({_n(frozen_params)} parameters) were frozen."
        lines.append(sent)
    out.append({"question": "Does each fit run my data through all the layers and update every weight?",
                "answer": " ".join(lines) or "No training step was recorded."})

    # 2. Does unfreezing wipe the pretrained weights?
    lines = []
    for a, b in zip(stages, stages[1:]):
        ka, kb = summary["stages"].index(a), summary["stages"].index(b)
        newly = [p["name"] for p in params if p["stages"][ka]["trainable"] is False and p["stages"][kb]["trainable"]]
        if not newly:
            continue
        wiped = [n for n in newly if n in set(b["changed_since_previous_end"])]
        if not wiped and b["starts_from_previous_end"] is not None:
            lines.append(f"Before stage {b['index']} ({b['name']}), {len(newly)} tensors were unfrozen; their values at "
                         f"the start of the stage are {'bitwise identical to' if b['continuity'] == 'bitwise' else 'unwritten since'} "
                         "the end of the previous stage: unfreezing changed what may be updated, not any value.")
        elif wiped:
            lines.append(f"Before stage {b['index']} ({b['name']}), {len(newly)} tensors were unfrozen and {len(wiped)} of "
                         "them had different values at the start of the stage — something other than unfreezing "
                         "(a reload or a re-created model) replaced them.")
    body = [p for p in params if p["stages"] and p["stages"][0]["trainable"] is False]
    if stages and body:
        k = summary["stages"].index(stages[-1])
        rel = _rollup_rel(body, k)
        lines.append(f"At the end of the last stage, the tensors frozen in the first stage are {_pct(rel)} "
                     "away from the weights watching began with (relative L2 distance).")
    out.append({"question": "Does unfreezing eliminate the pretrained weights?",
                "answer": " ".join(lines) or "No tensor was unfrozen between stages in this run."})

    # 3. Does the next stage build on the last one?
    lines = []
    for s in stages[1:]:
        if s["starts_from_previous_end"] is True:
            how = ("bitwise, every tensor's bytes compared" if s["continuity"] == "bitwise"
                   else "proved by version counters: no tensor was written in between")
            lines.append(f"Stage {s['index']} ({s['name']}) started exactly where the previous stage ended ({how}).")
        elif s["starts_from_previous_end"] is False:
            diff = s["changed_since_previous_end"]
            lines.append(f"Stage {s['index']} ({s['name']}) did NOT start where the previous stage ended: "
                         f"{len(diff)} tensors differ ({', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}).")
    out.append({"question": "Does the next fit build on the previous one or start over?",
                "answer": " ".join(lines) or "The run has a single training stage."})
    return out


def _rollup_rel(params: list[dict], k: int) -> float | None:
    num = den = 0.0
    for p in params:
        e = p["stages"][k]
        if e["drift_abs"] is None or e["drift_rel"] in (None, 0):
            continue
        ref = e["drift_abs"] / e["drift_rel"]
        num += e["drift_abs"] ** 2
        den += ref ** 2
    return (num ** 0.5) / (den ** 0.5) if den > 0 else None
