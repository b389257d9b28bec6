"""The Lightning callback on a real `Trainer`: every stage checked against ground truth the
LightningModule takes itself at each applied step (the lr and momentum of every group, W before
and after, the gradients, the buffers, the loss) and the test takes around each fit (state
dicts, requires_grad, param-group membership)."""

from __future__ import annotations

import json
import logging
import warnings

import pytest

pytest.importorskip("lightning")

import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402

import freezeframe  # noqa: E402
import oracle  # noqa: E402
from freezeframe.lightning import FreezeFrame  # noqa: E402

N_TRAIN, N_VALID, BS = 24, 16, 8
TRAIN_BATCHES, VALID_BATCHES = N_TRAIN // BS, N_VALID // BS


# Lightning's advice for real runs (workers, a validation loop, checkpoint callbacks) is noise here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|LeafSpec|no `val_dataloader`|callbacks used to create the checkpoint).*")


@pytest.fixture(scope="module", autouse=True)
def _quiet_and_one_thread():
    """One intra-op thread: other test processes share the 2 cores (two threads oversubscribe them)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ====================================================================================== the module
class Net(LightningModule):
    """A conv body (`backbone`: conv-BN-ReLU-conv-ReLU-pool) and a linear head, on (N, 1, 6, 6).

    At every applied step it keeps the ground truth: the lr / momentum of every group and the
    tensors the optimizer holds (on_before_optimizer_step: after backward, before the update),
    W_after and the buffers (on_train_batch_end), the loss; and it counts its own forward calls.
    `direct=True`: training_step calls the submodules, never `self(...)` (common in Lightning)."""

    def __init__(self, *, lr: float = 0.05, max_lr: float | None = None, head_only: bool = False,
                 direct: bool = False, fail_at: int | None = None):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(5, 3)
        self.lr, self.max_lr, self.head_only, self.direct, self.fail_at = lr, max_lr, head_only, direct, fail_at
        self.truth: list[dict] = []
        self.train_forwards = 0     # calls of forward() in training mode
        self.train_passes = 0       # times training_step ran the data through the network
        self.epoch_start: dict[int, dict] = {}

    def forward(self, x):
        if self.training:
            self.train_forwards += 1
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at:
            raise RuntimeError("the user's training_step failed")
        x, y = batch
        logits = self.head(self.backbone(x)) if self.direct else self(x)
        self.train_passes += 1
        loss = F.cross_entropy(logits, y)
        self._loss = float(loss.detach())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        params = self.head.parameters() if self.head_only else self.parameters()
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=1e-4)
        if self.max_lr is None:
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.max_lr,
                                                    total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- ground truth -------------------------------------------------------------------------
    def on_train_epoch_start(self):
        # after every callback's on_train_epoch_start (BackboneFinetuning unfreezes there)
        opt = self.trainer.optimizers[0]
        self.epoch_start[self.current_epoch] = {
            "state": oracle.state(self),
            "requires_grad": {n: p.requires_grad for n, p in self.named_parameters()},
            "groups": group_of(self, opt),
        }

    def on_before_optimizer_step(self, optimizer):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.truth.append({
            "lr": [float(g["lr"]) for g in optimizer.param_groups],
            "momentum": [float(g["momentum"]) for g in optimizer.param_groups],
            "rows": [n for n, p in self.named_parameters() if id(p) in held and (p.requires_grad or p.grad is not None)],
            "before": {n: p.detach().clone() for n, p in self.named_parameters()},
            "grad": {n: None if p.grad is None else p.grad.detach().clone() for n, p in self.named_parameters()},
        })

    def on_train_batch_end(self, outputs, batch, batch_idx):
        rec = self.truth[-1]
        rec["after"] = {n: p.detach().clone() for n, p in self.named_parameters()}
        rec["buffers"] = {n: b.detach().clone() for n, b in self.named_buffers() if b.is_floating_point()}
        rec["loss"] = self._loss


def group_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter name -> index of the param group holding it."""
    where = {id(p): g for g, group in enumerate(opt.param_groups) for p in group["params"]}
    return {n: where[id(p)] for n, p in model.named_parameters() if id(p) in where}


