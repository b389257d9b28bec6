"""torch.distributed, as the recorder needs it: who writes (rank 0), and agreeing on decisions."""

from __future__ import annotations

import torch


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


def agree_on_every(dist: Dist, sampler, *, failed: bool) -> None:
    """Rank 0's `every` for all ranks, and whether any rank's recorder failed: one all_reduce that
    every rank enters, a failed one too, so none is left waiting. Raises on the healthy ranks
    when another failed: all ranks stop recording together."""
    mine = sampler.every if (dist.writes and not failed) else 0
    every, any_failed = dist.agree_max([float(mine or 0), 1.0 if failed else 0.0])
    if failed:
        return
    if any_failed:
        raise RuntimeError("another rank's recorder failed; all ranks stop recording together")
    sampler.impose(int(every))


def join_agreement_when_due(dist: Dist, sampler, hookables: list, first_step_seen: bool) -> None:
    """After a recorder failed under torch.distributed: still enter the one scheduled collective
    (the calibration agreement) with the failure flag, counting steps as the sampler does."""
    handles = []
    seen = [first_step_seen]

    def pre_step(*_):
        if not seen[0]:  # this rank's first step: not counted by the sampler either
            seen[0] = True
            return
        if sampler.observe(None):
            for h in handles:
                h.remove()
            try:
                agree_on_every(dist, sampler, failed=True)
            except Exception:  # noqa: BLE001 - the process group itself is gone
                pass

    for opt in hookables:
        handles.append(opt.register_step_pre_hook(pre_step))


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
