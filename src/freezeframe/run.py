"""`Run`: a stored run as the reader sees it — data that knows how to summarise and show itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .store.reader import StoredRun, read_run


class Run:
    """A recorded run, complete or interrupted. `summary()` is the "freezeframe.summary/1" dict;
    `steps()` the per-step rows; in a terminal (rich) or a notebook it displays itself."""

    def __init__(self, stored: StoredRun):
        self._stored = stored
        self._summary: dict | None = None

    @classmethod
    def load(cls, run_dir) -> "Run":
        return cls(read_run(run_dir))

    @property
    def path(self) -> Path:
        return self._stored.path

    @property
    def manifest(self) -> dict:
        return self._stored.manifest

    @property
    def warnings(self) -> list[str]:
        return list(self._read_whole().warnings)

    @property
    def live(self) -> bool:
        """The run's writer.lock is held by a live process: training is still in progress."""
        return self._stored.live

    @property
    def steps_expected(self) -> int | None:
        """The number of steps the manifest says were applied (its `steps_total`)."""
        return self._stored.steps_expected

    @property
    def unreadable(self) -> list[str]:
        """One line per chunk that could not be read (damaged or truncated)."""
        return list(self._read_whole().unreadable)

    @property
    def steps_read(self) -> int:
        """The number of step rows that could be read."""
        return self._stored.steps.num_rows

    def fully_read(self) -> bool:
        """Every chunk was read and at least the steps the manifest expects are there."""
        expected = self.steps_expected
        return not self._read_whole().unreadable and (expected is None or self.steps_read >= expected)

    def _read_whole(self) -> StoredRun:
        """The stored run once its tensors table has been read whole (the summary reads it, once):
        only then does `unreadable` name a chunk whose data is damaged (docs/run-format.md,
        "Reading a run")."""
        if not self._stored.tensors_checked:
            self.summary()
        return self._stored

    def summary(self) -> dict:
        if self._summary is None:
            from .analyse.summary import build_summary

            self._summary = build_summary(self._stored)
        return self._summary

    def findings(self) -> list[dict]:
        return self.summary()["findings"]

    def steps(self) -> pa.Table:
        """One row per applied optimizer step (columns in docs/run-format.md), with a `loss`
        column when the run logged one."""
        steps = self._stored.steps
        scal = self._stored.scalars
        if not scal.num_rows:
            return steps
        is_loss = np.asarray(pc.equal(scal.column("name"), "loss").to_numpy(zero_copy_only=False), dtype=bool)
        if not is_loss.any():
            return steps
        # the last value logged for each step (rows are in logging order)
        at = dict(zip(scal.column("step").to_numpy()[is_loss].tolist(),
                      scal.column("value").to_numpy()[is_loss].tolist()))
        loss = [at.get(s) for s in steps.column("step").to_pylist()]
        return steps.append_column("loss", pa.array(loss, type=pa.float64()))

    def tensors(self) -> pa.Table:
        """One row per recorded tensor per recorded step, with the tensor's name."""
        t = self._stored.tensors
        names = [p["name"] for p in self.manifest["model"]["params"]] + [b["name"] for b in self.manifest["model"]["buffers"]]
        name_col = pc.take(pa.array(names), t.column("tensor")) if t.num_rows else pa.array([], pa.string())
        return t.append_column("name", name_col)

    def scalars(self) -> pa.Table:
        return self._stored.scalars

    def reference(self) -> dict:
        """W_ref (the weights watching began with) by tensor name."""
        return self._stored.reference()

    def __rich__(self):
        from .render.terminal import run_renderable

        return run_renderable(self.summary())

    def _repr_html_(self) -> str:
        """Inline display in Jupyter: the freeze map, the answers and the findings (no JavaScript)."""
        from .render.notebook import repr_html

        return repr_html(self)

    def show(self, name: str):
        """One report figure as a plotly Figure: "freeze_map", "heatmap", "lr", "drift" or "loss"."""
        from .render.notebook import show

        return show(self, name)

    def __repr__(self) -> str:
        s = self.summary()["run"]
        return (f"<freezeframe.Run {str(self.path)!r}: {len(self.summary()['stages'])} stages, {s['steps']} steps, "
                f"{s['tensors_total']} tensors{_state(self, s)}>")


def _state(run: Run, s: dict) -> str:
    if run.live:
        return ", in progress"
    if not run.fully_read():
        return ", damaged: not every step could be read"
    return "" if s["complete"] else ", interrupted"
