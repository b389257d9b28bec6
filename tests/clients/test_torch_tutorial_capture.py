"""PyTorch's transfer-learning tutorial (tests/clients/torch_tutorial.py) restores the best
epoch's weights with `model.load_state_dict(best)` after its last optimizer step. The run must
say so (the stage's `outside_writes`, listing exactly the tensors whose bytes the reload
changed) and every end fact must describe the weights the model really has at the end: the
tutorial's own `after_last_step` and `final` state dicts are the oracle."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import freezeframe
import oracle
from clients.torch_tutorial import run_tutorial


def _floating(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.is_floating_point()}


@pytest.mark.parametrize("variant", ["feature_extractor", "finetune"])
def test_the_tutorials_final_load_state_dict_is_recorded_and_end_facts_are_the_final_weights(run_dir, variant):
    r = run_tutorial(lambda m, o: freezeframe.watch(m, o, run_dir, every=1), variant=variant)
    start, after, final = _floating(r.start), _floating(r.after_last_step), _floating(r.final)
    params = set(oracle.param_names(r.model))
    rewritten = {k for k in final if not oracle.same_bytes(final[k], after[k])}
    assert rewritten  # the tutorial's tied validation set makes it restore epoch 0's weights
    if variant == "feature_extractor":  # the frozen body is rewritten with its own bytes: not listed
        assert rewritten & params == {"fc.weight", "fc.bias"}

    run = freezeframe.load(run_dir)
    (stage,) = run.manifest["stages"]
    assert stage["steps"] == r.steps
    (w,) = stage["outside_writes"]
    assert (w["when"], w["detected"], w["step"]) == ("after_last_step", "close", r.steps - 1)
    assert set(w["params"]) == rewritten & params
    assert set(w["buffers"]) == rewritten - params

    s = run.summary()
    for row in s["params"] + s["buffers"]:
        name = row["name"]
        (e,) = row["stages"]
        assert e["changed"] is (not oracle.same_bytes(final[name], start[name])), name
        if row in s["params"]:
            assert e["drift_abs"] == pytest.approx(oracle.dist(final[name], start[name]), rel=1e-4, abs=1e-6), name
    (f,) = [f for f in s["findings"] if f["code"] == "changed-outside-optimizer"]
    assert f["severity"] == "warning" and f["stage"] == 0 and set(f["params"]) == rewritten
    assert f"step {r.steps - 1}" in f["message"] and f"{len(rewritten & params)} parameter tensor(s)" in f["message"]
    hashes = dict(zip(oracle.param_names(r.model) + oracle.float_buffer_names(r.model), stage["end_hashes"]))
    assert hashes == {k: oracle.content_hash(v) for k, v in final.items()}


def test_a_reload_between_two_automatic_stages_is_found_at_the_next_stage(run_dir):
    """The tutorial's loop twice, the second time with the body unfrozen (an automatic boundary):
    the reload after the first loop's last step is found when the second loop's first step
    begins, and the second stage does not start where the first one's steps ended."""
    held = {}

    def watch_and_keep_open(model, opt):  # the recorder outlives the tutorial's `with` block
        held["rec"] = freezeframe.watch(model, opt, run_dir, every=1)
        return nullcontext()

    r = run_tutorial(watch_and_keep_open, variant="feature_extractor", num_epochs=2)
    after = _floating(r.after_last_step)
    final = _floating(r.final)
    for p in r.model.layer4.parameters():
        p.requires_grad_(True)
    opt = r.optimizer
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 0, 1])
    opt.zero_grad()
    torch.nn.functional.cross_entropy(r.model(x), y).backward()
    opt.step()
    held["rec"].close()
    st = freezeframe.load(run_dir).manifest["stages"]
    assert [s["steps"] for s in st] == [r.steps, 1]
    rewritten = {k for k in final if not oracle.same_bytes(final[k], after[k])}
    (wr,) = st[0]["outside_writes"]
    assert (wr["when"], wr["detected"], wr["step"]) == ("between_steps", "next_stage", r.steps - 1)
    assert set(wr["params"]) | set(wr["buffers"]) == rewritten
    assert st[1]["starts_from_previous_end"] is False
    assert set(st[1]["changed_since_previous_end"]) == rewritten
