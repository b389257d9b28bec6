"""Hugging Face integration: `FreezeFrame`, a `transformers.TrainerCallback` that makes every `trainer.train()` a stage."""

from __future__ import annotations

import torch
from transformers import TrainerCallback  # importing freezeframe.transformers imports transformers; `import freezeframe` does not

from .capture.optim import unwrap_optimizer
from .integrations import hf_facts
from .integrations.adapter import StageSession
from .integrations.events import guarded_event

__all__ = ["FreezeFrame"]


class FreezeFrame(TrainerCallback):
    """Record what every optimizer step of a Hugging Face `Trainer` does to every parameter tensor.

    `Trainer(..., callbacks=[FreezeFrame("runs/x")])` (TRL's `SFTTrainer` and other subclasses
    alike): each `trainer.train()` is a stage named after the call (`train(max_steps=8)`,
    `train(num_train_epochs=3)`, a resumed call adds `resume_from_checkpoint='checkpoint-4'`), one
    recording session per call, appended to the same run. A step is an optimizer step (gradient
    accumulation's micro-batches are not steps). The training loss of the Trainer's logs is
    recorded as `loss`, each evaluation's metrics under the Trainer's names (`eval_loss`, ...).
    Options are those of `freezeframe.watch` (`every`, `mode`, `budget`, `reference`, ...), checked
    now; `mode` applies to the first train(), later ones append. See docs/transformers.md.
    """

    def __init__(self, run_dir, *, every: int | None = None, mode: str = "append", **options):
        self._session = StageSession(run_dir, framework="transformers", label="Transformers",
                                     every=every, mode=mode, options=options)
        self._open_stage: str | None = None  # the name of a stage whose train() has not returned yet

    @property
    def run_dir(self):
        return self._session.run_dir

    @property
    def recorder(self):
        """The Recorder of the train() in progress (None outside one)."""
        return self._session.recorder

    def close(self) -> None:
        """End the recording session of a train() that an exception ended (what it recorded is
        kept, the run marked incomplete). The next train() does this by itself."""
        self._close_interrupted()

    def __repr__(self) -> str:
        return f"FreezeFrame({str(self.run_dir)!r})"

    # ------------------------------------------------------------------ events
    # on_train_begin comes after the Trainer built (or reused) the optimizer and a new scheduler,
    # wrapped them for Accelerate, and loaded a checkpoint's weights, optimizer and state: the
    # stage starts from the weights training starts from.
    @guarded_event
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        interrupted = self._close_interrupted()
        call = hf_facts.train_call()
        extra = {}
        scaler = hf_facts.scaler(call)
        if scaler is not None and self._session.options.get("scaler") is None:
            extra["scaler"] = scaler  # fp16: the Accelerator's scaler skips steps; they are counted
        # `optimizer` is Accelerate's AcceleratedOptimizer: the recorder hooks the torch optimizer
        # inside it, whose step() runs once per optimizer step (capture/optim.py unwrap_optimizer).
        if not isinstance(unwrap_optimizer(optimizer), torch.optim.Optimizer):  # DeepSpeed's own, say:
            raise TypeError(f"the Trainer's optimizer is a {type(optimizer).__name__}, which has no torch step hooks")
        self._session.open(model, [optimizer], versions=hf_facts.versions(), **extra)
        meta = hf_facts.stage_meta(args, state, call)
        if interrupted is not None:
            meta["after_interrupted"] = interrupted
        name = hf_facts.stage_name(args, call)
        self._session.begin(name, epochs=hf_facts.planned_epochs(args, state), meta=meta)
        self._open_stage = name

    @guarded_event
    def on_epoch_begin(self, args, state, control, **kwargs):
        self._session.epoch()  # the stage's epoch_starts: the next applied step begins an epoch

    @guarded_event
    def on_log(self, args, state, control, logs=None, **kwargs):
        rec = self._session.recorder
        loss = hf_facts.scalars(logs).get("loss")
        if rec is not None and loss is not None:
            # the mean training loss since the previous log (logging_steps), on the last step
            rec.log(loss=loss)
        # the epoch's values: the last of each name logged in it (an evaluation at the epoch's
        # end comes after on_epoch_end, before the next epoch begins: docs/transformers.md)
        self._session.log_epoch(**hf_facts.epoch_values(logs))

    @guarded_event
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        rec = self._session.recorder
        values = hf_facts.scalars(metrics)
        if rec is not None and values:
            rec.log(**values)  # the Trainer's own names (eval_loss, ...) on the last applied step
        self._session.log_epoch(**hf_facts.epoch_values(metrics))

    @guarded_event
    def on_train_end(self, args, state, control, **kwargs):
        # After the best model was loaded back (load_best_model_at_end): the model as train() returns it.
        self._open_stage = None
        self._session.end(close=True)

    # ------------------------------------------------------------------ internals
    def _close_interrupted(self) -> dict | None:
        """A train() ended by an exception never reaches on_train_end (the Trainer has no
        exception event): its session is closed now, marked incomplete. Returns its stage's name."""
        name, self._open_stage = self._open_stage, None
        if self._session.recorder is None:
            return None
        self._session.recorder.end_stage(observed=False)  # its end is the model as found now
        self._session.close(complete=False)
        return {"stage": name}

    def _ff_failed(self) -> bool:
        return self._session.failed

    def _ff_fail(self, where: str, exc: BaseException) -> None:
        self._open_stage = None
        self._session.fail(where, exc)
