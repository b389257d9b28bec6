"""Content hashes of tensors: bitwise identity, shared by the recorder and the checkpoint diff."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch

Tensor = torch.Tensor


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
