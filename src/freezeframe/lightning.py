"""Lightning integration: `FreezeFrame`, a Callback that makes every `trainer.fit` a stage, with Lightning's facts as data."""

from __future__ import annotations

import sys

import torch

try:  # importing freezeframe.lightning imports Lightning; `import freezeframe` does not
    from lightning.pytorch import Callback
except ImportError:  # only the standalone `pytorch_lightning` package is installed
    from pytorch_lightning import Callback

from .integrations.adapter import SessionCallback, StageSession
from .integrations.events import guarded_event

__all__ = ["FreezeFrame"]


class FreezeFrame(SessionCallback, Callback):
    """Record what every optimizer step of a Lightning `Trainer` does to every parameter tensor.

    `Trainer(callbacks=[FreezeFrame("runs/x")])`: each `trainer.fit` is a stage named "fit" (one
    recording session per fit, appended to the same run); a change of the trainable set or of
    the param groups inside a fit (`BackboneFinetuning` unfreezing the backbone) starts "fit
    (part 2)". `trainer.validate/test/predict` record nothing. Resuming with `ckpt_path=`
    continues the same run. Options are those of `freezeframe.watch` (`every`, `mode`,
    `budget`, `reference`, ...); `mode` applies to this callback's first fit, later fits append.
    The shared event-to-stage mapping is in docs/integrations.md.
    """

    def __init__(self, run_dir, *, every: int | None = None, mode: str = "append", **options):
        super().__init__()
        self._session = StageSession(run_dir, framework="lightning", label="Lightning", every=every,
                                     mode=mode, options=options)  # refused now, not at the first fit
        self._steps_at_batch_start = 0
        self._valid_values: dict = {}   # the epoch-level metrics of this epoch's validation
        self._late: dict | None = None  # callback_metrics as this callback's on_train_epoch_end saw them

    @property
    def recorder(self):
        """The Recorder of the fit in progress (None outside a fit)."""
        return self._session.recorder

    # ------------------------------------------------------------------ hooks
    # The recorder starts at on_train_start: after Lightning has built the optimizers, restored a
    # checkpoint (weights, optimizer state, the epoch counter) and run the sanity check.
    @guarded_event
    def on_train_start(self, trainer, pl_module) -> None:
        extra = {}
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if self.options.get("scaler") is None and isinstance(scaler, torch.amp.GradScaler):
            extra["scaler"] = scaler  # Lightning's "16-mixed": count the steps its scaler skips
        # trainer.optimizers are the torch optimizers (Lightning's LightningOptimizer wraps them
        # for the user; its step() calls theirs, where the recorder's step hooks fire, closure
        # included: Lightning runs forward and backward inside optimizer.step). A session a fit
        # whose teardown never reached us left open is closed first.
        self._session.open(pl_module, trainer.optimizers, versions=_versions(trainer), **extra)
        self._session.begin("fit", epochs=_planned_epochs(trainer), meta=_fit_facts(trainer))

    @guarded_event
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._log_late(trainer)  # the previous epoch's values logged after this callback's epoch end
        # The next applied step begins an epoch: each stage (a part of the fit after an unfreeze
        # included) states the epochs it ran (docs/lightning.md).
        self._session.epoch()

    @guarded_event
    def on_validation_end(self, trainer, pl_module) -> None:
        if self.recorder is not None and not trainer.sanity_checking:
            self._valid_values.update(_epoch_metrics(trainer, _results(trainer, "val_loop")))

    @guarded_event
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # The epoch's training aggregates (self.log(..., on_epoch=True)) and its validation's
        # metrics, under the names they were logged with (docs/lightning.md).
        rec, valid, self._valid_values = self.recorder, self._valid_values, {}
        if rec is not None:
            rec.log_epoch(**{**_epoch_metrics(trainer, _results(trainer)), **valid})
            self._late = dict(trainer.callback_metrics)

    @guarded_event
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rec = self.recorder
        if rec is not None:
            self._steps_at_batch_start = rec.steps
            # training_step may call submodules only (no forward hook of the LightningModule):
            # tensors unfrozen since (BackboneFinetuning) get their gradient hooks now
            rec.prepare_batch()

    @guarded_event
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rec = self.recorder
        if rec is None or rec.steps == self._steps_at_batch_start:
            return  # no step applied in this batch (gradient accumulation, a skipped step)
        loss = _loss(outputs)
        if loss is not None:
            if pl_module.automatic_optimization:
                # Lightning divides the loss it hands here by accumulate_grad_batches
                loss = loss * trainer.accumulate_grad_batches
            rec.log(loss=loss)  # a sync point on an accelerator, as Lightning's own logging of the loss

    @guarded_event
    def teardown(self, trainer, pl_module, stage) -> None:
        # After every on_fit_end (callbacks' and the LightningModule's): the model as fit returns it.
        if getattr(stage, "value", stage) == "fit":
            self._log_late(trainer)
            self._session.end(close=True)

    def on_exception(self, trainer, pl_module, exception) -> None:
        """A fit ended by an exception (or Ctrl-C): keep what was recorded, marked incomplete."""
        self._session.close(complete=False)

    def _log_late(self, trainer) -> None:
        """Values the LightningModule's own on_train_epoch_end logged (it runs after this
        callback's): those whose value is new since this callback's epoch end."""
        before, self._late = self._late, None
        rec = self.recorder
        if rec is None or before is None:
            return
        now = trainer.callback_metrics
        late = {k: v for k, v in _epoch_metrics(trainer, _results(trainer), fresh=False,
                                                fx="on_train_epoch_end").items() if now.get(k) is not before.get(k)}
        if late:
            rec.log_epoch(**late)


