"""W_ref is kept only for what trains: taken when a tensor first becomes trainable, after its
content hash proves it still holds the bytes watching began with; frozen tensors get no copy and
are proved unchanged by their hashes (docs/recording.md, "The reference")."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from torch import nn

import freezeframe
from tests import oracle


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


BODY = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
HEAD = ["5.weight", "5.bias"]
BUFFERS = ["1.running_mean", "1.running_var"]


def _freeze_body(m: nn.Module, frozen: bool = True) -> None:
    for n, p in m.named_parameters():
        if n in BODY:
            p.requires_grad_(not frozen)


def _train(m, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()


def _stored(run_dir):
    return load_file(str(run_dir / "reference.safetensors"))


def test_a_frozen_body_has_no_copy_the_head_and_buffers_are_the_start(run_dir):
    m = _model()
    _freeze_body(m)
    start = oracle.state(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    with freezeframe.watch(m, opt, run_dir, every=1) as rec:
        with rec.stage("head"):
            _train(m, opt, 3, 0)
    stored = _stored(run_dir)
    assert set(stored) == set(HEAD + BUFFERS)
    for n, t in stored.items():
        assert oracle.same_bytes(t, start[n]), n
    run = freezeframe.load(run_dir)
    assert set(run.reference()) == set(HEAD + BUFFERS)
    names = run.manifest["model"]["params"]
    taken = dict(zip([p["name"] for p in names] + BUFFERS, run.manifest["reference_taken"]))
    assert {n: s for n, s in taken.items() if s is not None} == {n: 0 for n in HEAD + BUFFERS}
    # never trainable: bitwise unchanged, drift 0 by proof, ref_norm from the start state
    s = run.summary()
    by = {p["name"]: p for p in s["params"]}
    for n in BODY:
        e = by[n]["stages"][0]
        assert e["trainable"] is False and e["same_as_start"] is True and e["changed"] is False, n
        assert e["drift_abs"] == 0.0 and by[n]["reference_refused"] is None, n
        assert oracle.isclose(by[n]["ref_norm"], oracle.norm(start[n])), n
    end = oracle.state(m)
    for n in HEAD:
        assert oracle.isclose(by[n]["stages"][0]["drift_abs"], oracle.dist(end[n], start[n])), n
    assert "bitwise unchanged" in s["answers"][1]["answer"] and "unknown" not in s["answers"][1]["answer"]


def test_an_unfreeze_takes_the_body_reference_equal_to_the_start(run_dir):
    m = _model()
    _freeze_body(m)
    start = oracle.state(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    with freezeframe.watch(m, opt, run_dir, every=1) as rec:
        with rec.stage("head"):
            _train(m, opt, 3, 0)
        assert set(_stored(run_dir)) == set(HEAD + BUFFERS)  # nothing of the body yet
        _freeze_body(m, False)
        with rec.stage("all"):
            _train(m, opt, 3, 1)
    end = oracle.state(m)
    stored = _stored(run_dir)
    assert set(stored) == set(BODY + HEAD + BUFFERS)
    for n, t in stored.items():
        assert oracle.same_bytes(t, start[n]), n
    run = freezeframe.load(run_dir)
    taken = dict(zip([p["name"] for p in run.manifest["model"]["params"]] + BUFFERS, run.manifest["reference_taken"]))
    assert all(taken[n] == 3 for n in BODY) and all(taken[n] == 0 for n in HEAD + BUFFERS)
    by = {p["name"]: p for p in run.summary()["params"]}
    for n in BODY:
        e0, e1 = by[n]["stages"]
        assert e0["drift_abs"] == 0.0 and e0["same_as_start"] is True, n
        assert oracle.isclose(e1["drift_abs"], oracle.dist(end[n], start[n])), n
        rn = oracle.norm(start[n])  # (a BatchNorm bias starts at 0: drift_rel null)
        assert (e1["drift_rel"] is None) if rn == 0 else oracle.isclose(e1["drift_rel"], oracle.dist(end[n], start[n]) / rn), n


def test_a_tensor_written_while_frozen_gets_no_reference_and_says_why(run_dir):
    m = _model()
    _freeze_body(m)
    start = oracle.state(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with freezeframe.watch(m, opt, run_dir, every=1) as rec:
        with rec.stage("head"):
            _train(m, opt, 2, 0)
        with torch.no_grad():
            m[0].weight.add_(1.0)  # written while frozen
        _freeze_body(m, False)
        with rec.stage("all"):
            _train(m, opt, 2, 1)
    end = oracle.state(m)
    stored = _stored(run_dir)
    assert "0.weight" not in stored and "0.bias" in stored
    assert oracle.same_bytes(stored["0.bias"], start["0.bias"])
    run = freezeframe.load(run_dir)
    idx = [p["name"] for p in run.manifest["model"]["params"]].index("0.weight")
    assert run.manifest["reference_taken"][idx] is None
    assert "written or replaced while frozen" in run.manifest["reference_refused"][idx]
    s = run.summary()
    by = {p["name"]: p for p in s["params"]}
    w = by["0.weight"]
    assert "written or replaced while frozen" in w["reference_refused"]
    assert w["stages"][0]["drift_abs"] == 0.0  # its end of stage 0 is still the start, by its hash
    assert w["stages"][1]["drift_abs"] is None and w["stages"][1]["same_as_start"] is False
    assert oracle.isclose(by["0.bias"]["stages"][1]["drift_abs"], oracle.dist(end["0.bias"], start["0.bias"]))
    answer = s["answers"][1]["answer"]
    assert "is unknown" in answer and "written or replaced while frozen" in answer and "0.weight" in answer, answer


def test_an_appended_session_reads_refs_back_and_takes_the_missing_ones_lazily(run_dir):
    m = _model()
    _freeze_body(m)
    start = oracle.state(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with freezeframe.watch(m, opt, run_dir, every=1):
        _train(m, opt, 2, 0)
    assert set(_stored(run_dir)) == set(HEAD + BUFFERS)
    with freezeframe.watch(m, opt, run_dir, every=1, mode="append"):
        _train(m, opt, 1, 1)
        assert set(_stored(run_dir)) == set(HEAD + BUFFERS)  # still frozen: no copy
        _freeze_body(m, False)
        _train(m, opt, 2, 2)
    end = oracle.state(m)
    stored = _stored(run_dir)
    assert set(stored) == set(BODY + HEAD + BUFFERS)
    for n, t in stored.items():
        assert oracle.same_bytes(t, start[n]), n  # the head's is still the first session's
    run = freezeframe.load(run_dir)
    doc = json.loads((run_dir / "manifest.json").read_text())
    taken = dict(zip([p["name"] for p in doc["model"]["params"]] + BUFFERS, doc["reference_taken"]))
    assert all(taken[n] == 3 for n in BODY) and all(taken[n] == 0 for n in HEAD + BUFFERS)
    by = {p["name"]: p for p in run.summary()["params"]}
    for n in BODY + HEAD:
        last = by[n]["stages"][-1]
        assert oracle.isclose(last["drift_abs"], oracle.dist(end[n], start[n])), n


def test_a_damaged_reference_file_is_named_and_an_appended_run_takes_its_refs_again(run_dir, caplog):
    """reference.safetensors torn (e.g. by a power loss): reading it names the file; a second
    watch() appending to the run does not fail, and takes W_ref again, checked against the run's
    start hashes, so the body's drift after it trains is still exact."""
    import pytest

    m = _model()
    _freeze_body(m)
    start = oracle.state(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with freezeframe.watch(m, opt, run_dir, every=1) as rec:
        with rec.stage("head"):
            _train(m, opt, 2, 0)
    (run_dir / "reference.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(freezeframe.RunError, match="reference.safetensors.*damaged"):
        freezeframe.load(run_dir).reference()
    _freeze_body(m, frozen=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger="freezeframe"):
        with freezeframe.watch(m, opt, run_dir, every=1, mode="append") as rec:
            with rec.stage("all"):
                _train(m, opt, 2, 1)
    assert any("could not be read" in r.getMessage() for r in caplog.records)
    end = oracle.state(m)
    s = freezeframe.load(run_dir).summary()
    assert set(freezeframe.load(run_dir).reference()) >= set(BODY)
    for p in s["params"]:
        if p["name"] in BODY:
            e = p["stages"][1]
            assert oracle.isclose(e["drift_abs"], oracle.dist(end[p["name"]], start[p["name"]])), p["name"]