def loaders(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(N_TRAIN + N_VALID, 1, 6, 6, generator=g), torch.randint(0, 3, (N_TRAIN + N_VALID,), generator=g)
    ds = torch.utils.data.TensorDataset
    train = torch.utils.data.DataLoader(ds(x[:N_TRAIN], y[:N_TRAIN]), batch_size=BS)
    valid = torch.utils.data.DataLoader(ds(x[N_TRAIN:], y[N_TRAIN:]), batch_size=BS)
    return train, valid


def trainer(max_epochs: int, callbacks: list, **kw) -> Trainer:
    kw.setdefault("enable_checkpointing", False)
    return Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=callbacks, **kw)


# ====================================================================================== checks
def summary(run_dir) -> dict:
    doc = oracle.strict_json(json.dumps(freezeframe.load(run_dir).summary(), allow_nan=False))
    oracle.check_summary_schema(doc)
    return doc


def stored_steps(run_dir) -> dict:
    return pq.read_table(run_dir / "steps").sort_by("step").to_pydict()


def stored_losses(run_dir) -> dict[int, float]:
    t = pq.read_table(run_dir / "scalars").to_pydict()
    return {s: v for s, n, v in zip(t["step"], t["name"], t["value"]) if n == "loss"}


def check_stage(doc: dict, k: int, start: dict, end: dict, requires_grad: dict, groups: dict[str, int],
                truth: list[dict], group_offset: int = 0) -> None:
    """Every per-tensor fact of stage k against the truth: trainable = requires_grad, in_optimizer
    and group = the optimizer's membership, changed = bytes differ between start and end,
    grad_steps = the applied steps in which the tensor had a fresh gradient (Lightning zeroes
    gradients to None before each backward)."""
    changed = oracle.differing(start, end)
    bad = []
    for p in doc["params"]:
        n, e = p["name"], p["stages"][k]
        want = {"trainable": requires_grad[n], "in_optimizer": n in groups,
                "group": groups[n] + group_offset if n in groups else None, "changed": n in changed,
                "grad_steps": sum(rec["grad"][n] is not None for rec in truth)}
        got = {key: e[key] for key in want}
        if got != want:
            bad.append(f"{n}: stored {got}, truth {want}")
        if not requires_grad[n] and n in changed:
            bad.append(f"{n}: the ground truth itself says a frozen tensor changed")
    for b in doc["buffers"]:
        if b["stages"][k]["changed"] != (b["name"] in changed):
            bad.append(f"buffer {b['name']}: stored changed={b['stages'][k]['changed']}, truth {b['name'] in changed}")
    assert not bad, "\n".join(bad)


def check_steps(run_dir, truth: list[dict], first: int) -> None:
    """The lr and momentum of every group at every step, and the loss, as Lightning applied them."""
    steps = stored_steps(run_dir)
    rows = [i for i, s in enumerate(steps["step"]) if first <= s < first + len(truth)]
    assert [steps["step"][i] for i in rows] == list(range(first, first + len(truth)))
    assert [steps["lr"][i] for i in rows] == [rec["lr"] for rec in truth]
    assert [steps["momentum"][i] for i in rows] == [rec["momentum"] for rec in truth]
    losses = stored_losses(run_dir)
    for k, rec in enumerate(truth):
        assert oracle.isclose(losses.get(first + k), rec["loss"], rel=1e-6), (first + k, losses.get(first + k), rec["loss"])


def check_metrics(run_dir, truth: list[dict], first: int, model: nn.Module, ref: dict) -> None:
    """every=1: each step's stored norms (gradient, update, weight, drift) against the slow
    re-computation from the tensors the module copied around that step."""
    tape = oracle.Tape(model, first_step=first, ref=ref)
    tape.steps = [dict(rec, step=first + k) for k, rec in enumerate(truth)]
    t = freezeframe.load(run_dir).tensors()
    mask = pc.and_(pc.greater_equal(t.column("step"), first), pc.less(t.column("step"), first + len(truth)))
    bad = oracle.compare_with_tape(t.filter(mask), tape)
    assert not bad, "\n".join(bad[:20])


