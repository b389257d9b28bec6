"""What the recorder states about epochs, values logged by hand, and tensors that only an
optimizer holds, each against the test's own count or the program's own tensors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import freezeframe
import oracle
from models import SmallCNN, batch, build, loss_of, train


def _stages(run_dir):
    return freezeframe.load(run_dir).manifest["stages"]


# ------------------------------------------------------------------------ epochs


def test_epochs_and_epoch_starts_are_what_each_stage_ran(run_dir):
    """Three epochs of two steps in one explicit stage, the features unfrozen at the start of
    epoch 2 (a new stage part): part 1 ran epochs 0 and 1, part 2 ran epoch 2 only."""
    model = build(SmallCNN)
    model.features.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        rec.begin_stage("fit", epochs=3)
        step = 0
        for epoch in range(3):
            rec.epoch()
            if epoch == 2:
                model.features.requires_grad_(True)
            train(model, opt, 2, start=step)
            step += 2
        rec.end_stage()
        train(model, opt, 2, start=step)                  # an automatic stage, no epoch announced
    st = _stages(run_dir)
    assert [(s["name"], s["first_step"], s["steps"]) for s in st] == [("fit", 0, 4), ("fit (part 2)", 4, 2),
                                                                      ("stage 2", 6, 2)]
    assert [s["epoch_starts"] for s in st] == [[0, 2], [4], None]
    assert [s["epochs"] for s in st] == [2, 1, None]
    assert [s["epochs_planned"] for s in st] == [3, 3, None]


def test_a_stage_split_inside_an_epoch_counts_that_epoch_in_both_parts(run_dir):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("fit"):
            rec.epoch()
            train(model, opt, 2)
            model.features.requires_grad_(False)          # mid-epoch: part 2 begins in epoch 0
            train(model, opt, 1, start=2)
            rec.epoch()
            train(model, opt, 2, start=3)
    st = _stages(run_dir)
    assert [s["epoch_starts"] for s in st] == [[0], [2, 3]]
    assert [s["epochs"] for s in st] == [1, 2]


# ------------------------------------------------------------------------ rec.log


def _six_steps_logging(run_dir, bad):
    model = build(SmallCNN)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with freezeframe.watch(model, opt, run_dir, every=1) as rec:
            with rec.stage("train"):
                for s in range(6):
                    x, y = batch(model, s)
                    opt.zero_grad()
                    loss = loss_of(model, x, y)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss))
                    rec.log(loss=bad(loss) if s == 2 else loss)
                    rec.log(acc=np.float32(0.5), n=s, ok=True, one=torch.tensor([2.0]))
    return losses, [str(w.message) for w in caught if "freezeframe" in str(w.message)]


@pytest.mark.parametrize("bad, what", [
    (lambda loss: None, "NoneType"),
    (lambda loss: "0.5", "str"),
    (lambda loss: loss.detach().expand(3).clone(), "shape (3,)"),   # a forgotten .mean()
    (lambda loss: [float(loss)], "list"),
    (lambda loss: complex(float(loss), 1.0), "complex"),
])
def test_a_bad_logged_value_is_skipped_with_one_warning_and_recording_goes_on(run_dir, bad, what):
    losses, msgs = _six_steps_logging(run_dir, bad)
    run = freezeframe.load(run_dir)
    st = run.manifest["stages"]
    assert [(s["steps"], s["complete"]) for s in st] == [(6, True)]
    assert run.steps().column("step").to_pylist() == list(range(6))
    assert len(msgs) == 1 and "loss" in msgs[0] and what in msgs[0], msgs
    rows = {(r["step"], r["name"]): r["value"] for r in run.scalars().to_pylist()}
    assert [rows.get((s, "loss")) for s in range(6)] == [pytest.approx(v) if s != 2 else None
                                                       for s, v in enumerate(losses)]
    assert [rows[(s, "n")] for s in range(6)] == list(range(6))
    assert rows[(0, "ok")] == 1.0 and rows[(0, "one")] == 2.0 and rows[(0, "acc")] == 0.5


# ------------------------------------------------------------------------ optimizer-only tensors


class Contrastive(nn.Module):
    """A CLIP-style model: its learnable temperature lives beside it, in the optimizer only."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 3)


def test_a_tensor_held_by_the_optimizer_but_not_the_model_is_recorded(run_dir):
    torch.manual_seed(0)
    model = Contrastive()
    temperature = nn.Parameter(torch.tensor(0.07))
    opt = torch.optim.SGD([{"params": model.parameters()}, {"params": [temperature], "lr": 0.5}], lr=0.1)
    t0 = temperature.detach().clone()
    with freezeframe.watch(model, opt, run_dir, every=1):
        for s in range(3):
            x = torch.randn(8, 4)
            opt.zero_grad()
            z = model.enc(x)
            loss = (z @ z.T / temperature).logsumexp(1).mean()
            loss.backward()
            opt.step()
    run = freezeframe.load(run_dir)
    params = run.manifest["model"]["params"]
    assert [p["name"] for p in params] == ["enc.weight", "enc.bias", "optimizer-only.pg1.0"]
    assert (params[2]["module"], params[2]["module_type"], params[2]["shape"]) == ("optimizer-only", "Parameter", [])
    (stage,) = run.manifest["stages"]
    assert stage["groups"][1]["params"] == [2]
    assert stage["grad_steps"][2] == 3
    assert stage["end_hashes"][2] == oracle.content_hash(temperature)
    assert stage["start_hashes"][2] == oracle.content_hash(t0)
    assert stage["end_metrics"]["drift"][2] == pytest.approx(oracle.dist(temperature, t0), rel=1e-5)


