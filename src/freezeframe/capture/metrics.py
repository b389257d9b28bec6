"""Tensor metrics as pure functions: batched norms (torch._foreach_*), content hashes, one host sync."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ..hashing import content_hash, content_hashes, is_sharded  # noqa: F401 - part of this module's API

Tensor = torch.Tensor


def _readable(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors to read from: as they are under no_grad (autograd records nothing then), else
    detached views. A recorded step measures under no_grad (`step_metrics`): no view per tensor."""
    return tensors if not torch.is_grad_enabled() else [t.detach() for t in tensors]


def norms(tensors: list[Tensor], deferred: list | None = None) -> list[Tensor]:
    """L2 norm of each tensor, as 0-dim float32 tensors on each tensor's own device (no sync).

    One fused `_foreach_norm` per (device, dtype) bucket; integer tensors are cast first.
    DTensors (FSDP2) are measured shard by shard on this rank; their squared partial norms are
    summed across the ranks holding the shards (one all_reduce per bucket of the same mesh and
    placements, a collective every rank enters), so the norms equal a single process's. With a
    `deferred` list those reductions wait there until `finish(deferred)`: all local work first,
    then the collectives, which a caller may precede with an agreement between ranks; the
    entries for DTensors are None until then."""
    out: list[Tensor | None] = [None] * len(tensors)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        mesh = (t.device_mesh, tuple(t.placements)) if is_sharded(t) else None
        buckets[(t.device, t.dtype, mesh)].append(i)
    pending = []
    for (device, dtype, mesh), idx in buckets.items():
        group = _readable([tensors[i] for i in idx])
        if mesh is not None:
            bad = [pl for pl in mesh[1] if not (pl.is_shard() or pl.is_replicate())]
            if bad:
                raise NotImplementedError(f"norms of a DTensor placed {bad[0]}")
            group = [t.to_local() for t in group]
        if not dtype.is_floating_point and not dtype.is_complex:
            group = [t.double() for t in group]
        res = torch._foreach_norm(group)
        if mesh is None:
            for i, r in zip(idx, res):
                out[i] = r if r.dtype == torch.float32 else r.float()
        else:
            pending.append(_Partial(torch.stack(res).double().square(), mesh, idx, out))
    if deferred is None:
        finish(pending)
    else:
        deferred.extend(pending)
    return out  # type: ignore[return-value]


class _Partial:
    """Squared norms of this rank's shards, to be summed over the mesh dimensions they are sharded on."""

    def __init__(self, squares: Tensor, mesh: tuple, idx: list[int], out: list):
        self.squares, self.mesh, self.idx, self.out = squares, mesh, idx, out


def finish(deferred: list) -> None:
    """The cross-rank reductions that `norms(..., deferred)` left: every collective first (every
    rank, same order), then the results filled in."""
    import torch.distributed as d

    for p in deferred:
        mesh, placements = p.mesh
        for dim, placement in enumerate(placements):
            if placement.is_shard():  # (replicated dimensions hold the same shard: nothing to add)
                d.all_reduce(p.squares, op=d.ReduceOp.SUM, group=mesh.get_group(dim))
    for p in deferred:
        for i, r in zip(p.idx, p.squares.sqrt().float().unbind(0)):
            p.out[i] = r
    deferred.clear()


def to_host(values: list[Tensor]) -> np.ndarray:
    """Bring many 0-dim device tensors to the host: one stack and one copy per device
    (a CPU-GPU sync point per device; on CPU-only models no sync at all)."""
    if not values:
        return np.zeros(0, dtype=np.float32)
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        by_device[v.device].append(i)
    out = np.empty(len(values), dtype=np.float32)
    for device, idx in by_device.items():
        stacked = torch.stack([values[i] for i in idx]).cpu().numpy()  # the sync
        out[idx] = stacked
    return out


def snapshot(tensors: list[Tensor]) -> list[Tensor]:
    """A detached copy of each tensor on its own device (W_before on recorded steps)."""
    if not tensors:
        return []
    if any(is_sharded(t) for t in tensors):  # DTensor has no sharding rule for _foreach_copy_
        return [t.detach().clone() for t in tensors]
    copies = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(copies, _readable(tensors))
    return copies


def update_norms(before: list[Tensor], after: list[Tensor], deferred: list | None = None
                 ) -> tuple[list[Tensor], list[Tensor]]:
    """(||W_before||, ||W_after - W_before||) for each pair; `before` is consumed (overwritten)."""
    if not before:
        return [], []
    before_norms = norms(before, deferred)
    torch._foreach_sub_(before, _readable(after))  # before := before - after
    return before_norms, norms(before, deferred)


