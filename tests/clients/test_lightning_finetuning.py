"""Lightning's fine-tuning example ("computer_vision_fine_tuning.py": `MilestonesFinetuning`, a
`BaseFinetuning` callback unfreezing the feature extractor at milestone epochs with
`unfreeze_and_add_param_group`, and `TransferLearningModel`), re-expressed as the example writes
it, under the freezeframe callback. One `trainer.fit` becomes three stages ("fit", "fit (part 2)",
"fit (part 3)"), one per unfreeze; each stage's facts must be what that stage ran, as the
LightningModule counts them itself (its training_step calls and on_train_epoch_start).

Differences from the example, all forced by this machine: ResNet-18 with `weights=None` (no hub),
random 32x32 images, two batches per epoch, milestones (1, 2) over 3 epochs, no LightningCLI.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("lightning")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks.finetuning import BaseFinetuning  # noqa: E402
from lightning.pytorch.utilities.model_helpers import get_torchvision_model  # noqa: E402
from torch import nn, optim  # noqa: E402
from torch.optim.lr_scheduler import MultiStepLR  # noqa: E402
from torch.optim.optimizer import Optimizer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchmetrics import Accuracy  # noqa: E402

import freezeframe  # noqa: E402
from freezeframe.lightning import FreezeFrame  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|LeafSpec|experimental|The number of training batches).*")

BATCHES, BS, MILESTONES, EPOCHS = 2, 4, (1, 2), 3


# ------------------------------------------------------------------ the example's callback and module
class MilestonesFinetuning(BaseFinetuning):
    def __init__(self, milestones: tuple = (5, 10), train_bn: bool = False):
        super().__init__()
        self.milestones = milestones
        self.train_bn = train_bn

    def freeze_before_training(self, pl_module: LightningModule):
        self.freeze(modules=pl_module.feature_extractor, train_bn=self.train_bn)

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Optimizer):
        if epoch == self.milestones[0]:
            # unfreeze 5 last layers
            self.unfreeze_and_add_param_group(
                modules=pl_module.feature_extractor[-5:], optimizer=optimizer, train_bn=self.train_bn
            )

        elif epoch == self.milestones[1]:
            # unfreeze remaining layers
            self.unfreeze_and_add_param_group(
                modules=pl_module.feature_extractor[:-5], optimizer=optimizer, train_bn=self.train_bn
            )


class TransferLearningModel(LightningModule):
    def __init__(self, backbone: str = "resnet18", train_bn: bool = False, milestones: tuple = MILESTONES,
                 lr: float = 1e-3, lr_scheduler_gamma: float = 1e-1):
        super().__init__()
        self.backbone = backbone
        self.train_bn = train_bn
        self.milestones = milestones
        self.lr = lr
        self.lr_scheduler_gamma = lr_scheduler_gamma
        self.__build_model()
        self.train_acc = Accuracy(task="binary")
        self.valid_acc = Accuracy(task="binary")
        # the ground truth the test compares with, kept by the module itself
        self.steps_in_epoch: dict[int, int] = {}     # epoch -> training_step calls
        self.epochs_started: list[int] = []          # on_train_epoch_start, in order
        self.forwards_in_epoch: dict[int, int] = {}  # epoch -> training forward passes

    def __build_model(self):
        # 1. Load the network (the example: pre-trained weights; here none: no hub)
        backbone = get_torchvision_model(self.backbone, weights=None)
        _layers = list(backbone.children())[:-1]
        self.feature_extractor = nn.Sequential(*_layers)
        # 2. Classifier:
        _fc_layers = [nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 32), nn.Linear(32, 1)]
        self.fc = nn.Sequential(*_fc_layers)
        # 3. Loss:
        self.loss_func = F.binary_cross_entropy_with_logits

    def forward(self, x):
        if self.training:
            self.forwards_in_epoch[self.current_epoch] = self.forwards_in_epoch.get(self.current_epoch, 0) + 1
        x = self.feature_extractor(x)
        x = x.squeeze(-1).squeeze(-1)
        return self.fc(x)

    def loss(self, logits, labels):
        return self.loss_func(input=logits, target=labels)

    def on_train_epoch_start(self):
        self.epochs_started.append(self.current_epoch)

    def training_step(self, batch, batch_idx):
        self.steps_in_epoch[self.current_epoch] = self.steps_in_epoch.get(self.current_epoch, 0) + 1
        x, y = batch
        y_logits = self.forward(x)
        y_scores = torch.sigmoid(y_logits)
        y_true = y.view((-1, 1)).type_as(x)
        train_loss = self.loss(y_logits, y_true)
        self.log("train_acc", self.train_acc(y_scores, y_true.int()), prog_bar=True)
        return train_loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        y_logits = self.forward(x)
        y_scores = torch.sigmoid(y_logits)
        y_true = y.view((-1, 1)).type_as(x)
        self.log("val_loss", self.loss(y_logits, y_true), prog_bar=True)
        self.log("val_acc", self.valid_acc(y_scores, y_true.int()), prog_bar=True)

    def configure_optimizers(self):
        parameters = list(self.parameters())
        trainable_parameters = list(filter(lambda p: p.requires_grad, parameters))
        optimizer = optim.Adam(trainable_parameters, lr=self.lr)
        scheduler = MultiStepLR(optimizer, milestones=self.milestones, gamma=self.lr_scheduler_gamma)
        return [optimizer], [scheduler]


def _loader(seed: int, batches: int, shuffle: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * BS, 3, 32, 32, generator=g)
    y = torch.randint(0, 2, (batches * BS,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BS, shuffle=shuffle, num_workers=0)


class _Truth(Callback):
    """The oracle: the module's state and the optimizer's tensors at each epoch's start (after the
    example's finetuning callback, listed before it, has unfrozen what it unfreezes), and at the end."""

    def __init__(self):
        self.states, self.held = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.states.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
        ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.held.append({n for n, p in pl_module.named_parameters() if id(p) in ids})

    def on_fit_end(self, trainer, pl_module):
        self.states.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 cores are shared with other test processes
    try:
        run_dir = tmp_path_factory.mktemp("lightning_finetuning") / "run"
        model = TransferLearningModel()
        truth = _Truth()
        trainer = Trainer(max_epochs=EPOCHS, enable_model_summary=False, num_sanity_val_steps=0,
                          enable_progress_bar=False, logger=False, enable_checkpointing=False,
                          accelerator="cpu", callbacks=[MilestonesFinetuning(milestones=MILESTONES), truth,
                                                        FreezeFrame(run_dir, every=1)])
        trainer.fit(model, _loader(0, BATCHES, True), _loader(1, 1, False))
        model.truth = truth
        return model, trainer, freezeframe.load(run_dir)
    finally:
        torch.set_num_threads(threads)


