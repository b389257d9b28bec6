"""What happened between two fits (`transitions[]`), how the first one started
(`stages[].initial_state`), each epoch's values (`stages[].epoch_metrics`) and the answers' words
for epochs, trained layer kinds and BatchNorm statistics (docs/summary-format.md), from runs the
real Recorder wrote around plain PyTorch loops, against the loops' own state dicts, requires_grad,
optimizer state and learning rates."""

from __future__ import annotations

import re

import torch

import freezeframe
import oracle
from models import BodyHead, batch, build, loss_of


class Loop:
    """A plain loop that keeps the ground truth: state at each stage's start and end, requires_grad,
    the lr of every group of the stepping optimizer at every step, and its state count."""

    def __init__(self, model):
        self.model = model
        self.stages: list[dict] = []
        self.n = 0

    def stage(self, rec, opt, steps, name, *, epochs=None, micro=1, **kw):
        model = self.model
        st = {"name": name, "start": oracle.state(model),
              "trainable": {n: p.requires_grad for n, p in model.named_parameters()},
              "state_start": len(opt.state), "lrs": []}
        with rec.stage(name, **kw):
            for e, count in enumerate(epochs or [steps]):
                if epochs:
                    rec.epoch()
                for _ in range(count):
                    opt.zero_grad()
                    for _ in range(micro):
                        x, y = batch(model, self.n)
                        (loss_of(model, x, y) / micro).backward()
                    opt.step()
                    st["lrs"].append([g["lr"] for g in opt.param_groups])
                    self.n += 1
        st["end"], st["state_end"] = oracle.state(model), len(opt.state)
        self.stages.append(st)
        return st


def _groups(model, lrs=(0.01, 0.02, 0.03)):
    return [{"params": ps, "lr": lr} for ps, lr in zip(model.layer_groups(), lrs)]


def test_unfreezing_by_hand_keeps_every_value_and_the_optimizer(run_dir):
    model = build(BodyHead)
    opt = torch.optim.SGD(_groups(model), lr=0.01, momentum=0.9)
    loop = Loop(model)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        model.freeze_body()
        a = loop.stage(rec, opt, 3, "head")
        model.unfreeze()
        b = loop.stage(rec, opt, 2, "all")
    s = freezeframe.load(run_dir).summary()
    (t,) = s["transitions"]
    names = list(a["trainable"])
    up = [n for n in names if not a["trainable"][n] and b["trainable"][n]]
    assert t["became_trainable"] == up and len(up) == 8 and t["became_frozen"] == []
    assert (t["stage"], t["from_stage"], t["event"]) == (1, 0, "8 tensors unfrozen")
    assert t["values_changed"] == sorted(oracle.differing(a["end"], b["start"])) == [] and t["values_kept"] is True
    assert t["optimizer"] == "same"
    assert a["state_end"] > 0 and b["state_start"] == a["state_end"] and t["optimizer_state_reset"] is False
    assert [(g["index"], g["name"], g["optimizer"]) for g in t["groups"]] == [(0, "pg0", 0), (1, "pg1", 0),
                                                                            (2, "pg2", 0)]
    assert [g["lr_before"] for g in t["groups"]] == a["lrs"][-1]
    assert [g["lr_after"] for g in t["groups"]] == b["lrs"][0] == [g["lr_max_after"] for g in t["groups"]]
    assert [g["tensors_before"] for g in t["groups"]] == [len(ps) for ps in model.layer_groups()]
    init = s["stages"][0]["initial_state"]
    assert init == {"frozen": [n for n in names if not a["trainable"][n]],
                    "trainable": [n for n in names if a["trainable"][n]], "frozen_groups": None, "note": None}
    assert s["stages"][1]["initial_state"] is None