def _results(trainer, loop: str | None = None):
    """The result collection of the fit's training loop (or its `val_loop`): what Lightning
    knows of each logged name (on_epoch, the hook that logged it). None where a Lightning
    version keeps it elsewhere: then no epoch values are recorded, and nothing else changes."""
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    owner = getattr(epoch_loop, loop, None) if loop else epoch_loop
    results = getattr(owner, "_results", None)
    return results if callable(getattr(results, "values", None)) else None


def _epoch_metrics(trainer, results, *, fresh: bool = True, fx: str | None = None) -> dict:
    """The values in `trainer.callback_metrics` of the epoch-level metrics (`on_epoch=True`) a
    loop's result collection holds, by the name they were logged with (and Lightning's
    `/dataloader_idx_N` suffix); `fresh`: only those logged since the collection's last reset;
    `fx`: only those logged in that hook."""
    if results is None:
        return {}
    callback = trainer.callback_metrics
    out = {}
    suffix = getattr(results, "DATALOADER_SUFFIX", "/dataloader_idx_{}")
    for metric in list(results.values()):
        meta = getattr(metric, "meta", None)
        if not getattr(meta, "on_epoch", False) or (fresh and getattr(metric, "has_reset", False)) \
                or (fx is not None and getattr(meta, "fx", None) != fx):
            continue
        name = meta.name
        if getattr(meta, "add_dataloader_idx", False) and getattr(meta, "dataloader_idx", None) is not None:
            name += suffix.format(meta.dataloader_idx)
        value = callback.get(name)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = value
    return out


def _versions(trainer) -> dict:
    """The version of the package whose Trainer runs the fit (`lightning` or `pytorch_lightning`:
    the callback works with both, Lightning calls its hooks by name)."""
    package = type(trainer).__module__.split(".")[0]
    return {package: getattr(sys.modules.get(package), "__version__", None)}


def _loss(outputs) -> torch.Tensor | float | None:
    """The loss of a training step as Lightning hands it to on_train_batch_end: a tensor, or the
    "loss" of a dict (None when training_step returned neither)."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return outputs.detach()
    return None


def _planned_epochs(trainer) -> int | None:
    """The epochs this fit will run when only max_epochs bounds it (after a resume: the rest)."""
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0 or trainer.max_steps not in (None, -1):
        return None
    if any(type(cb).__name__ == "Timer" for cb in trainer.callbacks):  # max_time= may end it sooner
        return None
    return max(int(max_epochs) - int(trainer.current_epoch), 0)


def _fit_facts(trainer) -> dict:
    """Lightning's facts about the fit, as JSON-able data."""
    facts = {"method": "fit", "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
             "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
             "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__,
             "world_size": int(trainer.world_size), "start_epoch": int(trainer.current_epoch)}
    if trainer.ckpt_path is not None:
        facts["resumed_from"] = str(trainer.ckpt_path)
    finetuning = []
    for cb in trainer.callbacks:
        if hasattr(cb, "unfreeze_and_add_param_group"):  # BaseFinetuning and its subclasses
            fact = {"callback": type(cb).__name__}
            for key in ("unfreeze_backbone_at_epoch", "train_bn", "backbone_initial_ratio_lr", "initial_denom_lr"):
                v = getattr(cb, key, None)
                if isinstance(v, (bool, int, float)):
                    fact[key] = v
            finetuning.append(fact)
    if finetuning:
        facts["finetuning"] = finetuning
    return facts
