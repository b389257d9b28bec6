"""Column buffers: rows accumulate as Python lists / numpy arrays and leave as Arrow tables at a flush."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from ..store import layout


def _floats(values: list) -> list:
    return [None if v is None or v != v else v for v in values]  # NaN -> null


def _step_columns(rows: list[tuple]) -> dict[str, list]:
    """The step tuples (Columns.add_step) as the steps table's columns (docs/run-format.md)."""
    if not rows:
        return {name: [] for name in layout.STEPS_SCHEMA.names}
    step, stage, session, optimizer, time, recorded, hypers, grads = (list(c) for c in zip(*rows))
    return {"step": step, "stage": stage, "session": session, "optimizer": optimizer, "time": time,
            "recorded": recorded,
            "lr": [_floats([h[0] for h in hs]) for hs in hypers],
            "momentum": [_floats([h[1] for h in hs]) for hs in hypers],
            "weight_decay": [_floats([h[2] for h in hs]) for hs in hypers],
            "grads": grads}


class Columns:
    """Thread-safe: the training thread adds rows, the writer thread may take them."""

    def __init__(self, n_params: int):
        self.n_params = n_params
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.steps: list[tuple] = []  # one tuple per step; columns are built at take()
        self.tensors: list[tuple] = []
        self.scalars: dict[str, list] = {name: [] for name in layout.SCALARS_SCHEMA.names}

    def add_step(self, step, stage, session, optimizer, time, recorded, hypers, grads) -> None:
        """`hypers`: (lr, momentum, weight_decay, ...) per param group, as applied by the step
        (OptimizerView.hypers); `grads`: the packed gradient mask. One tuple per step: the
        columns are built when the rows leave (a step pays one append)."""
        with self._lock:
            self.steps.append((step, stage, session, optimizer, time, recorded, hypers, grads))

    def add_tensors(self, step: int, tensor: np.ndarray, *metrics: tuple[np.ndarray, np.ndarray | None]) -> None:
        """`metrics`: (values, measured) for grad_norm, update_norm, param_norm, drift; a value
        not measured is stored as null (a measured NaN or Inf is kept: it is a finding)."""
        with self._lock:
            self.tensors.append((step, tensor, *metrics))

    def add_scalar(self, step: int, name: str, value: float) -> None:
        with self._lock:
            self.scalars["step"].append(step)
            self.scalars["name"].append(name)
            self.scalars["value"].append(value)

    def take(self) -> dict[str, pa.Table]:
        """Everything buffered, as tables; the buffers start empty again."""
        with self._lock:
            steps_cols, tensor_rows, scalar_cols = self.steps, self.tensors, self.scalars
            self._reset()
        steps = pa.Table.from_pydict(_step_columns(steps_cols), schema=layout.STEPS_SCHEMA)
        scalars = pa.Table.from_pydict(scalar_cols, schema=layout.SCALARS_SCHEMA)
        if tensor_rows:
            cols = list(zip(*tensor_rows))
            tensor = np.concatenate(cols[1])
            arrays = [pa.array(np.concatenate([np.full(len(t), s, dtype=np.int64) for s, t in zip(cols[0], cols[1])])),
                      pa.array(tensor)]
            for k in range(2, 6):
                v = np.concatenate([m[0] for m in cols[k]]).astype(np.float32)
                measured = np.concatenate([np.ones(len(m[0]), bool) if m[1] is None else m[1] for m in cols[k]])
                arrays.append(pa.array(v, mask=~measured))
            tensors = pa.Table.from_arrays(arrays, schema=layout.TENSORS_SCHEMA)
        else:
            tensors = layout.TENSORS_SCHEMA.empty_table()
        return {layout.STEPS: steps, layout.TENSORS: tensors, layout.SCALARS: scalars}
