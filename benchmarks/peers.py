"""Peers: the tools people use today to watch parameters and gradients, attached to model B the way
their documentation says, each measured against the same plain training as freezeframe.

- `wandb.watch(model, log="all", log_freq=N)` in offline mode, with `run.log({"loss": ...})` after
  every step (wandb.watch computes its histograms in hooks during forward and backward and sends
  them with the next committed `run.log`).
- TensorBoard: `SummaryWriter.add_histogram` of every parameter and every gradient, from an
  optimizer step pre-hook (after backward, before the update), every step or every N steps.

Each peer is imported inside its attach function: a peer that is not installed raises
`PeerUnavailable` and its rows are skipped with the reason printed.

Draining. The benchmark calls `Attached.drain()` right after B's step, inside B's timed region, so
background work cannot land in the plain model's next step:
- TensorBoard's event writer is a thread of this process: `writer.flush()` waits until its queue is
  written; its CPU time is in the process's CPU time anyway.
- wandb hands every record to a separate service process (`wandb-core`) over a socket. The drain,
  after each step whose hooks logged histograms, is `run.status()`, a request the service answers
  after it has handled the records sent before it (offline, the committed history row with the
  histograms goes to the run's `.wandb` transaction log); after the other steps only the loss went
  out and there is no round trip (on a 3 ms MLP step one would cost more than W&B's own work). What
  the service still does after answering is not waited for; it is counted instead: the
  service's CPU time (every thread of every process wandb started, from /proc/<pid>/task/*/schedstat,
  nanoseconds) is read between A's and B's windows, added to B's CPU time, and the part that ran
  during A's window is reported as "svc CPU in A" (the work the drain did not catch; it slows A,
  so the wall-clock ratio errs in W&B's favour). Waiting for the service to go idle instead would
  add a polling interval to every step, which on a 3 ms MLP step would weigh more than W&B itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from instruments import Attached, PeerUnavailable

# Peers that were tried and are not measured, with the reason (shown under the tables).
ABSENT = {
    "cockpit (cockpit-for-pytorch 1.0.2, backpack-for-pytorch 1.7.1)":
        "installs against torch 2.14.1 but does not import with the pinned setuptools 84.2.1: "
        "`ModuleNotFoundError: No module named 'pkg_resources'` (from `cockpit/__init__.py`); with "
        "setuptools < 81 it imports, but BackPACK's hooks fail on torchvision's ResNet-18 (`RuntimeError: "
        "Output 0 of BackwardHookFunction is a view and is being modified inplace`), and it needs its own "
        "backward (BackPACK extensions, per-sample losses) rather than watching an unchanged step.",
}


# --------------------------------------------------------------------------- helper processes
class HelperProcesses:
    """CPU time and memory of the processes an instrument started (descendants of this process that
    were not there before it attached). CPU time comes from /proc/<pid>/task/*/schedstat (ns
    resolution) where available, else psutil's user+system times (clock ticks)."""

    def __init__(self, before: set[int]):
        self.before = before
        self.procs: dict[int, object] = {}
        self.last: dict[int, float] = {}        # last CPU seconds seen per pid (kept once it exits)
        self.calls = 0
        self.refresh()

    @staticmethod
    def children() -> list:
        try:
            import psutil
        except ImportError:
            return []
        return psutil.Process().children(recursive=True)

    def refresh(self) -> None:
        for p in self.children():
            if p.pid not in self.before and p.pid not in self.procs:
                self.procs[p.pid] = p

    @staticmethod
    def _cpu_of(pid: int, proc) -> float:
        task_dir = f"/proc/{pid}/task"
        try:
            total = 0
            for tid in os.listdir(task_dir):
                try:
                    with open(f"{task_dir}/{tid}/schedstat") as f:
                        total += int(f.read().split()[0])
                except (FileNotFoundError, ProcessLookupError):
                    pass                        # a thread that just exited
            return total / 1e9
        except OSError:
            t = proc.cpu_times()
            return t.user + t.system

    def cpu_s(self) -> float:
        self.calls += 1
        if self.calls % 64 == 0:                # pick up processes started later
            self.refresh()
        for pid, proc in self.procs.items():
            try:
                self.last[pid] = max(self.last.get(pid, 0.0), self._cpu_of(pid, proc))
            except Exception:                   # exited: keep its last value
                pass
        return sum(self.last.values())

    def rss(self) -> int:
        total = 0
        for proc in self.procs.values():
            try:
                total += proc.memory_info().rss
            except Exception:
                pass
        return total

    def names(self) -> list[str]:
        out = []
        for proc in self.procs.values():
            try:
                out.append(proc.name())
            except Exception:
                pass
        return out


def _dir_bytes(path: Path, suffix: str | None = None) -> int:
    return sum(f.stat().st_size for f in path.rglob("*")
               if f.is_file() and (suffix is None or f.name.endswith(suffix)))


def _written(data_bytes: int, all_bytes: int, recorded_steps: int, tensors: int, files: dict) -> dict:
    rows = recorded_steps * tensors
    return {
        "kind": "peer", "sizes": files, "tensor_rows": rows, "recorded_steps": recorded_steps,
        "tensors_per_recorded_step": tensors,
        "bytes_per_tensor_step": data_bytes / rows if rows else None,
        "log_bytes_per_tensor_step": all_bytes / rows if rows else None,
    }


class _StepCounter:
    """Counts B's optimizer steps since attaching (a step post-hook)."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.n = 0
        self.handle = opt.register_step_post_hook(self._post)

    def _post(self, opt, args, kwargs) -> None:
        self.n += 1


# --------------------------------------------------------------------------- wandb
def attach_wandb(log_freq: int):
    """`wandb.watch(model, log="all", log_freq=log_freq)` on an offline run of its own, and
    `run.log({"loss": loss.item()})` after each step (inside B's timed region)."""

    def attach(model: nn.Module, opt: torch.optim.Optimizer, workdir: Path) -> Attached:
        try:
            import wandb
        except ImportError as e:
            raise PeerUnavailable(f"wandb is not installed ({e})") from None
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        before = {p.pid for p in HelperProcesses.children()}
        # Its own run for each case; "finish_previous" because wandb.watch's hooks log to the global
        # `wandb.run`, which "create_new" would not set.
        run = wandb.init(mode="offline", dir=str(workdir), project="freezeframe-bench",
                         name=f"watch-log_freq-{log_freq}", reinit="finish_previous",
                         settings=wandb.Settings(silent=True))
        helpers = HelperProcesses(before)
        run.watch(model, log="all", log_freq=log_freq)
        counter = _StepCounter(opt)
        trainable = [p for p in model.parameters() if p.requires_grad]
        state = {"closed": False}

        def after_step(loss: torch.Tensor) -> None:
            run.log({"loss": loss.item()})      # commits the histograms the hooks logged this step

        def close() -> None:
            counter.handle.remove()
            run.unwatch(model)
            run.finish()
            state["cpu_s"], state["rss"] = helpers.cpu_s(), helpers.rss()
            wandb.teardown()                    # stop the service: nothing of it runs into later cases
            state["closed"] = True

        def written() -> dict:
            data = _dir_bytes(workdir, ".wandb")
            return _written(data, _dir_bytes(workdir), counter.n // log_freq, len(trainable),
                            {"transaction_log": data, "run_dir": _dir_bytes(workdir)})

        def drain() -> None:
            # A round trip to the service after the steps whose hooks logged histograms; after the
            # others only the loss went out (its handling is counted in the CPU ratio): a round trip
            # each step would cost a 3 ms step more than W&B's own work.
            if counter.n and counter.n % log_freq == 0 and state.get("drained") != counter.n:
                run.status()
                state["drained"] = counter.n

        return Attached(
            drain=drain, close=close, every=lambda: log_freq,
            # wandb.watch's hooks count forwards (parameters) and gradients (one per tensor) since
            # watching began and log on every log_freq-th: the n-th step since attaching (1-based)
            # records when n % log_freq == 0.
            due=lambda: (log_freq - (counter.n + 1) % log_freq) % log_freq,
            after_step=after_step, helper_cpu=helpers.cpu_s, helper_rss=helpers.rss, written=written,
            info=lambda: {"wandb": wandb.__version__, "helpers": helpers.names(),
                          "recorded_steps": counter.n // log_freq},
        )
    return attach


# --------------------------------------------------------------------------- TensorBoard
def attach_tensorboard(every: int):
    """`SummaryWriter.add_histogram` of every parameter and gradient, every `every` steps (the first
    step after attaching included), from an optimizer step pre-hook; drain = `writer.flush()`."""

    def attach(model: nn.Module, opt: torch.optim.Optimizer, workdir: Path) -> Attached:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise PeerUnavailable(f"TensorBoard is not installed ({e})") from None
        log_dir = workdir / "tb"
        writer = SummaryWriter(log_dir=str(log_dir))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        count = {"steps": 0, "recorded": 0}

        def pre(optimizer, args, kwargs) -> None:
            n = count["steps"]
            count["steps"] += 1
            if n % every:
                return
            count["recorded"] += 1
            for name, p in named:
                writer.add_histogram(f"parameters/{name}", p.detach(), n)
                if p.grad is not None:
                    writer.add_histogram(f"gradients/{name}", p.grad, n)

        handle = opt.register_step_pre_hook(pre)

        def close() -> None:
            handle.remove()
            writer.close()

        def written() -> dict:
            data = _dir_bytes(log_dir)
            return _written(data, data, count["recorded"], len(named), {"event_files": data})

        return Attached(
            drain=writer.flush, close=close, every=lambda: every,
            due=lambda: (-count["steps"]) % every, written=written,
            info=lambda: {"recorded_steps": count["recorded"]},
        )
    return attach
