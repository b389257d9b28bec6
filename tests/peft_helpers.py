"""Tiny PEFT LoRA models built from configs (no hub), a plain two-stage loop watched by
freezeframe, and the oracle: the model's own state dicts and ΔW recomputed by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import freezeframe

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel,  # noqa: E402
                          ViTConfig, ViTForImageClassification)

GPT2 = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64)


def _lora(**lora) -> LoraConfig:
    """r=4, alpha=8 on c_attn (a Conv1D: fan_in_fan_out) unless `lora` says otherwise."""
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True, **lora})


def gpt2_lm(**lora):
    return get_peft_model(GPT2LMHeadModel(GPT2Config(**GPT2)), _lora(**lora))


def gpt2_cls(**lora):
    return get_peft_model(GPT2ForSequenceClassification(GPT2Config(**GPT2, pad_token_id=0, num_labels=2)),
                          _lora(task_type="SEQ_CLS", **lora))


def vit_cls():
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    return get_peft_model(ViTForImageClassification(cfg), lora)


def batch(model) -> dict:
    g = torch.Generator().manual_seed(1)
    if "pixel_values" == model.get_base_model().main_input_name:
        return {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
    ids = torch.randint(1, 128, (4, 16), generator=g)
    if isinstance(model.get_base_model(), GPT2LMHeadModel):
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(0, 2, (4,), generator=g)}


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_loop(model, run_dir, *, opt=None, lr=1e-3, stages=("one", "two"), steps=3, between=None, inside=None):
    """Two named stages of `steps` AdamW steps; `between(model, k)` runs after stage k's block,
    `inside(model, k)` after its last step, inside the block. Returns the state dicts at the start
    and at each stage's end (after `inside`, before `between`) and the optimizer."""
    if opt is None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = batch(model)
    snaps = [state(model)]
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with freezeframe.watch(model, opt, run_dir) as rec:
            for k, name in enumerate(stages):
                with rec.stage(name):
                    for _ in range(steps):
                        loss = model(**x).loss
                        loss.backward()
                        opt.step()
                        opt.zero_grad()
                        rec.log(loss=loss.item())
                    if inside is not None:
                        inside(model, k)
                snaps.append(state(model))
                if between is not None:
                    between(model, k)
    return snaps, opt


def lora_layers(model) -> dict:
    """name -> LoRA-wrapped module (the oracle's own walk: modules holding lora_A and base_layer)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def oracle_delta_rel(sd: dict, module: str, *, r=4, alpha=8, rslora=False, fan_in_fan_out=True) -> float:
    """‖ΔW‖_F / ‖W‖_F from a state dict: ΔW = (B @ A) * scale, transposed where fan_in_fan_out."""
    a, b = sd[f"{module}.lora_A.default.weight"].double(), sd[f"{module}.lora_B.default.weight"].double()
    w = sd[f"{module}.base_layer.weight"].double()
    scale = alpha / (math.sqrt(r) if rslora else r)
    delta = (b @ a) * scale
    if fan_in_fan_out:
        delta = delta.T
    assert delta.shape == w.shape
    return float(delta.norm() / w.norm())
