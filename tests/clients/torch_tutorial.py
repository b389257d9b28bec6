"""PyTorch's transfer-learning tutorial ("Transfer Learning for Computer Vision Tutorial"),
re-expressed as its docs show it: `train_model` with train/val phases, StepLR, the best epoch's
weights kept with `copy.deepcopy(model.state_dict())` and restored with `load_state_dict` after
the last step. Two variants: fine-tuning the whole ResNet-18 ("finetuning the ConvNet") and
"ConvNet as fixed feature extractor" (every base tensor frozen, the optimizer over `fc` only).

Differences from the tutorial, all forced by this machine: `weights=None` (no hub), 32x32 synthetic
images, a handful of batches, and the state dicts kept in memory so tests can compare every fact
freezeframe states with the program's own state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn, optim
from torch.optim import lr_scheduler


@dataclass
class TutorialRun:
    model: nn.Module
    optimizer: optim.Optimizer
    start: dict                       # state_dict as watching began
    after_last_step: dict             # state_dict right after the last optimizer step
    final: dict                       # state_dict as train_model returns (the best epoch's)
    best_epoch: int
    epoch_state: list = field(default_factory=list)  # state_dict at the end of each epoch
    steps: int = 0


def _data(seed: int, batches: int, batch_size: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 2, (batch_size,), generator=g))
            for _ in range(batches)]


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_model(model, criterion, optimizer, scheduler, dataloaders, num_epochs, record: TutorialRun):
    """The tutorial's train_model, with the states a test needs noted on the side."""
    best_model_wts = copy.deepcopy(model.state_dict())
    best_acc = -1.0
    for epoch in range(num_epochs):
        for phase in ["train", "val"]:
            if phase == "train":
                model.train()
            else:
                model.eval()
            running_corrects = 0
            seen = 0
            for inputs, labels in dataloaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                        record.steps += 1
                running_corrects += int(torch.sum(preds == labels.data))
                seen += inputs.size(0)
            if phase == "train":
                scheduler.step()
            epoch_acc = running_corrects / seen
            # deep copy the model
            if phase == "val" and epoch_acc > best_acc:
                best_acc = epoch_acc
                best_model_wts = copy.deepcopy(model.state_dict())
                record.best_epoch = epoch
        record.epoch_state.append(_state(model))
    record.after_last_step = _state(model)
    # load best model weights
    model.load_state_dict(best_model_wts)
    return model


def _tied_val(seed: int, batches: int, batch_size: int = 2):
    """Validation batches on which every model scores exactly 50 %: each image twice, once per
    class. Every epoch then ties, the tutorial's `epoch_acc > best_acc` keeps epoch 0, and the
    final `load_state_dict` restores epoch 0's weights (deterministic on random data)."""
    out = []
    for x, _ in _data(seed, batches, batch_size):
        out.append((torch.cat([x, x]), torch.cat([torch.zeros(len(x), dtype=torch.long),
                                                   torch.ones(len(x), dtype=torch.long)])))
    return out


def run_tutorial(watch, *, variant: str = "feature_extractor", num_epochs: int = 3, train_batches: int = 3,
                 val_batches: int = 2, seed: int = 0) -> TutorialRun:
    """Run the tutorial under `watch(model, optimizer)` (a context manager factory, e.g.
    `lambda m, o: freezeframe.watch(m, o, run_dir, every=1)`).

    The validation set makes every epoch tie (see `_tied_val`), so the weights restored after
    the last step are epoch 0's: `final` differs from `after_last_step` whenever num_epochs > 1."""
    torch.manual_seed(seed)
    if variant == "feature_extractor":
        model_conv = torchvision.models.resnet18(weights=None)
        for param in model_conv.parameters():
            param.requires_grad = False
        num_ftrs = model_conv.fc.in_features
        model_conv.fc = nn.Linear(num_ftrs, 2)  # parameters of newly constructed modules have requires_grad=True
        model = model_conv
        optimizer = optim.SGD(model_conv.fc.parameters(), lr=0.001, momentum=0.9)
    elif variant == "finetune":
        model_ft = torchvision.models.resnet18(weights=None)
        num_ftrs = model_ft.fc.in_features
        model_ft.fc = nn.Linear(num_ftrs, 2)
        model = model_ft
        optimizer = optim.SGD(model_ft.parameters(), lr=0.001, momentum=0.9)
    else:
        raise ValueError(variant)
    criterion = nn.CrossEntropyLoss()
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    dataloaders = {"train": _data(seed, train_batches), "val": _tied_val(seed + 1, val_batches)}
    record = TutorialRun(model=model, optimizer=optimizer, start=_state(model), after_last_step={}, final={},
                         best_epoch=-1)
    with watch(model, optimizer):
        train_model(model, criterion, optimizer, scheduler, dataloaders, num_epochs, record)
    record.final = _state(model)
    return record
