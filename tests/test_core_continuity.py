"""Two-stage fine-tuning runs: the summary's facts per tensor, module and group, and whether each
stage started where the previous one ended (bitwise, by write tracking, across processes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

import freezeframe
import oracle
from models import BodyHead, SmallCNN, batch, build, train

STAGE0_TRAINABLE = {"temperature", "body.1.weight", "body.1.bias", "body.3.bias", "body.4.weight", "body.4.bias",
                    "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
STAGE1_LRS = [1e-4, 1e-3, 1e-2]


def _eval_pass(model, seed):
    model.eval()
    with torch.no_grad():
        model(batch(model, seed)[0])
    model.train()


def two_stage_run(run_dir, *, explicit: bool, reload=None) -> dict:
    """Stage 0: body frozen except its BatchNorms and body.3's bias (fastai-style, and a module
    with one frozen and one trainable tensor), one lr for every group. Stage 1: everything
    unfrozen, lower lrs for earlier groups. `reload(model)` runs between the stages.
    Returns the model, the tape (with W_ref) and the test's own snapshots of each stage's
    start (S0, S1) and end (E0, E1)."""
    model = build(BodyHead)
    with torch.no_grad():
        model.body[0].bias[0] = 0.0  # +0.0, which a reload may turn into -0.0
    model.freeze_body(keep_bn=True)
    model.body[3].bias.requires_grad_(True)
    opt = torch.optim.SGD([{"params": g} for g in model.layer_groups()], lr=1e-2, momentum=0.9)
    tape = oracle.Tape(model)
    snaps = {"model": model, "tape": tape, "groups": model.layer_groups()}
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        snaps["S0"] = oracle.state(model)
        with rec.stage("head") if explicit else nullcontext():
            train(model, opt, 3, tape=tape)
            _eval_pass(model, 50)
        snaps["E0"] = oracle.state(model)
        if reload is not None:
            reload(model)
        snaps["S1"] = oracle.state(model)
        with rec.stage("all") if explicit else nullcontext():
            model.unfreeze()
            for g, lr in zip(opt.param_groups, STAGE1_LRS):
                g["lr"] = lr
            train(model, opt, 3, start=3, tape=tape)
            _eval_pass(model, 51)
        snaps["E1"] = oracle.state(model)
    return snaps


def summary_via_cli(freezeframe_exe, run_dir, env) -> dict:
    out = subprocess.run([freezeframe_exe, "summary", str(run_dir), "--json"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = oracle.strict_json(out.stdout)
    oracle.check_summary_schema(doc)
    return doc


def check_facts(doc: dict, snaps: dict, *, names: list[str], unknown_end: frozenset = frozenset()) -> None:
    """Every fact of the two-stage run, recomputed from the test's own snapshots and tape.
    `unknown_end`: parameters written after stage 0's last step at a boundary found only later;
    stage 0's end state of those was never captured, so their stage-0 facts may be null
    (DESIGN.md: "changed ... null if the stage's end was not captured"), but never wrong."""
    model, tape, groups = snaps["model"], snaps["tape"], snaps["groups"]
    ref = tape.ref
    params = dict(model.named_parameters())
    group_of = {id(p): i for i, g in enumerate(groups) for p in g}
    trainable = [STAGE0_TRAINABLE, set(params)]
    starts, ends = [snaps["S0"], snaps["S1"]], [snaps["E0"], snaps["E1"]]
    step_ranges = [range(0, 3), range(3, 6)]
    run = doc["run"]
    assert run["framework"] == "torch" and run["complete"] is True
    assert run["steps"] == 6 and run["recovered_steps"] == 6 and run["skipped_steps"] is None
    assert run["tensors_total"] == len(params) == 13
    assert run["params_total"] == sum(p.numel() for p in params.values())
    assert [s["every"] for s in run["sessions"]] == [1]

    assert [s["name"] for s in doc["stages"]] == names
    for k, st in enumerate(doc["stages"]):
        steps = step_ranges[k]
        recs = [r for r in tape.steps if r["step"] in steps]
        assert (st["index"], st["kind"], st["complete"]) == (k, "train", True)
        assert (st["first_step"], st["last_step"], st["steps"]) == (steps[0], steps[-1], 3)
        assert st["forward_passes"] == {"train": 3, "eval": 1}
        assert st["tensors_trainable"] == len(trainable[k])
        assert st["params_trainable"] == sum(params[n].numel() for n in trainable[k])
        assert [g["index"] for g in st["groups"]] == [0, 1, 2]
        for i, g in enumerate(st["groups"]):
            lrs = [r["lr"][i] for r in recs]
            assert (g["optimizer"], g["name"], g["tensors"]) == (0, f"pg{i}", len(groups[i]))
            assert g["params"] == sum(p.numel() for p in groups[i])
            assert g["trainable_params"] == sum(p.numel() for n, p in params.items()
                                                if group_of[id(p)] == i and n in trainable[k])
            assert g["lr_max"] == g["lr_applied_max"] == max(lrs)
            assert (g["lr_min"], g["lr_first"], g["lr_last"]) == (min(lrs), lrs[0], lrs[-1])
            assert g["momentum_min"] == g["momentum_max"] == 0.9 and g["weight_decay"] == 0.0
        assert [g["lr_first"] for g in doc["stages"][1]["groups"]] == STAGE1_LRS

    # frozen in stage 0 and written before it first trained: no W_ref is kept (its bytes are no
    # longer those watching began with), so its drift from then on is unknown, with the reason
    refused = {n for n in params if n not in STAGE0_TRAINABLE and not oracle.same_bytes(starts[1][n], ref[n])}
    for p in doc["params"]:
        n = p["name"]
        t = params[n]
        assert bool(p["reference_refused"]) is (n in refused), n
        assert p["aliases"] == [] and p["present_from_stage"] == 0
        assert p["shape"] == list(t.shape) and p["numel"] == t.numel()
        assert p["module"] == n.rpartition(".")[0]
        assert p["is_norm"] is (p["module"] in ("body.1", "body.4"))
        for k, e in enumerate(p["stages"]):
            assert e["group"] == group_of[id(t)] and e["in_optimizer"] is True, n
            assert e["trainable"] is (n in trainable[k]), n
            assert e["grad_steps"] == (3 if n in trainable[k] else 0), n
            truth = not oracle.same_bytes(starts[k][n], ends[k][n])
            drift = oracle.dist(ends[k][n], ref[n])
            rn = oracle.norm(ref[n])
            maybe_null = k == 0 and n in unknown_end
            assert e["changed"] is truth or (maybe_null and e["changed"] is None), (n, k)
            if k == 1 and n in refused:
                assert e["drift_abs"] is None and e["drift_rel"] is None, n
            else:
                assert oracle.isclose(e["drift_abs"], drift) or (maybe_null and e["drift_abs"] is None), (n, k)
                if rn == 0 or (maybe_null and e["drift_abs"] is None):
                    assert e["drift_rel"] is None, (n, k)
                else:
                    assert oracle.isclose(e["drift_rel"], drift / rn), (n, k)
            assert oracle.isclose(e["update_ratio_median"], tape.update_ratio_median(n, list(step_ranges[k]))), (n, k)
        if n not in STAGE0_TRAINABLE:
            assert p["stages"][0]["changed"] in (False, None) and not oracle.differing(
                {n: starts[0][n]}, {n: ends[0][n]}), n  # frozen: bytes unchanged

    module_names = {m["name"] for m in doc["modules"]}
    assert module_names == {"", "body.0", "body.1", "body.3", "body.4", "head.0", "head.2"}
    want_trainable = {"": [True, True], "body.0": [False, True], "body.1": [True, True],
                      "body.3": ["partial", True], "body.4": [True, True], "head.0": [True, True],
                      "head.2": [True, True]}
    for m in doc["modules"]:
        mine = [n for n in params if n.rpartition(".")[0] == m["name"]]
        assert m["type"] == (type(model).__name__ if m["name"] == "" else type(model.get_submodule(m["name"])).__name__)
        grp = m.get("groups", m.get("group"))
        assert sorted(grp if isinstance(grp, list) else [grp]) == sorted({group_of[id(params[n])] for n in mine})
        assert [e["trainable"] for e in m["stages"]] == want_trainable[m["name"]], m["name"]
        for k, e in enumerate(m["stages"]):
            maybe_null = k == 0 and bool(unknown_end & set(mine))
            truth = any(not oracle.same_bytes(starts[k][n], ends[k][n]) for n in mine)
            assert e["changed"] is truth or (maybe_null and e["changed"] is None), (m["name"], k)
            num = math.sqrt(sum(oracle.dist(ends[k][n], ref[n]) ** 2 for n in mine))
            den = math.sqrt(sum(oracle.norm(ref[n]) ** 2 for n in mine))
            if den == 0 or (maybe_null and e["drift_rel"] is None) or (k == 1 and refused & set(mine)):
                assert e["drift_rel"] is None, (m["name"], k)
            else:
                assert oracle.isclose(e["drift_rel"], num / den), (m["name"], k)

    assert [b["name"] for b in doc["buffers"]] == oracle.float_buffer_names(model)
    for b in doc["buffers"]:
        n = b["name"]
        assert b["module"] == n.rpartition(".")[0]
        for k, e in enumerate(b["stages"]):
            assert e["changed"] is (not oracle.same_bytes(starts[k][n], ends[k][n])), (n, k)
            assert e["changed"] is True  # BN statistics move in train mode, frozen or not
            rn = oracle.norm(ref[n])
            want = None if rn == 0 else oracle.dist(ends[k][n], ref[n]) / rn
            assert oracle.isclose(e["drift_rel"], want), (n, k, e["drift_rel"], want)
    assert not [f for f in doc["findings"] if f["code"] == "frozen-param-changed"]


# -------------------------------------------------------------------------------- 1. continuity true


def test_two_stage_run_summary_json_has_the_right_facts(run_dir, freezeframe_exe, cli_env):
    snaps = two_stage_run(run_dir, explicit=True)
    doc = summary_via_cli(freezeframe_exe, run_dir, cli_env)
    check_facts(doc, snaps, names=["head", "all"])
    s0, s1 = doc["stages"]
    assert (s0["starts_from_previous_end"], s0["continuity"], s0["changed_since_previous_end"]) == (None, None, [])
    assert (s1["starts_from_previous_end"], s1["continuity"], s1["changed_since_previous_end"]) == (True, "bitwise", [])


def test_same_run_without_rec_stage_finds_the_same_stages(run_dir):
    snaps = two_stage_run(run_dir, explicit=False)
    doc = oracle.strict_json(json.dumps(freezeframe.load(run_dir).summary(), allow_nan=False))
    oracle.check_summary_schema(doc)
    check_facts(doc, snaps, names=["stage 0", "stage 1"])
    s1 = doc["stages"][1]
    assert s1["starts_from_previous_end"] is True and s1["changed_since_previous_end"] == []
    assert s1["continuity"] in ("bitwise", "written")


# -------------------------------------------------------------------------------- 2. reloaded weights


def _reload_some_different(model):
    """load_state_dict of a full state in which exactly three tensors differ in bytes: a
    parameter, a buffer, and a bias whose +0.0 became -0.0 (torch.equal calls those equal)."""
    other = {k: v.clone() for k, v in model.state_dict().items()}
    other["head.2.weight"] += 0.25
    other["body.1.running_mean"] += 0.5
    assert other["body.0.bias"][0].item() == 0.0 and not str(other["body.0.bias"][0].item()).startswith("-")
    other["body.0.bias"][0] = -0.0
    assert torch.equal(other["body.0.bias"], model.body[0].bias)  # equal for torch, not in bytes
    model.load_state_dict(other)


def test_explicit_stages_with_reload_report_exactly_the_tensors_whose_bytes_differ(run_dir):
    snaps = two_stage_run(run_dir, explicit=True, reload=_reload_some_different)
    expected = oracle.differing(snaps["E0"], snaps["S1"])
    assert expected == {"head.2.weight", "body.1.running_mean", "body.0.bias"}  # the test's own ground truth
    doc = oracle.strict_json(json.dumps(freezeframe.load(run_dir).summary(), allow_nan=False))
    oracle.check_summary_schema(doc)
    check_facts(doc, snaps, names=["head", "all"])
    s1 = doc["stages"][1]
    assert s1["starts_from_previous_end"] is False
    assert s1["continuity"] == "bitwise"
    assert sorted(s1["changed_since_previous_end"]) == sorted(expected)


def _reload_head_and_first_bn(model):
    """Partial reloads: the head (one tensor differs) and the first BatchNorm (its running_mean
    differs). Nothing else is written."""
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    head["2.weight"] += 0.25
    model.head.load_state_dict(head)
    bn = {k: v.clone() for k, v in model.body[1].state_dict().items()}
    bn["running_mean"] += 0.5
    model.body[1].load_state_dict(bn)


def test_automatic_stages_report_load_state_dict_as_written(run_dir):
    snaps = two_stage_run(run_dir, explicit=False, reload=_reload_head_and_first_bn)
    written_params = {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias", "body.1.weight", "body.1.bias"}
    written_buffers = {"body.1.running_mean", "body.1.running_var"}
    differ = oracle.differing(snaps["E0"], snaps["S1"])
    assert differ == {"head.2.weight", "body.1.running_mean"}  # the test's own ground truth
    summary = freezeframe.load(run_dir).summary()
    doc = oracle.strict_json(json.dumps(summary, allow_nan=False))
    oracle.check_summary_schema(doc)
    assert [s["name"] for s in doc["stages"]] == ["stage 0", "stage 1"]
    assert [(s["first_step"], s["steps"]) for s in doc["stages"]] == [(0, 3), (3, 3)]
    s1 = doc["stages"][1]
    assert s1["starts_from_previous_end"] is False
    assert s1["continuity"] == "written"
    listed = set(s1["changed_since_previous_end"])
    # every written parameter is listed (its end bytes were never hashed), every tensor whose
    # bytes differ is listed, and nothing that was not written is listed
    assert written_params | differ <= listed, sorted(listed)
    assert listed <= written_params | written_buffers, sorted(listed)
    # the end of stage 0 of a tensor written afterwards is unknown: null, never a wrong value;
    # every other fact is exact
    check_facts(doc, snaps, names=["stage 0", "stage 1"], unknown_end=frozenset(written_params))


# -------------------------------------------------------------------------------- 3. another process

APPEND_SCRIPT = r"""
import sys
import torch
import freezeframe
from models import BodyHead, build, train

