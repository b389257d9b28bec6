"""The time axis every chart over optimizer steps shares: each step's epoch and batch, the epoch
ticks and the stage events (docs/report.md, "Step scrubber")."""

from __future__ import annotations

import numpy as np


def step_context(summary: dict, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each step number: its epoch (1-based within its stage) and batch (1-based within its
    epoch, counted in optimizer steps); 0 where the stage announced no epochs."""
    step = np.asarray(step, dtype=np.int64)
    epoch, batch = np.zeros(len(step), np.int64), np.zeros(len(step), np.int64)
    for s in summary["stages"]:
        starts = s.get("epoch_starts")
        if not starts or s["first_step"] is None:
            continue
        starts = np.asarray(starts, np.int64)
        sel = np.flatnonzero((step >= s["first_step"]) & (step <= s["last_step"]) & (step >= starts[0]))
        k = np.searchsorted(starts, step[sel], side="right") - 1
        epoch[sel], batch[sel] = k + 1, step[sel] - starts[k] + 1
    return epoch, batch


def time_marks(summary: dict) -> dict:
    """Epoch ticks `[{step, label}]` (the step each epoch began) and stage events
    `[{step (a stage start - 0.5), label}]`: what started the stage (`unfreeze()` …, from
    `transitions[]`), else the stage's name. The same fields as `timeline()` gives."""
    ticks = [{"step": int(x), "label": f"epoch {k + 1}", "stage": s["index"]} for s in summary["stages"]
             for k, x in enumerate(s.get("epoch_starts") or [])]
    said = {t["stage"]: t.get("event") for t in summary.get("transitions") or []}
    events = [{"step": s["first_step"] - 0.5, "label": said.get(s["index"]) or s["name"], "stage": s["index"]}
              for s in summary["stages"][1:] if s["first_step"] is not None]
    return {"epoch_ticks": ticks, "events": events}
