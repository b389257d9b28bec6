"""The trainings the cost-at-scale benchmark watches: large models of which only a small part trains.

A case builds a model, its optimizer, a fixed list of batches and a step function; the plain and
the watched run of a case (each in its own process, see cost_measure.py) build exactly the same
thing from the same seed and run the same steps. Nothing here imports freezeframe.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class Built:
    """What a case's build returns: the model, its optimizer, the batches and one training step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list
    step: Callable[[nn.Module, torch.optim.Optimizer, object], torch.Tensor]
    shape: str                # the model's shape in words, for the table


@dataclass
class Case:
    """A benchmark case: `build()` makes a `Built`; `steps` optimizer steps are run."""

    key: str                  # --only filters on it
    label: str                # the table's "model" column
    build: Callable[[], Built]
    steps: int = 20


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the parameters that train (requires_grad), each storage counted once (tied weights)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def tensor_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(parameter bytes, buffer bytes, parameter count) of the model, tied storages counted once."""
    seen, params, count = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            params += p.numel() * p.element_size()
            count += p.numel()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers, count


# --------------------------------------------------------------------------- a 50M-parameter stack, head only
WIDTH, DEPTH, CLASSES, BATCH = 2048, 12, 16, 16


class FrozenStack(nn.Module):
    """DEPTH Linear(WIDTH, WIDTH) + ReLU layers (50.4M parameters, 192 MiB fp32) and a Linear head
    (WIDTH × CLASSES + CLASSES = 32,784 parameters). No buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(DEPTH) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _classify_step(model: nn.Module, opt: torch.optim.Optimizer, batch) -> torch.Tensor:
    x, y = batch
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def build_stack() -> Built:
    torch.manual_seed(0)
    model = FrozenStack()
    model.body.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
               for _ in range(4)]
    return Built(model, opt, batches, _classify_step,
                 f"{DEPTH} × Linear({WIDTH}, {WIDTH}) frozen + Linear({WIDTH}, {CLASSES}) head, batch {BATCH}")


# --------------------------------------------------------------------------- a LoRA GPT-2 small from a config
GPT2_SHAPE = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
SEQ, GPT_BATCH = 32, 2


def _lm_step(model: nn.Module, opt: torch.optim.Optimizer, batch) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    return loss


def build_gpt2_lora() -> Built:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(**GPT2_SHAPE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "fan_in_fan_out is set to False but ... Conv1D" (it sets it)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, GPT2_SHAPE["vocab_size"], (GPT_BATCH, SEQ), generator=g) for _ in range(4)]
    shape = ", ".join(f"{k}={v}" for k, v in GPT2_SHAPE.items())
    return Built(model, opt, batches, _lm_step,
                 f"GPT2LMHeadModel(GPT2Config({shape})) + LoRA r=8, alpha=16 on c_attn; batch {GPT_BATCH} × {SEQ} tokens")


CASES = [
    Case("stack", "50M stack, head only", build_stack),
    Case("gpt2", "GPT-2 small + LoRA", build_gpt2_lora),
]
