"""Property-based tests (Hypothesis) over random small models — a stack of 1-4 Linear layers of
random widths, in one or two param groups — random freeze masks per stage, 1-3 stages of 1-5 steps,
explicit or automatic stage boundaries, and `every` in {1, 2, 3}:

- a never-trainable tensor is `changed: false`, drifts 0, gets no grad step and no non-zero update;
- drift before a tensor's first update is exactly 0;
- save -> load round-trips (also across a second session appending to the run): two loads give
  equal summaries, the steps table is what the test recorded, the metric rows equal the test's
  own tape, and every stage starts bitwise where the previous one ended;
- summary totals equal the sums of their rows;
- `grad_steps` <= `steps` for every tensor and stage (and equals it exactly when trainable).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import freezeframe
import oracle


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    print_blob=True)


@st.composite
def scenarios(draw):
    n_layers = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 5), min_size=n_layers + 1, max_size=n_layers + 1))
    n_tensors = 2 * n_layers
    never = draw(st.sets(st.integers(0, n_tensors - 1), max_size=n_tensors))
    stages = []
    for _ in range(draw(st.integers(1, 3))):
        mask = draw(st.lists(st.booleans(), min_size=n_tensors, max_size=n_tensors))
        stages.append(([m and i not in never for i, m in enumerate(mask)], draw(st.integers(1, 5))))
    return {
        "widths": widths, "stages": stages, "never": sorted(never),
        "every": draw(st.sampled_from([1, 2, 3])), "explicit": draw(st.booleans()),
        "split": draw(st.integers(0, n_layers - 1)),  # the first `split` layers in group 1 (0: one group)
        "resume": draw(st.integers(0, len(stages) - 1)),  # a second session (mode="append") from this stage
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def build_model(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        if k:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(widths[k], widths[k + 1]))
    return nn.Sequential(*layers)


def expected_stages(sc: dict) -> list[dict]:
    """The stages the recorder must find: one per explicit stage, or one per run of equal masks."""
    out: list[dict] = []
    step = 0
    for k, (mask, n) in enumerate(sc["stages"]):
        if sc["explicit"] or not out or out[-1]["mask"] != mask or (sc["resume"] and k == sc["resume"]):
            out.append({"name": f"s{k}" if sc["explicit"] else f"stage {len(out)}", "mask": mask,
                        "first": step, "steps": 0})
        out[-1]["steps"] += n
        step += n
    return out


def run_scenario(sc: dict, run_dir: Path) -> dict:
    torch.manual_seed(sc["seed"])
    model = build_model(sc["widths"])
    params = list(model.parameters())
    lin = [m for m in model if isinstance(m, nn.Linear)]
    if sc["split"]:
        g1 = [p for m in lin[: sc["split"]] for p in m.parameters()]
        g2 = [p for m in lin[sc["split"]:] for p in m.parameters()]
        opt = torch.optim.SGD([{"params": g1, "lr": 0.01}, {"params": g2}], lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = oracle.state(model)
    tape = oracle.Tape(model, ref=ref)
    truth = {"ref": ref, "stage_of_step": [], "grads": [], "tape": tape, "opt": opt, "model": model}
    gen = torch.Generator().manual_seed(sc["seed"])
    rec = freezeframe.watch(model, opt, run_dir, every=sc["every"])
    try:
        for k, (mask, n) in enumerate(sc["stages"]):
            if sc["resume"] and k == sc["resume"]:  # the same model watched again by a new recorder
                rec.close()
                rec = freezeframe.watch(model, opt, run_dir, every=sc["every"], mode="append")
            for p, m in zip(params, mask):
                p.requires_grad_(m)
            ctx = rec.stage(f"s{k}") if sc["explicit"] else _Null()
            with ctx:
                for _ in range(n):
                    x = torch.randn(3, sc["widths"][0], generator=gen)
                    opt.zero_grad()
                    out = model(x)
                    if any(mask):
                        (out ** 2).sum().backward()
                    truth["grads"].append(list(mask))
                    tape.step(opt)
    finally:
        rec.close()
    return truth


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _grads_bits(run, n_params: int) -> list[list[bool]]:
    out = []
    for mask in run.steps().column("grads").to_pylist():
        bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8))[:n_params]
        out.append([bool(b) for b in bits])
    return out


@SETTINGS
@given(sc=scenarios())
def test_recorded_runs_satisfy_the_invariants(sc):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            truth = run_scenario(sc, run_dir)
        assert not [str(w.message) for w in caught if "freezeframe" in str(w.message)]
        model, tape = truth["model"], truth["tape"]
        names = oracle.param_names(model)
        numel = {n: p.numel() for n, p in model.named_parameters()}
        stages = expected_stages(sc)

        run = freezeframe.load(run_dir)
        summary = run.summary()
        again = freezeframe.load(run_dir).summary()
        assert summary == again, "two loads of one run differ"

        # ---- the stages and the steps table are what the test did
        assert [(s["name"], s["first_step"], s["steps"]) for s in summary["stages"]] == [
            (e["name"], e["first"], e["steps"]) for e in stages]
        n_steps = sum(n for _, n in sc["stages"])
        steps = run.steps()
        assert steps.column("step").to_pylist() == list(range(n_steps))
        stage_of_step = [k for k, e in enumerate(stages) for _ in range(e["steps"])]
        assert steps.column("stage").to_pylist() == stage_of_step
        assert _grads_bits(run, len(names)) == truth["grads"]
        assert steps.column("lr").to_pylist() == [r["lr"] for r in tape.steps]
        recorded = [s - stages[stage_of_step[s]]["first"] for s in range(n_steps)]
        recorded = [r % sc["every"] == 0 for r in recorded]
        assert steps.column("recorded").to_pylist() == recorded
        recorded_steps = [s for s in range(n_steps) if recorded[s]]
        # (a recorded step with nothing trainable has no rows at all: the tape expects none either)
        with_rows = [s for s in recorded_steps if tape.steps[s]["rows"]]
        assert oracle.compare_with_tape(run.tensors(), tape, steps=with_rows) == []

        # ---- totals equal the sums of their rows
        r = summary["run"]
        assert len(r["sessions"]) == (2 if sc["resume"] else 1) and r["complete"] is True
        assert all(s["starts_from_previous_end"] is True for s in summary["stages"][1:])
        assert r["params_total"] == sum(numel.values()) == sum(p["numel"] for p in summary["params"])
        assert r["tensors_total"] == len(names) == len(summary["params"])
        assert r["steps"] == sum(s["steps"] for s in summary["stages"]) == n_steps
        for k, (s, e) in enumerate(zip(summary["stages"], stages)):
            trainable = [n for n, m in zip(names, e["mask"]) if m]
            assert s["params_trainable"] == sum(numel[n] for n in trainable)
            assert s["tensors_trainable"] == len(trainable)
            assert s["forward_passes"] == {"train": e["steps"], "eval": 0}
            assert sum(g["tensors"] for g in s["groups"]) == len(names)
            assert sum(g["params"] for g in s["groups"]) == r["params_total"]
            assert sum(g["trainable_params"] for g in s["groups"]) == s["params_trainable"]
            for g in s["groups"]:
                members = [p["name"] for p in summary["params"] if p["stages"][k]["group"] == g["index"]]
                assert g["tensors"] == len(members) and g["params"] == sum(numel[n] for n in members)
        for m in summary["modules"]:
            for k, ms in enumerate(m["stages"]):
                flags = [p["stages"][k]["trainable"] for p in summary["params"] if p["module"] == m["name"]]
                assert ms["trainable"] == (True if all(flags) else False if not any(flags) else "partial")

        # ---- per tensor and stage
        rows = oracle.stored_metrics(run.tensors())
        for i, (p, name) in enumerate(zip(summary["params"], names)):
            assert p["name"] == name
            first_update = next((k for k, e in enumerate(stages) if e["mask"][i]), None)
            for k, (entry, e) in enumerate(zip(p["stages"], stages)):
                assert 0 <= entry["grad_steps"] <= s_steps(summary, k)
                assert entry["grad_steps"] == (e["steps"] if e["mask"][i] else 0)
                assert entry["trainable"] is e["mask"][i]
                if first_update is None or k < first_update:
                    # never trained (so far): its bytes never moved, its drift is exactly 0
                    assert entry["changed"] is False, (name, k, entry)
                    assert entry["drift_abs"] == 0.0, (name, k, entry)
            if first_update is None:
                assert i in sc["never"] or not any(e["mask"][i] for e in stages)
                for s in recorded_steps:
                    if name in rows.get(s, {}):
                        _, update, _, drift = rows[s][name]
                        assert update == 0.0 and drift == 0.0, (name, s, rows[s][name])
            else:
                before = [s for s in recorded_steps if s < stages[first_update]["first"] and name in rows.get(s, {})]
                assert all(rows[s][name][3] == 0.0 for s in before), (name, [rows[s][name] for s in before])


def s_steps(summary: dict, k: int) -> int:
    return summary["stages"][k]["steps"]
