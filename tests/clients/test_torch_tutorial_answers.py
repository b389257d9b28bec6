"""The answers about PyTorch's transfer-learning tutorial (tests/clients/torch_tutorial.py), checked
against the program's own state dicts: at the start, after the last step, and as train_model
returns (the best epoch's weights restored with load_state_dict)."""

from __future__ import annotations

import math
import re

import torch

import freezeframe
from clients.torch_tutorial import run_tutorial


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(-1).view(torch.uint8),
                                              b.contiguous().view(-1).view(torch.uint8))


def answer(summary: dict, i: int) -> str:
    return summary["answers"][i]["answer"]


def tutorial(run_dir, variant: str, **options):
    rec = run_tutorial(lambda m, o: freezeframe.watch(m, o, run_dir, every=1, **options), variant=variant)
    return rec, freezeframe.load(run_dir).summary()


def held_by(rec) -> set[int]:
    return {id(p) for g in rec.optimizer.param_groups for p in g["params"]}


def test_feature_extractor_body_is_bitwise_unchanged_distance_zero(run_dir):
    rec, s = tutorial(run_dir, "feature_extractor")
    names = dict(rec.model.named_parameters())
    body = [n for n, p in names.items() if not p.requires_grad]
    assert len(body) == 60 and all(same(rec.final[n], rec.start[n]) for n in body)  # the truth
    by_name = {p["name"]: p for p in s["params"]}
    for n in body:
        e = by_name[n]["stages"][0]
        assert e["same_as_start"] is True and e["drift_abs"] == 0.0, n
        assert e["drift_rel"] == (0.0 if by_name[n]["ref_norm"] else None), n
    a2 = answer(s, 1)
    assert "unknown" not in a2
    assert f"{len(body)} tensors" in a2 and "bitwise unchanged" in a2 and "distance 0" in a2
    # answer 1 counts what the optimizer held and changed (fc), as the state dicts show it
    held = held_by(rec)
    updated = [n for n, p in names.items() if id(p) in held and not same(rec.final[n], rec.start[n])]
    assert f"updated {len(updated)} of {len(names)} tensors" in answer(s, 0)
    assert f"The {len(body)} frozen tensors" in answer(s, 0)


def test_without_a_reference_the_hashes_still_prove_the_body_unchanged(run_dir):
    rec, s = tutorial(run_dir, "feature_extractor", reference=False)
    a2 = answer(s, 1)
    assert "bitwise unchanged" in a2 and "distance 0" in a2 and "unknown" not in a2


def test_restore_after_the_last_step_is_in_the_answers(run_dir):
    rec, s = tutorial(run_dir, "feature_extractor")
    assert rec.best_epoch == 0
    rewritten = {k for k, v in rec.final.items() if v.is_floating_point() and not same(v, rec.after_last_step[k])}
    assert rewritten  # the truth: load_state_dict(best) replaced weights after the last step
    st = s["stages"][0]
    writes = [w for w in st["outside_writes"] if w["when"] == "after_last_step"]
    assert writes, st["outside_writes"]
    listed = {n for w in writes for n in w["params"] + w["buffers"]}
    assert rewritten <= listed
    n = sum(len(w["params"]) + len(w["buffers"]) for w in writes)
    assert (f"After the last step of stage 0, {n} tensors" in answer(s, 0)
            and "were replaced outside an optimizer step (e.g. load_state_dict)" in answer(s, 0)
            and "(see the changed-outside-optimizer finding)" in answer(s, 0))
    assert any(f["code"] == "changed-outside-optimizer" and f["stage"] == 0 for f in s["findings"])
    # the stage's end facts are the restored weights' (final), not the last step's
    for p in s["params"]:
        assert p["stages"][0]["changed"] is (not same(rec.final[p["name"]], rec.start[p["name"]])), p["name"]


def test_finetune_distance_equals_the_state_dicts(run_dir):
    rec, s = tutorial(run_dir, "finetune")
    # nothing was frozen: answer 2 says so instead of a distance
    assert "No tensor was frozen in the first training stage" in answer(s, 1)
    names = [n for n, _ in rec.model.named_parameters()]
    held = held_by(rec)
    params = dict(rec.model.named_parameters())
    updated = [n for n in names if id(params[n]) in held and not same(rec.final[n], rec.start[n])]
    assert f"updated {len(updated)} of {len(names)} tensors" in answer(s, 0)
    by_name = {p["name"]: p for p in s["params"]}
    for n in names:  # drift measured against the start the program had, via ref_norm
        d = float((rec.final[n].double() - rec.start[n].double()).norm())
        assert math.isclose(by_name[n]["stages"][0]["drift_abs"], d, rel_tol=1e-4, abs_tol=1e-6), n  # float32 sums
