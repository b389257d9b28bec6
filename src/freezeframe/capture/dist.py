"""torch.distributed, as the recorder needs it: who writes (rank 0), and how ranks agree before
every collective so that a rank whose recorder failed never leaves the others waiting."""

from __future__ import annotations

import torch


class PeerFailed(RuntimeError):
    """Another rank's recorder failed: every rank stops recording together."""


class Dist:
    """The process group's facts. Outside torch.distributed: rank 0 of 1, and `agree` is local."""

    def __init__(self):
        import torch.distributed as d

        self.on = d.is_available() and d.is_initialized()
        self.rank = d.get_rank() if self.on else 0
        self.world = d.get_world_size() if self.on else 1
        backend = d.get_backend() if self.on else None
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if backend is not None and "nccl" in str(backend) else torch.device("cpu"))

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def agree_max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over all ranks (one all_reduce; every rank must call it)."""
        if not self.on:
            return list(values)
        import torch.distributed as d

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        d.all_reduce(t, op=d.ReduceOp.MAX)
        return t.cpu().tolist()


class Concord:
    """The failure protocol of a distributed recording.

    Every collective of the recorder (the agreement on `every`, the cross-rank norms and the
    gathers for content hashes under FSDP2) is preceded by an *agreement*: one small all_reduce
    of (failed, value) on a control group of the recorder's own (gloo, on the CPU: no device
    sync, and never interleaved with the training's collectives). A healthy rank enters it with
    failed=0 and learns whether any rank failed; if one did, it raises `PeerFailed` and all ranks
    stop recording before the collective, so none is left waiting in it.

    A rank whose recorder fails cannot know where the others will next agree (that depends on
    state it may have lost), so it posts its flag once, without waiting (an asynchronous
    all_reduce): the others' next agreement, wherever it is, completes with it. Code between an
    agreement and its collectives does its local work first or defers its errors until the
    collectives are done (see `metrics.finish`, `hashing.content_hashes`)."""

    def __init__(self, dist: Dist):
        self.dist = dist
        self.on = dist.on and dist.world > 1
        self.group = None
        self._posted = None  # (tensor, work) of this rank's failure flag, kept alive until done
        if self.on:
            import torch.distributed as d

            self.group = d.new_group(backend="gloo")  # every rank calls watch(): a collective creation

    def agree(self, value: float = 0.0) -> float:
        """Healthy ranks, before a collective: the maximum of `value` over ranks. Raises
        PeerFailed when any rank has failed."""
        if not self.on:
            return value
        import torch.distributed as d

        t = torch.tensor([0.0, float(value)], dtype=torch.float64)
        d.all_reduce(t, op=d.ReduceOp.MAX, group=self.group)
        if t[0].item() > 0:
            raise PeerFailed("another rank's recorder failed; all ranks stop recording together")
        return t[1].item()

    def check(self) -> None:
        self.agree(0.0)

    def fail(self, exc: BaseException) -> None:
        """This rank's recorder failed (not because another did): post the flag, once, without
        waiting for the other ranks."""
        if not self.on or self._posted is not None or isinstance(exc, PeerFailed):
            return
        import torch.distributed as d

        try:
            t = torch.tensor([1.0, 0.0], dtype=torch.float64)
            self._posted = (t, d.all_reduce(t, op=d.ReduceOp.MAX, group=self.group, async_op=True))
        except Exception:  # noqa: BLE001 - the process group itself is gone: nobody is waiting
            self._posted = (None, None)


class NullWriter:
    """What ranks other than 0 write: nothing (rank 0 writes the run for the whole job)."""

    error = None
    bytes_written = 0

    def submit(self, tables, manifest) -> None:
        pass

    def drain(self) -> None:
        pass

    def close(self, compact: bool = True) -> None:
        pass