def test_a_new_optimizer_a_new_group_and_a_reload(run_dir):
    model = build(BodyHead)
    sgd = torch.optim.SGD(model.head.parameters(), lr=0.05, momentum=0.9)
    loop = Loop(model)
    with freezeframe.watch(model, sgd, run_dir, every=1) as rec:
        a = loop.stage(rec, sgd, 2, "head")
        sgd.add_param_group({"params": list(model.body.parameters()) + [model.temperature], "lr": 0.01})
        b = loop.stage(rec, sgd, 2, "grown")
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        loop.stage(rec, sgd, 1, "more")
        model.load_state_dict(saved)  # back to "grown"'s end: "more" is undone
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)
        rec.track(adam)
        d = loop.stage(rec, adam, 2, "adam")
    s = freezeframe.load(run_dir).summary()
    t1, t2, t3 = s["transitions"]
    assert (t1["optimizer"], t1["event"], t1["values_kept"]) == ("groups changed", "no change to what trains", True)
    assert [(g["index"], g["tensors_before"], g["tensors_after"]) for g in t1["groups"]] == [
        (0, 4, 4), (1, None, len(list(model.body.parameters())) + 1)]
    assert t1["groups"][1]["lr_before"] is None and t1["groups"][1]["lr_after"] == b["lrs"][0][1] == 0.01
    assert (t2["optimizer"], t2["values_changed"]) == ("same", [])
    c = loop.stages[2]
    changed = sorted(oracle.differing(c["end"], d["start"]))
    assert changed and sorted(t3["values_changed"]) == changed and t3["values_kept"] is False
    assert t3["optimizer"] == "new" and c["state_end"] > 0 and d["state_start"] == 0
    assert t3["optimizer_state_reset"] is True
    assert [(g["optimizer"], g["lr_before"] is None, g["lr_after"] is None) for g in t3["groups"]] == [
        (0, False, True), (0, False, True), (1, True, False)]
    assert a["state_start"] == 0 and s["stages"][0]["initial_state"]["frozen"] == []


def test_fastais_freeze_calls_are_named_from_the_frozen_groups(run_dir):
    """The stage meta fastai's callback hands over (`frozen_groups`, `frozen_idx`), given here by hand
    with the freezing it describes; a trial stage between two stages is skipped on both sides."""
    model = build(BodyHead)
    groups = model.layer_groups()
    opt = torch.optim.SGD([{"params": ps} for ps in groups], lr=0.01)
    loop = Loop(model)

    def freeze_to(n):
        for g, ps in enumerate(groups):
            for p in ps:
                p.requires_grad_(g >= n)
        return {"frozen_groups": list(range(n)), "frozen_idx": n}

    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        loop.stage(rec, opt, 1, "frozen", meta=freeze_to(2))
        loop.stage(rec, opt, 1, "all", meta=freeze_to(0))
        loop.stage(rec, opt, 1, "trial", kind="trial", meta=freeze_to(0))
        loop.stage(rec, opt, 1, "partly", meta=freeze_to(1))
        loop.stage(rec, opt, 1, "frozen again", meta=freeze_to(2))
    s = freezeframe.load(run_dir).summary()
    assert [(t["from_stage"], t["stage"], t["event"]) for t in s["transitions"]] == [
        (0, 1, "unfreeze()"), (1, 3, "freeze_to(1)"), (3, 4, "freeze()")]
    early = [n for n, p in model.named_parameters() if any(p is q for q in groups[0])]
    late = [n for n, p in model.named_parameters() if any(p is q for q in groups[1])]
    assert s["transitions"][1]["became_frozen"] == early and s["transitions"][2]["became_frozen"] == late
    assert s["stages"][0]["initial_state"]["frozen_groups"] == [0, 1]
    assert s["stages"][0]["initial_state"]["note"] is None  # not a fastai run: nobody to name