# triples of arguments: a run directory, the weights to load, the tensor to perturb after loading ("-": none)
args = sys.argv[1:]
for run_dir, weights, perturb in zip(args[0::3], args[1::3], args[2::3]):
    model = build(BodyHead, seed=7)  # another initialisation: only the loaded weights count
    model.load_state_dict(torch.load(weights, weights_only=True))
    if perturb != "-":
        named = dict(model.named_parameters())
        named.update(dict(model.named_buffers()))
        with torch.no_grad():
            named[perturb].add_(1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with freezeframe.watch(model, opt, run_dir, every=1, mode="append"):
        train(model, opt, 2, start=3)
    print("appended", run_dir, flush=True)
"""


def _first_session(run_dir, tmp_path):
    model = build(BodyHead)
    model.freeze_body(keep_bn=True)
    opt = torch.optim.SGD([{"params": g} for g in model.layer_groups()], lr=1e-2)
    with freezeframe.watch(model, opt, run_dir, every=1):
        train(model, opt, 3)
    weights = run_dir.parent / f"{run_dir.name}-weights.pt"
    torch.save(model.state_dict(), weights)
    return model, weights


def test_second_process_appending_decides_continuity_from_stored_hashes(tmp_path, cli_env):
    cases = {"": tmp_path / "same", "head.2.weight": tmp_path / "perturbed"}
    argv = []
    for perturb, d in cases.items():
        _, weights = _first_session(d, tmp_path)
        argv += [str(d), str(weights), perturb or "-"]
    script = tmp_path / "append.py"
    script.write_text(APPEND_SCRIPT)
    out = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=cli_env,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("appended") == 2
    for perturb, d in cases.items():
        summary = freezeframe.load(d).summary()
        oracle.check_summary_schema(oracle.strict_json(json.dumps(summary, allow_nan=False)))
        sessions = summary["run"]["sessions"]
        assert len(sessions) == 2 and sessions[0]["pid"] == os.getpid() and sessions[1]["pid"] != os.getpid()
        assert summary["run"]["steps"] == 5 and summary["run"]["complete"] is True
        assert [(s["first_step"], s["steps"]) for s in summary["stages"]] == [(0, 3), (3, 2)]
        s1 = summary["stages"][1]
        assert s1["continuity"] == "bitwise", perturb
        assert s1["starts_from_previous_end"] is (perturb == ""), perturb
        assert s1["changed_since_previous_end"] == ([perturb] if perturb else []), perturb


def test_appending_in_the_same_process_after_a_buffer_was_perturbed(run_dir, tmp_path):
    model, _ = _first_session(run_dir, tmp_path)
    with torch.no_grad():
        model.body[4].running_var.mul_(1.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with freezeframe.watch(model, opt, run_dir, every=1, mode="append"):
        train(model, opt, 1, start=3)
    s1 = freezeframe.load(run_dir).summary()["stages"][1]
    assert (s1["starts_from_previous_end"], s1["continuity"]) == (False, "bitwise")
    assert s1["changed_since_previous_end"] == ["body.4.running_var"]


def test_mode_new_refuses_an_existing_run_and_append_refuses_another_model(run_dir, tmp_path):
    _first_session(run_dir, tmp_path)
    manifest = (run_dir / "manifest.json").read_bytes()
    model = build(BodyHead)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(freezeframe.FreezeFrameError) as e:
        freezeframe.watch(model, opt, run_dir, mode="new")
    assert str(run_dir) in str(e.value)

    other = build(BodyHead, n_classes=4)  # same names, one shape differs
    with pytest.raises(freezeframe.FreezeFrameError) as e:
        freezeframe.watch(other, torch.optim.SGD(other.parameters(), lr=0.01), run_dir, mode="append")
    msg = str(e.value)
    assert str(run_dir) in msg and "different model" in msg and "head.2.weight" in msg

    cnn = build(SmallCNN)
    with pytest.raises(freezeframe.FreezeFrameError) as e:
        freezeframe.watch(cnn, torch.optim.SGD(cnn.parameters(), lr=0.01), run_dir, mode="append")
    assert str(run_dir) in str(e.value) and "different model" in str(e.value)
    assert (run_dir / "manifest.json").read_bytes() == manifest  # refused runs are untouched
    assert len(freezeframe.load(run_dir).summary()["run"]["sessions"]) == 1
