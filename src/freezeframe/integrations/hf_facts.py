"""What a Hugging Face `Trainer` says about one `train()` call, as data (docs/transformers.md): the
call's stage name, the TrainingArguments that shape what trains, the checkpoint it resumed from,
and the versions of the libraries it runs with. Nothing here imports transformers: the callback
hands in what the Trainer gave it."""

from __future__ import annotations

import inspect
import math
import os
import sys
from dataclasses import dataclass

#: TrainingArguments recorded in a stage's meta (`training_args`), by their own names
TRAINING_ARGS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim",
                 "gradient_accumulation_steps", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                 "gradient_checkpointing", "activation_checkpointing", "max_grad_norm", "fp16", "bf16", "seed")

#: libraries whose versions a session records when they are imported (framework_versions)
LIBRARIES = ("transformers", "peft", "trl", "accelerate")


@dataclass
class TrainCall:
    """The `Trainer.train` call in progress, as found on the stack."""

    trainer: object = None               # the Trainer (or subclass) running it; None if not found
    resume_from_checkpoint: str | None = None  # the checkpoint directory, True resolved by the Trainer


def train_call() -> TrainCall:
    """Walk the stack outward to the innermost `transformers.Trainer.train` frame: its `self` is the
    Trainer (callbacks are handed no reference to it) and its `resume_from_checkpoint` the
    checkpoint as the Trainer resolved it (`True` becomes the last checkpoint's path). Reading a
    frame's locals changes nothing."""
    trainer_mod = sys.modules.get("transformers.trainer")
    cls = getattr(trainer_mod, "Trainer", None)
    if cls is None:
        return TrainCall()
    code = getattr(inspect.unwrap(cls.train), "__code__", None)
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is code:
            loc = f.f_locals
            resume = loc.get("resume_from_checkpoint")
            return TrainCall(trainer=loc.get("self"),
                             resume_from_checkpoint=os.fspath(resume) if isinstance(resume, (str, os.PathLike)) else None)
        f = f.f_back
    return TrainCall()


def _value(v):
    """A TrainingArguments value as JSON: enums by their value, numbers and strings as they are."""
    v = getattr(v, "value", v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def _shown(v) -> str:
    """A number as a stage name shows it: 3.0 as 3."""
    return str(int(v)) if isinstance(v, float) and v.is_integer() else repr(v)


def stage_name(args, call: TrainCall) -> str:
    """`train(max_steps=8)` when max_steps bounds the call, else `train(num_train_epochs=3)`; a
    resumed call adds `resume_from_checkpoint='checkpoint-4'` (the directory's name)."""
    parts = ([f"max_steps={int(args.max_steps)}"] if args.max_steps and args.max_steps > 0
             else [f"num_train_epochs={_shown(args.num_train_epochs)}"])
    if call.resume_from_checkpoint is not None:
        parts.append(f"resume_from_checkpoint={os.path.basename(os.path.normpath(call.resume_from_checkpoint))!r}")
    return f"train({', '.join(parts)})"


def planned_epochs(args, state) -> int | None:
    """The epochs this call will begin when only num_train_epochs bounds it (after a resume: the
    rest, the resumed epoch included); None when max_steps bounds it."""
    if args.max_steps and args.max_steps > 0:
        return None
    total = getattr(state, "num_train_epochs", None)
    max_steps = getattr(state, "max_steps", None)
    if not total or not max_steps:
        return None
    per_epoch = max(max_steps // total, 1)
    return max(int(total) - int(state.global_step // per_epoch), 0)


def stage_meta(args, state, call: TrainCall) -> dict:
    """The Trainer's facts about this train() call (keys documented in docs/transformers.md)."""
    meta = {"method": "train",
            "trainer": type(call.trainer).__name__ if call.trainer is not None else None,
            "training_args": {k: _value(getattr(args, k, None)) for k in TRAINING_ARGS},
            "world_size": int(getattr(args, "world_size", 1) or 1),
            "max_steps": int(state.max_steps) if getattr(state, "max_steps", None) else None,
            "start_global_step": int(state.global_step),
            "resumed_from": None}
    if call.resume_from_checkpoint is not None:
        meta["resumed_from"] = {"checkpoint": call.resume_from_checkpoint, "global_step": int(state.global_step)}
    if getattr(args, "load_best_model_at_end", False):
        # the Trainer loads the best checkpoint back before on_train_end: a write it announces
        # (the changed-outside-optimizer finding is then information, docs/transformers.md)
        meta["reload_at_end"] = {"by": "load_best_model_at_end", "what": "the best checkpoint's weights",
                                 "monitor": _value(getattr(args, "metric_for_best_model", None))}
    return meta


def scaler(call: TrainCall):
    """The GradScaler the Trainer's Accelerator steps with (fp16), so skipped steps are counted."""
    s = getattr(getattr(call.trainer, "accelerator", None), "scaler", None)
    torch = sys.modules.get("torch")
    return s if torch is not None and isinstance(s, torch.amp.GradScaler) else None


def versions() -> dict:
    """The versions of the Hugging Face libraries this process has imported."""
    return {name: getattr(sys.modules[name], "__version__", None) for name in LIBRARIES if name in sys.modules}


def scalars(values: dict | None) -> dict:
    """The real numbers of a Trainer's logs or metrics (strings and lists are left out)."""
    out = {}
    for k, v in (values or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[str(k)] = v
    return out


def epoch_values(logs: dict | None) -> dict:
    """The values of a Trainer's log or evaluation for the epoch under way, under the Trainer's
    own names (loss, grad_norm, learning_rate, eval_loss, ...): its `epoch` (a fraction, the
    position in training) is left out, and so is the whole summary train() logs when it ends
    (train_runtime, train_loss over every epoch: not one epoch's)."""
    if logs and "train_runtime" in logs:
        return {}
    return {k: v for k, v in scalars(logs).items() if k != "epoch"}
