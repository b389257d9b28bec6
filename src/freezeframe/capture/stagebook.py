"""The stages of a run as the recorder finds them: when one begins and how it is named, where it
ends (hashed at a known end, or proved by version counters at a boundary found later), its
skipped steps, and its continuity with the previous stage."""

from __future__ import annotations

import numpy as np

from ..store.indexspace import reader_list, stored_list
from . import metrics
from .boundaries import BoundaryTracker
from .optim import GroupLayout, OptimizerView
from .stages import StageRecord, judge_continuity, optimizer_token, previous_for_continuity


class StageBook:
    def __init__(self, *, stages: list[StageRecord], session: int, names: list[str], params: list, buffers: list,
                 bounds: BoundaryTracker, views: list[OptimizerView], refs: list, skips_known: bool,
                 hash_threads: int):
        self.stages = stages              # every stage of the run, earlier sessions' included
        self.current: StageRecord | None = None
        self.explicit: dict | None = None  # the explicit stage we are inside: name, kind, parts, meta, epochs
        self.force_new = False            # the next applied step begins a stage whatever it trains
        self.session, self.names = session, names
        self.params, self.buffers = params, buffers
        self.bounds, self.views, self.refs = bounds, views, refs
        self.skips_known = skips_known
        self.hash_threads = hash_threads
        self._skips_before = 0            # skipped before the first applied step of the next stage
        self._layout_seen: GroupLayout | None = None
        self.model_changes: dict | None = None  # for the next stage: the model's tensor set changed
        self.epoch_open = False           # an epoch was announced (Recorder.epoch) and goes on
        self.epoch_pending = False        # ... and no step has been applied in it yet
        self.p0 = len(params)             # params known when the run began (docs/run-format.md, "Tensor indices")

    # ------------------------------------------------------------------ automatic boundaries
    def starts_new(self, trainable: list[int], layout: GroupLayout) -> bool:
        """A stage is a maximal run of steps with the same trainable set and group membership."""
        st = self.current
        new = (st is None or self.force_new or st.trainable != trainable
               or (layout is not self._layout_seen and st.groups != layout.groups))
        self._layout_seen = layout
        return new

    def begin(self, trainable: list[int], layout: GroupLayout, step: int) -> StageRecord:
        """The first applied step of a new stage is about to run: hash its start, close the
        previous stage if its end was not known yet, and judge continuity."""
        now_p = metrics.content_hashes(self.params, threads=self.hash_threads, agree=self.bounds.agree)
        prev = self.current
        if prev is not None and not self.bounds.end_known:
            # An automatic boundary, found only now: the previous stage's end is proved by
            # version counters; buffers come from the copy taken at its last step.
            end, skip, wp, wb = self.bounds.discovered_end(now_p, _held(prev), self.internal(prev.start_hashes))
            self._note_writes(prev, "between_steps", "next_stage", wp, wb)
            self.close(prev, end, "versions", self.params + self.bounds.buffer_copies, skip=skip)
        ex = self.explicit
        if ex is not None:
            ex["parts"] += 1
            name = ex["name"] if ex["parts"] == 1 else f"{ex['name']} (part {ex['parts']})"
            kind, explicit, meta, epochs = ex["kind"], True, dict(ex.get("meta") or {}), ex.get("epochs")
        else:
            name, kind, explicit, meta, epochs = f"stage {len(self.stages)}", "train", False, {}, None
        stage = StageRecord(
            index=len(self.stages), name=name, kind=kind, explicit=explicit, session=self.session,
            first_step=step, trainable=trainable,
            groups=[dict(g, params=list(g["params"])) for g in layout.groups],
            start_hashes=self.stored(self.bounds.start(now_p)), grad_steps=np.zeros(len(self.params), dtype=np.int64),
            lr_nominal=[None] * len(layout.groups), meta=meta, epochs_planned=epochs,
            optimizer_state_start=[v.state_count() for v in self.views],
            optimizer_tokens=[optimizer_token(v) for v in self.views],
            skipped_steps=self._skips_before if self.skips_known else None,
        )
        self._skips_before = 0
        facts = getattr(self.params, "facts", None)  # capture/peft.py, carried by the map's list
        if facts is not None:
            facts.stage_begin(stage.meta)
        prev_c = previous_for_continuity(self.stages)
        judge_continuity(stage, prev_c, self.stored(self.names))
        if self.model_changes is not None:
            stage.model_changes, self.model_changes = self.model_changes, None
            replaced = stage.model_changes["replaced"]
            if prev_c is not None and replaced:  # new tensor objects: never a continuation
                stage.changed_since_previous_end += [n for n in replaced if n not in stage.changed_since_previous_end]
                stage.starts_from_previous_end = False
        self.stages.append(stage)
        self.current = stage
        self.force_new = False
        return stage

    def note_hypers(self, hypers: list[tuple]) -> None:
        """The peak the schedule states, per group (and its floor, where it may be stale)."""
        stage = self.current
        for g, (_, _, _, nominal) in enumerate(hypers):
            if nominal is not None:
                stage.lr_nominal[g] = nominal
        if any(h[3] is not None for h in hypers):
            stage.lr_nominal_floor = [f for v in self.views for f in v.nominal_floors()]

    def note_model_change(self, replaced: list[str], added: list[str], removed: list[str]) -> None:
        """The model's tensor set changed: the next applied step begins a stage that says so."""
        ch = self.model_changes or {"replaced": [], "added": [], "removed": []}
        for key, names in (("replaced", replaced), ("added", added), ("removed", removed)):
            ch[key] += [n for n in names if n not in ch[key]]
        self.model_changes = ch
        self.force_new = True

    def epoch(self) -> None:
        """An epoch begins now: the next applied step is its first."""
        self.epoch_open = self.epoch_pending = True

    def log_epoch(self, values: dict) -> bool:
        """Scalars of the epoch begun last, merged into its entry of the current stage's
        `epoch_metrics`. False when no epoch under way has applied a step in it."""
        st = self.current
        if st is None or not self.epoch_open or self.epoch_pending or not st.epoch_starts:
            return False
        st.note_epoch_values(values)
        return True

    def note_applied(self, stage: StageRecord, step: int) -> None:
        """Step `step` is about to count as applied in `stage`: the first of an epoch when one
        was just announced, or the stage's first step inside an epoch already under way (a stage
        split inside an epoch counts that epoch in each part that applied steps in it)."""
        if stage.steps == 0 and self.epoch_open:  # docs/recording.md, "first_epoch_continued"
            stage.first_epoch_continued = not self.epoch_pending
        if self.epoch_pending or (self.epoch_open and stage.steps == 0):
            stage.note_epoch_start(step)
            self.epoch_pending = False

    def skip(self) -> None:
        if self.current is not None and not self.force_new:
            self.current.skipped_steps = (self.current.skipped_steps or 0) + 1
        else:  # before the first applied step of the stage about to begin: it is that stage's
            self._skips_before += 1

    # ------------------------------------------------------------------ ends
    def close(self, stage: StageRecord, end_hashes: list, kind: str, tensors: list, skip=None) -> None:
        """Store a stage's end: hashes, and its exact norms and drift (params flagged in `skip`
        were written after the stage's last step: their end state is unknown)."""
        stage.end_hashes = self.stored(end_hashes)
        stage.end_kind = kind
        em = metrics.state_metrics(tensors, self.refs, skip, agree=self.bounds.agree)
        stage.end_metrics = {k: self.stored(v) for k, v in em.items()}
        stage.optimizer_state_end = [v.state_count() for v in self.views]
        stage.complete = True

    def capture_end(self, detected: str = "stage_end") -> bool:
        """A known stage end (explicit stage exit, framework boundary, close): hash everything,
        and note the tensors written since the stage's last step outside an optimizer step
        (`detected`: "stage_end" or "close"). Returns whether a stage was closed (then the
        caller flushes)."""
        st = self.current
        if self.bounds.end_known or st is None:
            return False
        end, wp, wb = self.bounds.known_end(_held(st), self.internal(st.start_hashes))
        self._note_writes(st, "after_last_step", detected, wp, wb)
        self.close(st, end, "hashed", self.params + self.buffers)
        facts = getattr(self.params, "facts", None)
        if facts is not None:
            st.lora = facts.stage_end()  # after the end hashes: it reads, never writes (docs/peft.md)
        return True

    def _note_writes(self, stage: StageRecord, when: str, detected: str, params: list[int],
                     buffers: list[int]) -> None:
        """An entry of the stage's `outside_writes` (docs/recording.md)."""
        if params or buffers:
            P = len(self.params)
            stage.outside_writes.append({
                "when": when, "detected": detected, "step": stage.last_step,
                "params": [self.names[i] for i in params], "buffers": [self.names[P + b] for b in buffers]})

    # ------------------------------------------------------------------ index spaces
    def stored(self, values: list) -> list:
        """A list over the recorder's tensors [params, buffers] in the run's stored order."""
        return stored_list(values, self.p0, len(self.params), len(self.buffers))

    def internal(self, values: list | None) -> list | None:
        """A stored list (perhaps of a stage recorded before parameters were added) in the
        recorder's order."""
        return reader_list(values, self.p0, len(self.params), len(self.buffers))

    # ------------------------------------------------------------------ explicit stages
    def begin_explicit(self, name: str, kind: str, meta: dict | None, epochs: int | None) -> None:
        self.explicit = {"name": name, "kind": kind, "parts": 0, "meta": meta, "epochs": epochs}
        self.force_new = True

    def end_explicit(self, pending_train_forwards: int) -> None:
        if self.current is not None and pending_train_forwards:
            # training passes after the stage's last step (a cancelled last step) are this stage's
            self.current.forward_passes["train"] += pending_train_forwards
        self.explicit = None
        self.force_new = True
        self.epoch_open = self.epoch_pending = False  # epochs belong to the explicit stage's loop


def _held(stage: StageRecord) -> set[int]:
    """The params some param group of the stage's optimizers holds (a step may move them)."""
    return {i for g in stage.groups for i in g["params"]}