def test_epoch_values_line_up_with_the_epochs(run_dir):
    model = build(BodyHead)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        with rec.stage("fit"):
            for e in range(3):
                rec.epoch()
                for s in range(2):
                    x, y = batch(model, 2 * e + s)
                    opt.zero_grad()
                    loss_of(model, x, y).backward()
                    opt.step()
                if e != 1:
                    rec.log_epoch(train_loss=1.0 + e, accuracy=float("nan"))
                if e == 2:
                    rec.log_epoch(train_loss=9.0)  # merged: the later value wins
        with rec.stage("no values"):
            rec.epoch()
            opt.step()
    s = freezeframe.load(run_dir).summary()
    assert s["stages"][0]["epoch_metrics"] == [
        {"epoch": 0, "first_step": 0, "values": {"train_loss": 1.0, "accuracy": None}},
        {"epoch": 1, "first_step": 2, "values": None},
        {"epoch": 2, "first_step": 4, "values": {"train_loss": 9.0, "accuracy": None}}]
    assert s["stages"][1]["epoch_metrics"] is None


def _answer(run_dir) -> str:
    return freezeframe.load(run_dir).summary()["answers"][0]["answer"]


def test_the_answers_count_epochs_batches_and_steps(run_dir, tmp_path):
    model = build(BodyHead)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loop = Loop(model)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        loop.stage(rec, opt, 0, "even", epochs=[3, 3])
        loop.stage(rec, opt, 0, "uneven", epochs=[3, 2])
        loop.stage(rec, opt, 0, "accumulated", epochs=[2, 2], micro=2)
        loop.stage(rec, opt, 4, "no epochs")
    a1 = _answer(run_dir)
    assert "Stage 0 (even) ran 2 epochs = 2 passes over the 3 training batches = 6 optimizer steps:" in a1
    assert "Stage 1 (uneven) ran 2 epochs = 5 optimizer steps:" in a1
    assert "Stage 2 (accumulated) ran 2 epochs = 2 passes over the 4 training batches = 4 optimizer steps:" in a1
    assert "Stage 3 (no epochs) ran 4 optimizer steps:" in a1


def test_the_answers_name_what_trained_and_what_the_running_statistics_did(run_dir):
    model = build(BodyHead)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loop = Loop(model)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        model.freeze_body()  # BatchNorm included: its statistics still move in train mode
        a = loop.stage(rec, opt, 3, "head")
        model.unfreeze()
        model.eval()  # no statistics move
        loop.stage(rec, opt, 2, "eval mode")
    a1 = _answer(run_dir)
    assert ("While the body was frozen, these layers trained: the head's 2 Linear layers, and 1 BodyHead layer "
            "outside both (the root module's own tensors).") in a1
    ref = a["start"]  # the weights watching began with
    stats = [n for n in ref if n.endswith(("running_mean", "running_var"))]
    moved = {n.rpartition(".")[0] for n in stats if not oracle.same_bytes(a["start"][n], a["end"][n])}
    assert moved == {"body.1", "body.4"}
    rel = {n: oracle.dist(a["end"][n], ref[n]) / oracle.norm(ref[n]) for n in stats if oracle.norm(ref[n]) > 0}
    top = max(rel, key=rel.get)
    m = re.search(r"The running statistics \(running_mean, running_var\) of all 2 BatchNorm layers moved: the "
                  r"forward pass updates them in train mode, frozen or not, and no optimizer step is involved "
                  r"\(2 of these layers were frozen\); largest: (\S+), ([0-9.e+-]+) % from its value when "
                  r"watching began", a1)
    assert m, a1
    assert m.group(1) == top and abs(float(m.group(2)) - 100 * rel[top]) <= 5e-3 * 100 * rel[top]
    assert "The running statistics of the 2 BatchNorm layers did not change in this stage (bitwise)." in a1


def test_the_terminal_summary_says_what_happened_between_the_fits(run_dir):
    import io

    from rich.console import Console

    from freezeframe.render.terminal import run_renderable

    model = build(BodyHead)
    opt = torch.optim.SGD(_groups(model), lr=0.01, momentum=0.9)
    loop = Loop(model)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        model.freeze_body()
        loop.stage(rec, opt, 0, "head", epochs=[2])
        model.unfreeze()
        loop.stage(rec, opt, 2, "all")
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(run_renderable(freezeframe.load(run_dir).summary()))
    text = out.getvalue()
    assert "Stage 0 starts with 8 tensors frozen, 5 trainable" in text
    assert ("Before stage 1 (after stage 0): 8 tensors unfrozen; 8 tensors became trainable, 0 frozen; values kept "
            "bitwise; optimizer same; lr pg0 0.01→0.01, pg1 0.02→0.02, pg2 0.03→0.03") in text