# ====================================================================================== tests
def test_fit_frozen_then_fit_unfrozen_on_a_new_trainer(tmp_path):
    run_dir = tmp_path / "run"
    train, valid = loaders()
    model = Net(lr=0.05, max_lr=0.1)
    ff = FreezeFrame(run_dir, every=1)

    trainer(1, [ff]).validate(model, valid)  # validate outside a fit records nothing
    assert not run_dir.exists()

    for p in model.backbone.parameters():
        p.requires_grad_(False)
    ref = oracle.state(model)
    s0, rg0 = oracle.state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    t1 = trainer(2, [ff])
    t1.fit(model, train, valid)
    e0, truth0, groups0 = oracle.state(model), model.truth, group_of(model, t1.optimizers[0])
    fwd0 = model.train_forwards

    for p in model.parameters():
        p.requires_grad_(True)
    model.truth, model.max_lr, model.train_forwards = [], 0.02, 0
    s1, rg1 = oracle.state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    t2 = trainer(1, [ff])
    t2.fit(model, train, valid)
    e1, truth1, groups1 = oracle.state(model), model.truth, group_of(model, t2.optimizers[0])

    manifest_before = (run_dir / "manifest.json").read_bytes()
    t2.validate(model, valid)  # neither makes a stage, a session, or a forward pass count
    t2.predict(model, valid)
    assert (run_dir / "manifest.json").read_bytes() == manifest_before

    doc = summary(run_dir)
    run, (st0, st1) = doc["run"], doc["stages"]
    assert run["framework"] == "lightning" and run["complete"] and len(run["sessions"]) == 2
    assert all(s["versions"].get("lightning") for s in run["sessions"])
    assert [(s["name"], s["kind"], s["first_step"], s["steps"], s["epochs"], s["complete"]) for s in doc["stages"]] == \
        [("fit", "train", 0, 2 * TRAIN_BATCHES, 2, True), ("fit", "train", 2 * TRAIN_BATCHES, TRAIN_BATCHES, 1, True)]
    assert len(truth0) == 2 * TRAIN_BATCHES and len(truth1) == TRAIN_BATCHES
    assert run["steps"] == len(truth0) + len(truth1)
    # forward passes of the LightningModule: one per training batch, validation after each epoch
    # (the sanity check runs before the first step: no stage; validate/predict afterwards: not counted)
    assert st0["forward_passes"] == {"train": fwd0, "eval": 2 * VALID_BATCHES} and fwd0 == len(truth0)
    assert st1["forward_passes"] == {"train": model.train_forwards, "eval": VALID_BATCHES}

    # stage 0: the body frozen (its tensors bitwise unchanged), the head trained
    check_stage(doc, 0, s0, e0, rg0, groups0, truth0)
    frozen = [n for n, v in rg0.items() if not v]
    assert frozen and all(not p["stages"][0]["changed"] for p in doc["params"] if p["name"] in frozen)
    assert all(oracle.same_bytes(s0[n], e0[n]) for n in frozen)
    assert not [f for f in doc["findings"] if f["code"] == "frozen-param-changed"]
    # stage 1 starts exactly where stage 0 ended (another Trainer, another session: decided by hashes)
    assert not oracle.differing(e0, s1)
    assert (st1["starts_from_previous_end"], st1["continuity"], st1["changed_since_previous_end"]) == (True, "bitwise", [])
    check_stage(doc, 1, s1, e1, rg1, groups1, truth1)
    assert all(p["stages"][1]["trainable"] for p in doc["params"])

    # the lr every step applied (OneCycleLR per step), the momentum it cycles, the loss
    check_steps(run_dir, truth0, 0)
    check_steps(run_dir, truth1, len(truth0))
    assert st0["groups"][0]["lr_max"] == 0.1 and st1["groups"][0]["lr_max"] == 0.02  # OneCycleLR's max_lr
    assert st0["groups"][0]["lr_applied_max"] == max(r["lr"][0] for r in truth0)
    # every=1: every step's norms against the slow re-computation
    check_metrics(run_dir, truth0, 0, model, ref)
    check_metrics(run_dir, truth1, len(truth0), model, ref)
    # drift at each stage's end, exactly from the end state
    for k, end in ((0, e0), (1, e1)):
        for p in doc["params"]:
            assert oracle.isclose(p["stages"][k]["drift_abs"], oracle.dist(end[p["name"]], ref[p["name"]])), p["name"]