def distances(tensors: list[Tensor], refs: list[Tensor], deferred: list | None = None) -> list[Tensor]:
    """||t - ref|| for each pair (ref may live on another device: then it is copied over)."""
    if not tensors:
        return []
    same = all(t.device == r.device and t.dtype == r.dtype for t, r in zip(tensors, refs))
    if same:
        diffs = torch._foreach_sub(_readable(tensors), refs)
    else:
        diffs = [t - r.to(device=t.device, dtype=t.dtype) for t, r in zip(_readable(tensors), refs)]
    return norms(diffs, deferred)


def distances_into(scratch: list[Tensor], tensors: list[Tensor], refs: list[Tensor],
                   deferred: list | None = None) -> list[Tensor]:
    """distances(), writing each difference into a scratch tensor of the same shape (the consumed
    W_before of this step): no fresh allocation of a model-sized buffer on a recorded step."""
    if not tensors:
        return []
    if not all(s.device == t.device == r.device and s.dtype == t.dtype == r.dtype and s.shape == t.shape
               and not is_sharded(t) for s, t, r in zip(scratch, tensors, refs)):
        return distances(tensors, refs, deferred)
    for s, t, r in zip(scratch, _readable(tensors), refs):
        torch.sub(t, r, out=s)
    return norms(scratch, deferred)


def _reduced(deferred: list, agree) -> None:
    """The deferred cross-rank reductions, preceded by the ranks' agreement (which raises,
    before any collective, when another rank's recorder has failed)."""
    if deferred:
        if agree is not None:
            agree()
        finish(deferred)


def _scatter(n: int, where: list[int], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros(n, dtype=np.float32)
    measured = np.zeros(n, dtype=bool)
    out[where] = values
    measured[where] = True
    return out, measured


def step_metrics(params: list[Tensor], before: list[Tensor], refs: list[Tensor | None],
                 buffers: list[Tensor], buffer_refs: list[Tensor | None], agree=None) -> tuple[tuple, tuple]:
    """The metrics of one recorded step, after it: for each param (W_before given, consumed) and
    buffer, (values, measured) pairs of grad_norm, update_norm, param_norm (||W_before||) and
    drift (||W - W_ref||). Gradients are read now, after the step (a closure may run inside it).
    One host sync for everything. Under FSDP2 the cross-rank sums come last, after `agree()`."""
    with torch.no_grad():  # reads only: tensors are taken as they are, no detached copies of each
        return _step_metrics(params, before, refs, buffers, buffer_refs, agree)


def _step_metrics(params: list[Tensor], before: list[Tensor], refs: list[Tensor | None],
                  buffers: list[Tensor], buffer_refs: list[Tensor | None], agree) -> tuple[tuple, tuple]:
    deferred: list = []
    p_norm, u_norm = update_norms(before, params, deferred)
    with_grad = [k for k, p in enumerate(params) if p.grad is not None]
    g_norm = norms([params[k].grad for k in with_grad], deferred)
    with_ref = [k for k, r in enumerate(refs) if r is not None]
    drift = distances_into([before[k] for k in with_ref], [params[k] for k in with_ref], [refs[k] for k in with_ref],
                           deferred)
    bref = [b for b, r in enumerate(buffer_refs) if r is not None]
    b_norm = norms(buffers, deferred)
    b_drift = distances([buffers[b] for b in bref], [buffer_refs[b] for b in bref], deferred)
    _reduced(deferred, agree)
    host = to_host(p_norm + u_norm + g_norm + drift + b_norm + b_drift)  # the one sync
    parts = np.split(host, np.cumsum([len(p_norm), len(u_norm), len(g_norm), len(drift), len(b_norm)]))
    n, B = len(params), len(buffers)
    none = (np.zeros(B, np.float32), np.zeros(B, bool))
    return ((_scatter(n, with_grad, parts[2]), (parts[1], None), (parts[0], None), _scatter(n, with_ref, parts[3])),
            (none, none, (parts[4], None), _scatter(B, bref, parts[5])))


def state_metrics(tensors: list[Tensor], refs: list[Tensor | None], skip: list[bool] | None = None,
                  agree=None) -> dict:
    """Exact ||W|| and ||W - W_ref|| of every tensor now (a stage end); None where `skip` or no ref."""
    n = len(tensors)
    keep = [i for i in range(n) if refs[i] is not None]
    deferred: list = []
    pn_t = norms(tensors, deferred)
    dr_t = distances([tensors[i] for i in keep], [refs[i] for i in keep], deferred)
    _reduced(deferred, agree)
    host = to_host(pn_t + dr_t)
    pn = [float(x) if np.isfinite(x) else None for x in host[:n]]
    dr: list = [None] * n
    for k, i in enumerate(keep):
        x = host[n + k]
        dr[i] = float(x) if np.isfinite(x) else None
    if skip is not None:
        for i, s in enumerate(skip):
            if s:
                pn[i] = dr[i] = None
    return {"param_norm": pn, "drift": dr}
