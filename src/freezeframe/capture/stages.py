"""Stage records and the continuity verdict between a stage's start and the previous stage's end."""

from __future__ import annotations

import uuid
import weakref
from dataclasses import dataclass, field

import numpy as np

# optimizer object -> its token: the same object keeps one token for as long as it lives
_TOKENS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def optimizer_token(view) -> str | None:
    """A token naming the optimizer object behind an optimizer view (fastai's: `learn.opt` now),
    the same for as long as that object lives in this process and new for another object (a
    Lightning fit's `configure_optimizers`, fastai's `reset_opt=True`); None when it cannot be
    told (docs/recording.md, "optimizer_tokens")."""
    try:
        opt = getattr(view, "opt", None)
        if opt is None:
            return None
        token = _TOKENS.get(opt)
        if token is None:
            token = _TOKENS[opt] = uuid.uuid4().hex[:16]
        return token
    except Exception:  # noqa: BLE001 - an object that takes no weak reference: not told
        return None


@dataclass
class StageRecord:
    index: int
    name: str
    kind: str                      # "train" | "trial"
    explicit: bool                 # named by the user or a framework, not discovered
    session: int
    first_step: int
    trainable: list[int]           # param indices with requires_grad for the whole stage
    groups: list[dict]             # index, optimizer, name, params (param indices)
    start_hashes: list[str]        # params then buffers, before the stage's first update
    last_step: int = -1
    steps: int = 0
    skipped_steps: int | None = None
    complete: bool = False
    epochs: int | None = None      # epochs the stage applied steps in (len(epoch_starts)), null if none announced
    epoch_starts: list | None = None  # step at which each of its epochs began (see Recorder.epoch)
    epoch_metrics: list | None = None  # per entry of epoch_starts: {name: float | None} (Recorder.log_epoch) or None
    epochs_planned: int | None = None  # the count an integration planned (begin_stage(epochs=N))
    first_epoch_continued: bool | None = None  # its first epoch began in the stage before (split inside it)
    forward_passes: dict = field(default_factory=lambda: {"train": 0, "eval": 0})
    lr_nominal: list = field(default_factory=list)   # per group: the peak the schedule states
    lr_nominal_floor: list = field(default_factory=list)  # per group: that schedule's lowest lr, if stale-prone
    grad_steps: np.ndarray | None = None              # per param
    end_hashes: list | None = None                    # per tensor, None entries where unknown
    end_kind: str | None = None                       # "hashed" | "versions"
    end_metrics: dict | None = None                   # exact norms and drift at a known end
    compared_with: int | None = None
    changed_since_previous_end: list[str] = field(default_factory=list)
    starts_from_previous_end: bool | None = None
    continuity: str | None = None
    meta: dict = field(default_factory=dict)          # framework facts, as given
    optimizer_state_start: list = field(default_factory=list)  # per optimizer: tensors with state
    optimizer_state_end: list | None = None
    optimizer_tokens: list | None = None  # per optimizer: optimizer_token() at the stage's first step
    outside_writes: list = field(default_factory=list)    # tensors written outside an optimizer step
    model_changes: dict | None = None                     # the model's tensor set changed before this stage
    shared_between_optimizers: list = field(default_factory=list)  # names stepped by several optimizers
    lora: dict | None = None  # at a captured end: {module: {adapter, delta_rel, b_zero, a_zero, merged}} (docs/peft.md)

    def note_epoch_start(self, step: int) -> None:
        """The stage's first applied step in an epoch."""
        if self.epoch_starts is None:
            self.epoch_starts = []
        if not self.epoch_starts or self.epoch_starts[-1] != step:
            self.epoch_starts.append(step)
            if self.epoch_metrics is not None:  # kept aligned with epoch_starts
                self.epoch_metrics.append(None)
        self.epochs = len(self.epoch_starts)

    def note_epoch_values(self, values: dict) -> None:
        """Scalars of the stage's last epoch (later values of a name win)."""
        em = self.epoch_metrics or []
        em += [None] * (len(self.epoch_starts) - len(em))
        em[-1] = {**(em[-1] or {}), **values}
        self.epoch_metrics = em

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["grad_steps"] = None if self.grad_steps is None else self.grad_steps.tolist()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StageRecord":
        d = dict(d)
        gs = d.get("grad_steps")
        d["grad_steps"] = None if gs is None else np.asarray(gs, dtype=np.int64)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def previous_for_continuity(stages: list[StageRecord]) -> StageRecord | None:
    """Continuity after a trial stage (lr_find) is judged against the last non-trial stage."""
    for st in reversed(stages):
        if st.kind != "trial":
            return st
    return None


def judge_continuity(stage: StageRecord, prev: StageRecord | None, names: list[str]) -> None:
    """Fill the stage's continuity facts from `prev`'s end hashes and its own start hashes.

    A None in `prev.end_hashes` is a tensor written after `prev`'s last step at a boundary only
    discovered later (its end bytes were never hashed): it is listed as changed. Lists and
    `names` are in stored order (docs/run-format.md, "Tensor indices"): a tensor past the end
    of `prev`'s list is one that appeared since, with no previous end to compare."""
    if prev is None:
        stage.compared_with = None
        stage.changed_since_previous_end = []
        stage.starts_from_previous_end = None
        stage.continuity = None
        return
    stage.compared_with = prev.index
    end = prev.end_hashes
    n_known = len(names)
    if end is None:
        end = [None] * len(names)
    else:  # lists in stored order: tensors after the end of `prev`'s list appeared since (not compared)
        n_known = len(end)
    changed = []
    for i, name in enumerate(names[:n_known]):
        e = end[i] if i < len(end) else None
        s = stage.start_hashes[i] if i < len(stage.start_hashes) else None
        if e is None or s is None or e != s:
            changed.append(name)
    stage.changed_since_previous_end = changed
    stage.starts_from_previous_end = not changed
    stage.continuity = "bitwise" if prev.end_kind == "hashed" else "written"