@pytest.mark.parametrize("direct", [False, True], ids=["self_forward", "submodules_only"])
def test_backbone_finetuning_unfreezing_inside_a_fit_starts_part_2(tmp_path, direct):
    """Lightning's BackboneFinetuning(unfreeze_backbone_at_epoch=1): the head alone in epoch 0,
    then the backbone unfrozen and added to the optimizer as a new param group. `direct`:
    training_step never calls the module itself, so no forward hook of the root module fires."""
    run_dir = tmp_path / "run"
    train, valid = loaders()
    model = Net(lr=0.1, head_only=True, direct=direct)
    ref = oracle.state(model)
    t = trainer(3, [BackboneFinetuning(unfreeze_backbone_at_epoch=1), FreezeFrame(run_dir, every=1)])
    t.fit(model, train, valid)
    end = oracle.state(model)

    doc = summary(run_dir)
    st0, st1 = doc["stages"]
    assert [(s["name"], s["first_step"], s["steps"], s["complete"]) for s in doc["stages"]] == \
        [("fit", 0, TRAIN_BATCHES, True), ("fit (part 2)", TRAIN_BATCHES, 2 * TRAIN_BATCHES, True)]
    mid = model.epoch_start[1]
    assert mid["groups"] != model.epoch_start[0]["groups"]  # the truth: Lightning added a param group
    # each part states the epochs it ran (the module saw epochs 0, 1, 2 start); the fit's plan apart
    assert sorted(model.epoch_start) == [0, 1, 2]
    assert [(s["epochs"], s["epochs_planned"], s["epoch_starts"]) for s in freezeframe.load(run_dir).manifest["stages"]] \
        == [(1, 3, [0]), (2, 3, [TRAIN_BATCHES, 2 * TRAIN_BATCHES])]
    assert [s["epochs"] for s in doc["stages"]] == [1, 2]
    truth0, truth1 = model.truth[:TRAIN_BATCHES], model.truth[TRAIN_BATCHES:]

    # part 1: the backbone's conv tensors frozen and bitwise unchanged; its BatchNorm trainable
    # (train_bn=True) but in no optimizer; the head in pg0
    check_stage(doc, 0, ref, mid["state"], model.epoch_start[0]["requires_grad"], model.epoch_start[0]["groups"],
                truth0)
    by_name = {p["name"]: p for p in doc["params"]}
    for n in ("backbone.0.weight", "backbone.0.bias", "backbone.3.weight", "backbone.3.bias"):
        e = by_name[n]["stages"][0]
        assert (e["trainable"], e["changed"], e["grad_steps"], e["group"]) == (False, False, 0, None), n
    assert [(g["name"], g["tensors"]) for g in st0["groups"]] == [("pg0", 2)]

    # part 2 starts where part 1 ended; the whole backbone trains in the group Lightning added
    assert st1["starts_from_previous_end"] is True and st1["changed_since_previous_end"] == []
    check_stage(doc, 1, mid["state"], end, mid["requires_grad"], mid["groups"], truth1)
    assert [(g["name"], g["tensors"]) for g in st1["groups"]] == [("pg0", 2), ("pg1", 6)]
    assert all(by_name[n]["stages"][1]["group"] == 1 for n in by_name if n.startswith("backbone."))
    assert by_name["backbone.0.weight"]["stages"][1]["changed"] is True
    assert st1["groups"][1]["lr_first"] == truth1[0]["lr"][1] == pytest.approx(0.1 * 0.1)
    assert not [f for f in doc["findings"] if f["code"] in ("trainable-never-gets-grad", "frozen-param-changed")]
    # every training pass is counted, also when training_step bypasses the module's own hooks
    # (then on its children: docs/recording.md, "Forward passes")
    assert st0["forward_passes"]["train"] + st1["forward_passes"]["train"] == model.train_passes == 3 * TRAIN_BATCHES
    assert model.train_forwards == (0 if direct else 3 * TRAIN_BATCHES)

    check_steps(run_dir, model.truth, 0)
    check_metrics(run_dir, model.truth, 0, model, ref)


