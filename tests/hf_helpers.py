"""Tiny Hugging Face models, data and an oracle callback for the Transformers tests: GPT-2 built
from a config (no hub), token ids fed as tensors (no tokenizer), and a plain TrainerCallback that
copies the model's tensors at every train() begin and end and the lr each optimizer step applies."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

import oracle

VOCAB = 128


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64,
                     bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return GPT2LMHeadModel(cfg)


def lora_gpt2(seed: int = 0, **lora):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, task_type="CAUSAL_LM", **lora)
    return get_peft_model(gpt2(seed), cfg)


def token_data(n: int = 16, length: int = 16, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                per_device_train_batch_size=4, learning_rate=1e-2, disable_tqdm=True, dataloader_num_workers=0,
                seed=0)
    base.update(kw)
    return TrainingArguments(**base)


class Oracle(TrainerCallback):
    """Ground truth, taken by the test itself: per train() call the tensors at on_train_begin and
    on_train_end, requires_grad at begin, the lr of every group just before each optimizer.step(),
    the global step at each epoch begin, the logged losses and lrs, and every evaluation's metrics."""

    def __init__(self):
        self.calls: list[dict] = []

    @property
    def call(self) -> dict:
        return self.calls[-1]

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        self.calls.append({"begin": oracle.state(model), "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
                           "optimizer": optimizer, "scheduler": lr_scheduler, "lrs": [], "scheduler_lrs": [],
                           "steps": 0, "epoch_steps": [], "losses": {}, "logged_lr": {}, "evals": [],
                           "global_step_begin": state.global_step, "end": None})

    def on_epoch_begin(self, args, state, control, **kw):
        self.call["epoch_steps"].append(self.call["steps"])

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        self.call["lrs"].append([g["lr"] for g in optimizer.param_groups])
        self.call["scheduler_lrs"].append(list(lr_scheduler.get_last_lr()))

    def on_optimizer_step(self, args, state, control, **kw):
        self.call["steps"] += 1

    def on_log(self, args, state, control, logs=None, **kw):
        k = self.call["steps"] - 1
        if "loss" in logs:
            self.call["losses"][k] = float(logs["loss"])
        if "learning_rate" in logs:
            self.call["logged_lr"][k] = float(logs["learning_rate"])

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.call["evals"].append((self.call["steps"] - 1, dict(metrics)))

    def on_train_end(self, args, state, control, model=None, **kw):
        self.call["end"] = oracle.state(model)


def scalars_by_step(run, first_step: int = 0) -> dict[str, dict[int, float]]:
    """The run's logged scalars: name -> {step within the run: value} (the last one logged)."""
    t = run.scalars()
    out: dict[str, dict[int, float]] = {}
    for s, n, v in zip(t.column("step").to_pylist(), t.column("name").to_pylist(), t.column("value").to_pylist()):
        out.setdefault(n, {})[s - first_step] = v
    return out