def _plain_epochs(rec, model, opt, epochs, n0=0, *, unfreeze_at=None, fail_at=None):
    """A plain loop announcing epochs; the body is unfrozen before applied step `unfreeze_at`
    (a new stage inside an epoch) and the loop raises before step `fail_at`. Returns the steps
    each epoch applied, as the loop counted them."""
    applied, n = [], n0
    for count in epochs:
        rec.epoch()
        applied.append(0)
        for _ in range(count):
            if n == unfreeze_at:
                model.unfreeze()
            if n == fail_at:
                raise KeyboardInterrupt
            x, y = batch(model, n)
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
            applied[-1] += 1
            n += 1
    return applied


def test_a_stage_split_inside_an_epoch_claims_no_whole_epoch_of_batches(run_dir):
    model = build(BodyHead)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.freeze_body()
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        applied = _plain_epochs(rec, model, opt, [4, 4], unfreeze_at=2)  # unfrozen after 2 of epoch 0's 4 batches
    assert applied == [4, 4]
    s = freezeframe.load(run_dir).summary()
    a, b = s["stages"]
    assert (a["epoch_starts"], b["epoch_starts"]) == ([0], [2, 4])
    assert (a["first_epoch_continued"], a["last_epoch_partial"]) == (False, True)
    assert (b["first_epoch_continued"], b["last_epoch_partial"]) == (True, False)
    a1 = s["answers"][0]["answer"]
    assert "Stage 0 ran 2 optimizer steps in 1 epoch, which goes on in the next stage:" in a1, a1
    assert ("Stage 1 ran 6 optimizer steps in 2 epochs (the first began in the stage before):"
            in a1), a1
    assert "pass over" not in a1  # neither part holds every batch of its first or last epoch


def test_a_run_stopped_inside_an_epoch_claims_no_whole_epoch_of_batches(run_dir):
    model = build(BodyHead)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        with freezeframe.watch(model, opt, run_dir, every=1) as rec:
            _plain_epochs(rec, model, opt, [4], fail_at=3)  # interrupted after 3 of the epoch's 4 batches
    except KeyboardInterrupt:
        pass
    s = freezeframe.load(run_dir).summary()
    (st,) = s["stages"]
    assert s["run"]["complete"] is False and st["steps"] == 3
    assert (st["first_epoch_continued"], st["last_epoch_partial"]) == (False, None)
    a1 = s["answers"][0]["answer"]
    assert "ran 3 optimizer steps in 1 epoch (the run did not finish: the last may be cut short):" in a1, a1
    assert "pass over" not in a1


def test_a_new_optimizer_object_at_the_same_index_is_a_new_optimizer(run_dir):
    """Each session is given its optimizers anew: the same object (watching again) is the same
    optimizer, another object (a new fit's optimizer) is new, whatever its index."""
    model = build(BodyHead)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loop = Loop(model)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        loop.stage(rec, opt, 2, "first")
    with freezeframe.watch(model, opt, run_dir, every=1, mode="append") as rec:
        loop.stage(rec, opt, 2, "same object")
    fresh = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with freezeframe.watch(model, fresh, run_dir, every=1, mode="append") as rec:
        st = loop.stage(rec, fresh, 2, "new object")
    assert st["state_start"] == 0 and loop.stages[1]["state_start"] > 0  # the loop's own optimizers
    t = freezeframe.load(run_dir).summary()["transitions"]
    assert [(x["stage"], x["optimizer"], x["optimizer_state_reset"]) for x in t] == [(1, "same", False),
                                                                                    (2, "new", True)]