def test_a_tensor_in_two_optimizers_that_both_step_is_named(run_dir):
    model = build(SmallCNN)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_b = torch.optim.Adam(model.classifier.parameters(), lr=1e-3)   # the head twice
    with freezeframe.watch(model, [opt_a, opt_b], run_dir, every=1):
        for s in range(2):
            x, y = batch(model, s)
            opt_a.zero_grad()
            opt_b.zero_grad()
            loss_of(model, x, y).backward()
            opt_a.step()
            opt_b.step()
    run = freezeframe.load(run_dir)
    (stage,) = run.manifest["stages"]
    shared = [n for n, _ in model.classifier.named_parameters(prefix="classifier")]
    assert stage["shared_between_optimizers"] == shared
    (f,) = [f for f in run.summary()["findings"] if f["code"] == "tensor-in-two-optimizers"]
    assert f["params"] == shared and f["severity"] == "warning"


# ------------------------------------------------------------------ found by review: each a false fact before

def test_a_loss_module_called_beside_the_model_is_not_a_forward_pass(run_dir):
    """`loss = model.criterion(model(x), y)`: the criterion is a child of the model called outside
    the model's own forward; it is no pass of the network (5 steps, 5 passes)."""
    class WithCriterion(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
            self.criterion = nn.CrossEntropyLoss()

        def forward(self, x):
            return self.net(x)

    m = WithCriterion()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    calls = []
    m.register_forward_pre_hook(lambda mod, args: calls.append(mod.training))
    with freezeframe.watch(m, opt, run_dir, every=1):
        for _ in range(5):
            opt.zero_grad()
            m.criterion(m(torch.randn(3, 4)), torch.randint(0, 2, (3,))).backward()
            opt.step()
    (st,) = freezeframe.load(run_dir).summary()["stages"]
    assert st["forward_passes"] == {"train": len(calls), "eval": 0} == {"train": 5, "eval": 0}


def test_a_torchscript_submodule_does_not_stop_recording(run_dir):
    m = nn.Sequential(torch.jit.script(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*freezeframe.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        with freezeframe.watch(m, opt, run_dir, every=1):
            for _ in range(3):
                opt.zero_grad()
                m(torch.randn(2, 4)).sum().backward()
                opt.step()
    s = freezeframe.load(run_dir).summary()
    assert s["run"]["steps"] == 3 and s["stages"][0]["forward_passes"]["train"] == 3


def test_weights_loaded_after_watch_are_not_called_the_weights_watching_began_with(run_dir):
    """watch(), then load "pretrained" weights into the frozen body, then train the head: the body
    is bitwise unchanged over the stage but not W_ref (the model as watching began). It never
    trains, so no copy of it is kept: how far it is from W_ref is unknown, and the answer says why."""
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    for p in m[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(m[2].parameters(), lr=0.1)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    pretrained = {k: v * 2 for k, v in m.state_dict().items()}
    with freezeframe.watch(m, opt, run_dir, every=1):
        m.load_state_dict(pretrained)
        for _ in range(3):
            opt.zero_grad()
            m(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    s = freezeframe.load(run_dir).summary()
    by = {p["name"]: p["stages"][0] for p in s["params"]}
    for n in ("0.weight", "0.bias"):
        assert not torch.equal(m.state_dict()[n], ref[n])
        assert by[n]["same_as_start"] is False and by[n]["changed"] is False, n
        assert by[n]["drift_abs"] is None and by[n]["drift_rel"] is None, n
    assert set(freezeframe.load(run_dir).reference()) == {"2.weight", "2.bias"}
    a2 = s["answers"][1]["answer"]
    assert "distance 0" not in a2 and "is unknown" in a2 and "never trained" in a2, a2


def test_a_write_found_at_a_model_change_says_where_it_was_found(run_dir):
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with freezeframe.watch(m, opt, run_dir, every=1):
            for _ in range(3):
                opt.zero_grad()
                ((m(x) - y) ** 2).mean().backward()
                opt.step()
            with torch.no_grad():
                m[0].weight.copy_(torch.zeros(4, 4))
            m[2] = nn.Linear(4, 2)
            opt.add_param_group({"params": m[2].parameters()})
            for _ in range(3):
                opt.zero_grad()
                ((m(x) - y) ** 2).mean().backward()
                opt.step()
    s = freezeframe.load(run_dir).summary()
    (f,) = [f for f in s["findings"] if f["code"] == "changed-outside-optimizer"]
    assert "0.weight" in f["params"]
    assert "when recording closed" not in f["message"] and "when the model's tensors changed" in f["message"]
