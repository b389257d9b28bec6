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