def test_fastais_reset_opt_is_a_new_optimizer_and_freeze_to_keeps_it(tmp_path):
    import pytest

    pytest.importorskip("fastai")
    from fastai.vision.all import resnet18

    import fastai_helpers as fh

    run_dir = tmp_path / "run"
    with fh.one_thread():
        learn = fh.resnet_learner(tmp_path, arch=resnet18, n_train=8, bs=4, cbs=[fh.watching(run_dir)])
        try:
            opts = []
            learn.fit(1, 1e-3)
            opts.append(learn.opt)
            learn.fit(1, 1e-3, reset_opt=True)  # fastai builds another Optimizer
            opts.append(learn.opt)
            learn.freeze_to(1)  # the same Optimizer, other frozen groups
            learn.fit(1, 1e-3)
            opts.append(learn.opt)
        finally:
            fh.collect()
    assert opts[0] is not opts[1] and opts[1] is opts[2]
    t = freezeframe.load(run_dir).summary()["transitions"]
    assert [(x["stage"], x["event"], x["optimizer"]) for x in t] == [(1, "no change to what trains", "new"),
                                                                     (2, "freeze_to(1)", "same")]


def test_tensors_the_model_gained_or_lost_are_a_change_of_what_trains(run_dir):
    from torch import nn

    class Grows(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.extra = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            y = self.a(x) + (self.extra(x) if hasattr(self, "extra") else 0)
            return self.add(y) if hasattr(self, "add") else y

    torch.manual_seed(0)
    model = Grows()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = []
    with freezeframe.watch(model, opt, run_dir, every=1):
        for part in range(2):
            names.append({n for n, _ in model.named_parameters()})
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(4, 3)).sum().backward()
                opt.step()
            if part == 0:
                del model.extra  # the model loses a layer and gains another, which trains
                model.add = nn.Linear(2, 2)
                opt.param_groups[0]["params"] = list(model.parameters())
    gained, lost = sorted(names[1] - names[0]), sorted(names[0] - names[1])
    assert (gained, lost) == (["add.bias", "add.weight"], ["extra.bias", "extra.weight"])
    (t,) = freezeframe.load(run_dir).summary()["transitions"]
    assert t["event"] == "2 tensors added, 2 removed"


def test_the_terminal_line_of_a_transition_with_no_record_of_what_trained(run_dir):
    """A stage recovered from an interrupted run has no record of what trained: its event is null
    and the terminal says so rather than printing a null."""
    import io

    from rich.console import Console

    from freezeframe.analyse.transitions import build_transitions
    from freezeframe.render.terminal import between_fits

    model = build(BodyHead)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loop = Loop(model)
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        loop.stage(rec, opt, 2, "a")
        loop.stage(rec, opt, 2, "b")
    summary = freezeframe.load(run_dir).summary()
    for p in summary["params"]:  # what such a stage holds: no trainable flags
        p["stages"][1]["trainable"] = None
    summary["transitions"] = build_transitions(summary["stages"], freezeframe.load(run_dir).manifest["stages"],
                                               summary["params"])
    assert summary["transitions"][0]["event"] is None
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(between_fits(summary))
    assert "Before stage 1 (after stage 0): what trains is not known;" in out.getvalue()
    assert "None" not in out.getvalue()


def test_a_stem_norm_layer_standing_alone_counts_among_those_beside_frozen_weights(tmp_path):
    """torchvision's layout puts the stem's bn1 at the top level, its own block: it sits beside
    frozen weights when the body's convolutions are frozen, as the norm layers in the blocks do."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = Net()
    for name, p in model.named_parameters():
        p.requires_grad_(not (name.startswith("conv1") or name.startswith("layer1.0")))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with freezeframe.watch(model, opt, tmp_path / "run", every=1, mode="new") as rec:
        with rec.stage("head"):
            for _ in range(2):
                opt.zero_grad()
                nn.functional.cross_entropy(model(torch.randn(4, 1, 6, 6)), torch.tensor([0, 1, 0, 1])).backward()
                opt.step()
    answer = freezeframe.load(tmp_path / "run").summary()["answers"][0]["answer"]
    # both norm layers (bn1 and layer1.1) moved, trained, and sit beside frozen convolutions
    assert "(2 sit in blocks whose convolution and linear layers were frozen)" in answer, answer
