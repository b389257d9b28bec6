"""The Recorder's hand-over to the store: known stage ends completed with their reference, the
manifest built, and the buffered rows submitted to the writer thread."""

from __future__ import annotations

import json
import time

import numpy as np

from ..store.indexspace import stored_list
from .stages import StageRecord


class StoreHandover:
    """The Recorder's boundaries and flushes (a mixin)."""

    # ------------------------------------------------------------------ boundaries
    def _capture_end(self, detected: str = "stage_end") -> None:
        """A known stage end (explicit stage exit, framework boundary, close): hash everything."""
        if self._book.capture_end(detected):
            self._refs.complete_end(self._book.current, self._book.internal, self._book.stored)
            self._flush()

    def _stage_began(self, stage: StageRecord, trainable: list[int]) -> None:
        """A stage's first step is about to apply: the previous stage's end (if found only now)
        completed, and W_ref taken of tensors trainable for the first time, checked against
        their hash at this stage's start (docs/recording.md, "The reference")."""
        if len(self._stages) > 1 and self._stages[-2].session == self.session:
            self._refs.complete_end(self._stages[-2], self._book.internal, self._book.stored)
        if any(self._ref[i] is None for i in trainable):
            self._refs.take(trainable, self._book.internal(stage.start_hashes), self._step)

    # ------------------------------------------------------------------ the store
    def _manifest_bytes(self, complete: bool) -> bytes:
        """The manifest a flush writes (docs/run-format.md), as `json.dumps` gives it; the
        model's lists come encoded from the map (ModelMap.model_json)."""
        enc = json.JSONEncoder(allow_nan=False).encode
        head = {
            "schema": "freezeframe.run/1", "schema_version": 1, "framework": self.options.framework,
            "created": self._created, "complete": complete, "steps_total": self._step,
            "reference": bool(self.options.reference),
            "ref_norms": [_finite(x) for x in stored_list(self._ref_norms, self._p0, self._P, self._B)],
            "reference_hashes": getattr(self, "_reference_hashes", None),
            **(self._refs.manifest_fields(self._p0, self._P, self._B) if hasattr(self, "_refs") else {}),
        }
        order = getattr(getattr(self, "_order", None), "order", getattr(self, "_first_order", None))
        tail = {"sessions": self._sessions, "stages": [s.to_json() for s in self._stages],
                "error": getattr(self, "_error", None)}
        return (enc(head)[:-1] + ', "signature": ' + self.map.signature_json()
                + ', "model": ' + self.map.model_json(order) + ", " + enc(tail)[1:]).encode()

    def _flush(self, complete: bool = False) -> None:
        if self._writer.error is not None:
            # kept set: the writer writes nothing after its first failure, so what reaches the
            # disk stays a prefix of the steps (a later flush must not land after a lost one)
            err = self._writer.failure
            raise RuntimeError(f"writing the run failed: {err}") from err
        manifest = self._manifest_bytes(complete)
        reference = self._refs.pending()  # W_ref taken since the last hand-over: written before the manifest
        if reference:
            self._writer.submit(self._cols.take(), manifest, reference)
        else:
            self._writer.submit(self._cols.take(), manifest)
        self._last_flush = time.monotonic()


def _finite(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None
