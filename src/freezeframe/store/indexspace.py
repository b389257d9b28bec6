"""The tensor index space of a stored run, and its one translation into the order readers use
(docs/run-format.md, "Tensor indices").

On disk, tensor indices are append-only: the parameters known when watching began (`P0` of
them), then the floating-point buffers (`B`), then parameters that appeared later under new
names, in the order they appeared. `model.buffers_at` in the manifest is `P0` (absent: the
number of parameters, i.e. no parameter was added). Readers see every parameter first, then
the buffers: `to_reader` below, applied once on load by `store.reader.read_run`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..errors import RunError

_PER_TENSOR = ("start_hashes", "end_hashes")
_PER_TENSOR_RUN = ("reference_hashes", "reference_taken", "reference_refused")
_PER_TENSOR_METRICS = ("param_norm", "drift")


def buffers_at(manifest: dict) -> int:
    """P0: the index of the first buffer in the stored index space."""
    model = manifest.get("model") or {}
    n = len(model.get("params") or [])
    at = model.get("buffers_at", n)
    if isinstance(at, bool) or not isinstance(at, int) or not 0 < at <= n:
        raise RunError(f"the manifest is damaged: model.buffers_at must be an integer from 1 to {n} "
                       f"(the number of parameters), got {ascii(at)[:40]}")
    return at


def reader_list(values: list | None, p0: int, n_params: int, n_buffers: int) -> list | None:
    """A per-tensor list in stored order [P0 params, buffers, added params] (possibly shorter: a
    stage recorded before later parameters appeared) as [all params, buffers], None where a
    tensor has no entry."""
    if values is None or not values:
        return values

    def at(i):
        return values[i] if i < len(values) else None

    return ([at(i) for i in range(p0)] + [at(p0 + n_buffers + k) for k in range(n_params - p0)]
            + [at(p0 + b) for b in range(n_buffers)])


def stored_list(values: list, p0: int, n_params: int, n_buffers: int) -> list:
    """The inverse of `reader_list` for a full list [all params, buffers] (the recorder's own order)."""
    return list(values[:p0]) + list(values[n_params:n_params + n_buffers]) + list(values[p0:n_params])


def stored_tensor_index(index: np.ndarray, p0: int, n_params: int, n_buffers: int) -> np.ndarray:
    """Reader (or recorder) indices [all params, buffers] as stored indices."""
    index = np.asarray(index)
    return np.where(index < p0, index, np.where(index < n_params, index + n_buffers, index - n_params + p0))


def to_reader(manifest: dict, tensors: pa.Table) -> tuple[dict, pa.Table]:
    """The manifest and tensors table in reader order. A run whose parameters never grew is
    returned as it is (the common case costs nothing)."""
    p0 = buffers_at(manifest)
    model = manifest["model"]
    for i, p in enumerate(model["params"]):
        k = p.get("from_stage")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise RunError(f"the manifest is damaged: model.params[{i}].from_stage must be an integer >= 0, "
                           f"got {ascii(k)[:40]}")
    P, B = len(model["params"]), len(model["buffers"])
    if p0 == P:
        return manifest, tensors
    m = dict(manifest)
    m["ref_norms"] = reader_list(manifest.get("ref_norms"), p0, P, B)
    for key in _PER_TENSOR_RUN:
        m[key] = reader_list(manifest.get(key), p0, P, B)
    stages = []
    for s in manifest.get("stages") or []:
        s = dict(s)
        for key in _PER_TENSOR:
            s[key] = reader_list(s.get(key), p0, P, B)
        em = s.get("end_metrics")
        if isinstance(em, dict):
            s["end_metrics"] = {k: (reader_list(v, p0, P, B) if k in _PER_TENSOR_METRICS else v)
                                for k, v in em.items()}
        stages.append(s)
    m["stages"] = stages
    return m, tensors_to_reader(manifest, tensors)


def tensors_to_reader(manifest: dict, tensors: pa.Table) -> pa.Table:
    """The `tensor` column of (part of) the stored tensors table in reader order (the stored
    manifest gives the index space); unchanged when no parameter was added."""
    p0 = buffers_at(manifest)
    P, B = len(manifest["model"]["params"]), len(manifest["model"]["buffers"])
    if p0 == P or not tensors.num_rows or "tensor" not in tensors.column_names:
        return tensors
    t = tensors.column("tensor").to_numpy(zero_copy_only=False).astype(np.int64)
    mapped = np.where(t < p0, t, np.where(t < p0 + B, t - p0 + P, t - B))
    return tensors.set_column(tensors.schema.get_field_index("tensor"), "tensor",
                              pa.array(mapped.astype(np.int32), type=pa.int32()))
