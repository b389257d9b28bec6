"""Tensor metrics as pure functions: batched norms (torch._foreach_*), content hashes, one host sync."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

Tensor = torch.Tensor


def norms(tensors: list[Tensor]) -> list[Tensor]:
    """L2 norm of each tensor, as 0-dim float32 tensors on each tensor's own device (no sync).

    One fused `_foreach_norm` per (device, dtype) bucket; integer tensors are cast first."""
    out: list[Tensor | None] = [None] * len(tensors)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        buckets[(t.device, t.dtype)].append(i)
    for (device, dtype), idx in buckets.items():
        group = [tensors[i].detach() for i in idx]
        if not dtype.is_floating_point and not dtype.is_complex:
            group = [t.double() for t in group]
        res = torch._foreach_norm(group)
        for i, r in zip(idx, res):
            out[i] = r.float()
    return out  # type: ignore[return-value]


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
    copies = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(copies, [t.detach() for t in tensors])
    return copies


def update_norms(before: list[Tensor], after: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """(||W_before||, ||W_after - W_before||) for each pair; `before` is consumed (overwritten)."""
    if not before:
        return [], []
    before_norms = norms(before)
    torch._foreach_sub_(before, [a.detach() for a in after])  # before := before - after
    return before_norms, norms(before)


def distances(tensors: list[Tensor], refs: list[Tensor]) -> list[Tensor]:
    """||t - ref|| for each pair (ref may live on another device: then it is copied over)."""
    if not tensors:
        return []
    same = all(t.device == r.device and t.dtype == r.dtype for t, r in zip(tensors, refs))
    if same:
        diffs = torch._foreach_sub([t.detach() for t in tensors], refs)
    else:
        diffs = [t.detach() - r.to(device=t.device, dtype=t.dtype) for t, r in zip(tensors, refs)]
    return norms(diffs)


def content_hash(t: Tensor) -> str:
    """blake2b-128 of dtype, shape and C-contiguous bytes: bitwise identity (NaN == NaN, -0 != +0)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous().reshape(-1)
    if data.numel():
        h.update(data.view(torch.uint8).numpy().data)
    return h.hexdigest()


def content_hashes(tensors: list[Tensor], *, threads: int = 2) -> list[str]:
    """Hash many tensors; hashlib releases the GIL on large inputs, so a small pool helps."""
    if len(tensors) < 8 or threads <= 1:
        return [content_hash(t) for t in tensors]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(content_hash, tensors))