def test_one_fit_is_three_stages_one_per_unfreeze(finetuned):
    model, trainer, run = finetuned
    assert model.epochs_started == [0, 1, 2] and trainer.current_epoch == EPOCHS
    assert [s["name"] for s in run.manifest["stages"]] == ["fit", "fit (part 2)", "fit (part 3)"]
    # the truth: Lightning added one param group at each milestone
    assert len(trainer.optimizers[0].param_groups) == 3


def test_every_stage_states_the_epochs_and_steps_it_ran(finetuned):
    model, trainer, run = finetuned
    stages = run.manifest["stages"]
    first = 0
    for epoch, st in enumerate(stages):  # one epoch per stage: milestones (1, 2)
        steps = model.steps_in_epoch[epoch]
        assert steps == BATCHES
        assert (st["first_step"], st["steps"], st["last_step"]) == (first, steps, first + steps - 1), st["name"]
        assert st["epochs"] == 1, st["name"]
        assert st["epoch_starts"] == [first], st["name"]
        assert st["epochs_planned"] == EPOCHS, st["name"]  # what the fit planned, kept apart
        first += steps
    assert sum(st["steps"] for st in stages) == trainer.global_step


def test_every_stage_states_the_forward_passes_it_ran(finetuned):
    model, _, run = finetuned
    assert [st["forward_passes"]["train"] for st in run.manifest["stages"]] == \
        [model.forwards_in_epoch[e] for e in range(EPOCHS)]


def test_the_summary_states_each_stages_own_epochs(finetuned):
    _, _, run = finetuned
    assert [(s["name"], s["epochs"]) for s in run.summary()["stages"]] == \
        [("fit", 1), ("fit (part 2)", 1), ("fit (part 3)", 1)]


def test_the_answers_count_the_tensors_an_optimizer_updated(finetuned):
    """train_bn=False: unfreeze_and_add_param_group makes the BatchNorm tensors require grad but
    leaves them out of the param group it adds; "updated" counts the tensors an optimizer held
    whose bytes changed, as the module's own states say, never every tensor that requires grad."""
    import re

    model, _, run = finetuned
    truth = model.truth
    s = run.summary()
    said = re.findall(r"Stage (\d+) \(.*?\) ran .*?The steps updated (\d+) of (\d+) tensors", s["answers"][0]["answer"])
    assert len(said) == EPOCHS, s["answers"][0]["answer"]
    for k, (stage, updated, total) in enumerate(said):
        before, after = truth.states[k], truth.states[k + 1]
        want = sum(1 for n in truth.held[k] if not torch.equal(before[n], after[n]))
        requires_grad = sum(1 for p in s["params"] if p["stages"][k]["trainable"])
        assert (int(stage), int(updated), int(total)) == (k, want, len(before))
        assert want < requires_grad or k == 0  # BN tensors require grad but no optimizer holds them
