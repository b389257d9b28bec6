"""A zoo of small real models (and their data) shared by the tests; each builds deterministically from a seed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Two conv-BatchNorm-ReLU blocks, pooling and a linear classifier. Input (N, 1, 8, 8)."""

    def __init__(self, n_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(6, n_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class BodyHead(nn.Module):
    """A pretrained-style body (two conv-BN blocks) and a head, in three layer groups
    (early body, late body, head), plus a 0-dim parameter owned by the root module.
    Input (N, 3, 6, 6)."""

    def __init__(self, n_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, n_classes))
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.head(self.body(x)) * self.temperature

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Early body, late body, head (with the root's temperature)."""
        early = list(self.body[0].parameters()) + list(self.body[1].parameters())
        late = list(self.body[3].parameters()) + list(self.body[4].parameters())
        head = list(self.head.parameters()) + [self.temperature]
        return [early, late, head]

    def freeze_body(self, *, keep_bn: bool = False) -> None:
        for m in self.body.modules():
            if isinstance(m, nn.BatchNorm2d) and keep_bn:
                continue
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)

    def unfreeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(True)


class TiedLM(nn.Module):
    """A tiny language model whose output projection shares the embedding's weight. Input (N, T) ints."""

    vocab = 11

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(self.vocab, 6)
        self.proj = nn.Linear(6, 6)
        self.out = nn.Linear(6, self.vocab)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.proj(self.emb(idx))))


class DropoutMLP(nn.Module):
    """An MLP with dropout: training consumes the global RNG. Input (N, 8)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(16, 3),
        )

    def forward(self, x):
        return self.net(x)


class Branchy(nn.Module):
    """A trunk and two heads; head_b is only used when asked (to vary which tensors get gradients)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.head_a = nn.Linear(6, 2)
        self.head_b = nn.Linear(6, 2)

    def forward(self, x, use_b: bool = True):
        h = torch.relu(self.trunk(x))
        out = self.head_a(h)
        if use_b:
            out = out + self.head_b(h)
        return out


def build(cls, seed: int = 0, **kwargs) -> nn.Module:
    """The same model for the same seed."""
    torch.manual_seed(seed)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------- data
def batch(model: nn.Module, step: int, n: int = 4, seed: int = 1234):
    """A deterministic (inputs, targets) batch for `model`, different at every step."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    if isinstance(model, SmallCNN):
        return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    if isinstance(model, BodyHead):
        return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    if isinstance(model, TiedLM):
        idx = torch.randint(0, TiedLM.vocab, (n, 5), generator=g)
        return idx, torch.roll(idx, -1, dims=1)
    if isinstance(model, DropoutMLP):
        return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    if isinstance(model, Branchy):
        return torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)
    raise TypeError(type(model))


def loss_of(model: nn.Module, x, y, **forward_kwargs):
    out = model(x, **forward_kwargs)
    if out.dim() == 3:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, start: int = 0, tape=None,
          set_to_none: bool = True, scheduler=None, opt_index: int = 0, **forward_kwargs) -> list[torch.Tensor]:
    """A plain training loop (one forward, one backward, one step per batch); `tape` (an
    oracle.Tape) takes the ground truth around each step. Returns the losses."""
    losses = []
    for s in range(start, start + steps):
        x, y = batch(model, s)
        opt.zero_grad(set_to_none=set_to_none)
        loss = loss_of(model, x, y, **forward_kwargs)
        loss.backward()
        if tape is not None:
            tape.step(opt, opt_index=opt_index)
        else:
            opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach().clone())
    return losses
