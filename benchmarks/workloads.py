"""The trainings the overhead benchmark watches: a model, its optimizer and a fixed set of batches.

Every workload is stepped by `train_step`, the same for the plain model A and the watched model B;
instruments that need to act inside a step do it through hooks (optimizer step hooks, module and
tensor hooks) or through `Attached.after_step`, never by changing the step itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class Workload:
    """A model, its optimizer and a fixed set of batches; `pairs` interleaved A/B steps measured."""

    name: str
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    make_batches: Callable[[torch.Generator], list[tuple[torch.Tensor, torch.Tensor]]]
    pairs: int
    warmup: int = 12          # pairs before measuring (freezeframe's calibration happens here)
    plain_steps: int = 3      # unwatched steps of both models before anything is attached


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch, loss_fn) -> torch.Tensor:
    """One training step; returns the loss (a 0-d tensor, not synchronised)."""
    x, y = batch
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss


# --------------------------------------------------------------------------- models
def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


class TokenClassifier(nn.Module):
    """Token embedding + learned positions, a `nn.TransformerEncoder`, mean over the sequence, a
    linear head: a small sequence classifier."""

    def __init__(self, vocab: int = 1000, seq: int = 64, d_model: int = 128, heads: int = 4, layers: int = 2,
                 ff: int = 256, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=ff, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos[: tokens.shape[1]])
        return self.head(h.mean(dim=1))


# --------------------------------------------------------------------------- optimizers
def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


# --------------------------------------------------------------------------- data
def images(g: torch.Generator) -> list:
    return [(torch.randn(16, 3, 64, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]


def vectors(g: torch.Generator) -> list:
    return [(torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(8)]


def tokens(g: torch.Generator) -> list:
    return [(torch.randint(0, 1000, (16, 64), generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(8)]


WORKLOADS = [
    Workload("ResNet-18, 64 px, batch 16, SGD+momentum", resnet18, sgd, images, pairs=60),
    Workload("MLP 256-256-256-10, batch 64, SGD+momentum", mlp, sgd, vectors, pairs=300),
    Workload("Transformer encoder, 2 layers d=128 4 heads ff=256, seq 64, batch 16, vocab 1000, AdamW",
             TokenClassifier, adamw, tokens, pairs=150),
]
