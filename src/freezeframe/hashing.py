"""Content hashes of tensors: bitwise identity, shared by the recorder and the checkpoint diff."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch

Tensor = torch.Tensor


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_sharded(t: Tensor) -> bool:
    """A DTensor (FSDP2 `fully_shard`, tensor parallel): each rank holds a shard of it.
    (Plain tensors are told apart by type first: this runs for every tensor of a recorded step.)"""
    return type(t) not in _PLAIN and callable(getattr(t, "full_tensor", None))


def gathered(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective: every rank calls it, for the
    same tensors in the same order); any other tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def content_hash(t: Tensor) -> str:
    """blake2b-128 of dtype, shape and C-contiguous bytes: bitwise identity (NaN == NaN, -0 != +0).
    A DTensor is hashed whole (its shards gathered), so the hash equals a single process's."""
    return _digest(t, gathered(t.detach()))


CHUNK_BYTES = 16 << 20  # bytes copied at a time from an accelerator or out of a strided tensor


def _digest(t: Tensor, data: Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    for piece in _pieces(data):
        h.update(piece.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _pieces(data: Tensor):
    """The tensor's C-contiguous bytes as CPU tensors, in order, without a copy of the whole
    tensor: a contiguous CPU tensor is read in place; one on an accelerator or strided is copied
    CHUNK_BYTES at a time (whole rows along the first dimension, or within one row if a row is
    larger)."""
    if data.numel() == 0:
        return
    if data.device.type == "cpu" and data.is_contiguous():
        yield data.reshape(-1)
        return
    if data.dim() == 0 or data.numel() * data.element_size() <= CHUNK_BYTES:
        yield data.contiguous().cpu().reshape(-1)
        return
    row = data[0].numel() * data.element_size()
    if row > CHUNK_BYTES:
        for k in range(data.shape[0]):
            yield from _pieces(data[k])
        return
    step = max(CHUNK_BYTES // row, 1)
    for a in range(0, data.shape[0], step):
        yield data[a:a + step].contiguous().cpu().reshape(-1)


def content_hashes(tensors: list[Tensor], *, threads: int = 2, agree=None) -> list[str]:
    """Hash many tensors; hashlib releases the GIL on large inputs, so a small pool helps.

    DTensors are gathered one after another on this thread (collectives in a fixed order, after
    `agree()`, the ranks' agreement that none has failed). An error while hashing on this rank is
    raised only after the last gather, so the other ranks are never left waiting in one."""
    if not any(is_sharded(t) for t in tensors):
        if len(tensors) < 8 or threads <= 1:
            return [content_hash(t) for t in tensors]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(content_hash, tensors))
    if agree is not None:
        agree()
    out, error = [], None
    for t in tensors:
        data = gathered(t.detach())  # the collective
        try:
            out.append(_digest(t, data) if error is None else None)
        except Exception as e:  # noqa: BLE001 - raised below, once every gather is done
            error = e
            out.append(None)
    if error is not None:
        raise error
    return out