def test_resuming_from_a_checkpoint_continues_the_same_run(tmp_path):
    """fit 2 epochs saving a checkpoint per epoch; resume from the last one (continuous), then
    from epoch 0's (the second epoch's training is discarded: the run says so, tensor by tensor)."""
    run_dir, ckpts = tmp_path / "run", tmp_path / "ckpt"
    train, _ = loaders()
    model = Net(lr=0.05)
    ckpt = ModelCheckpoint(dirpath=ckpts, filename="{epoch}", save_top_k=-1, save_last=True)
    trainer(2, [FreezeFrame(run_dir), ckpt], enable_checkpointing=True).fit(model, train)
    end0 = oracle.state(model)

    starts = []
    for path, max_epochs in ((ckpts / "last.ckpt", 3), (ckpts / "epoch=0.ckpt", 2)):
        fresh = Net(lr=0.05)  # a new process would build the model anew
        trainer(max_epochs, [FreezeFrame(run_dir)]).fit(fresh, train, ckpt_path=path)
        starts.append((fresh.epoch_start[min(fresh.epoch_start)]["state"], oracle.state(fresh)))

    doc = summary(run_dir)
    assert [(s["name"], s["first_step"], s["steps"], s["epochs"]) for s in doc["stages"]] == [
        ("fit", 0, 2 * TRAIN_BATCHES, 2), ("fit", 2 * TRAIN_BATCHES, TRAIN_BATCHES, 1),
        ("fit", 3 * TRAIN_BATCHES, TRAIN_BATCHES, 1)]
    st1, st2 = doc["stages"][1], doc["stages"][2]
    assert st1["meta"]["resumed_from"].endswith("last.ckpt") and st2["meta"]["resumed_from"].endswith("epoch=0.ckpt")
    # resumed from the end: continuous, bitwise
    assert not oracle.differing(end0, starts[0][0])
    assert (st1["starts_from_previous_end"], st1["continuity"], st1["changed_since_previous_end"]) == (True, "bitwise", [])
    # resumed from an older checkpoint: exactly the tensors whose bytes differ from the last end
    differ = oracle.differing(starts[0][1], starts[1][0])
    assert differ
    assert (st2["starts_from_previous_end"], st2["continuity"]) == (False, "bitwise")
    assert sorted(st2["changed_since_previous_end"]) == sorted(differ)
    assert [f["stage"] for f in doc["findings"] if f["code"] == "stage-discontinuity"] == [2]


def test_the_callback_also_works_with_the_pytorch_lightning_package(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x)

        def training_step(self, batch, batch_idx):
            return self(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[FreezeFrame(tmp_path / "run")]).fit(Tiny(), dl)
    doc = summary(tmp_path / "run")
    assert [(s["name"], s["steps"]) for s in doc["stages"]] == [("fit", 2)]
    assert doc["run"]["sessions"][0]["versions"]["pytorch_lightning"] == pl.__version__


def test_an_exception_in_fit_keeps_the_steps_recorded_before_it(tmp_path):
    run_dir = tmp_path / "run"
    train, _ = loaders()
    model = Net(fail_at=4)
    ff = FreezeFrame(run_dir, every=1)
    with pytest.raises(RuntimeError, match="training_step failed"):
        trainer(2, [ff]).fit(model, train)
    assert ff.recorder is None  # closed by on_exception: every hook removed
    run = freezeframe.load(run_dir)
    s = run.summary()
    assert s["run"]["complete"] is False and s["run"]["steps"] == 4 == len(model.truth)
    assert [(st["name"], st["steps"]) for st in s["stages"]] == [("fit", 4)]
    assert not (run_dir / "writer.lock").exists()


def test_an_internal_error_is_one_warning_and_training_is_unchanged(tmp_path, monkeypatch):
    """The recorder fails measuring its first recorded step: one RuntimeWarning, and the weights
    after the fit are bitwise those of the same fit without the callback."""
    import freezeframe.capture.metrics as metrics

    train, valid = loaders()
    finals = []
    for watched in (False, True):
        torch.manual_seed(0)
        model = Net(max_lr=0.1)
        callbacks = []
        if watched:
            def broken(*args, **kwargs):
                raise RuntimeError("injected")
            monkeypatch.setattr(metrics, "step_metrics", broken)
            callbacks = [FreezeFrame(tmp_path / "run")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            trainer(2, callbacks).fit(model, train, valid)
        finals.append(oracle.state(model))
    ours = [w for w in caught if "freezeframe" in str(w.message)]
    assert len(ours) == 1 and "injected" in str(ours[0].message)
    assert not oracle.differing(finals[0], finals[1])
    s = freezeframe.load(tmp_path / "run").summary()
    assert s["run"]["complete"] is False and s["run"]["steps"] == 1  # the step applied, its metrics failed
