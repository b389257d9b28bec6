"""Fine-tune a ResNet-18 under DistributedDataParallel, watched by freezeframe: every rank records, rank 0 writes.

    torchrun --nproc_per_node 2 examples/ddp.py --out runs/ddp
    freezeframe summary runs/ddp

Two stages: "head" (the body frozen, only `fc` trains), then "all" (everything trains). The data
is synthetic (random 64 px images), so nothing is downloaded; torchvision provides the model.

    torchrun --nproc_per_node 2 examples/ddp.py --out runs/ddp-cost --measure

times what recording costs each rank: two identical DDP models stepped in turn (alternating which goes first), one plain
and one watched with `every=4`; the medians of a plain step, a watched step without tensor
metrics and a watched step with them (every 4th) are printed per rank.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import freezeframe


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the run directory (written by rank 0)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per stage")
    ap.add_argument("--batch", type=int, default=16, help="images per rank per step")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--every", type=int, default=None, help="tensor metrics every N steps (default: calibrated)")
    ap.add_argument("--measure", action="store_true", help="time recorded, unrecorded and plain steps per rank")
    ap.add_argument("--measure-steps", type=int, default=40, help="steps timed per model with --measure")
    return ap.parse_args()


def build_model(device):
    from torchvision.models import resnet18

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    return resnet18(num_classes=10).to(device)


def batch(step: int, args, device):
    """This rank's batch of the step: a different slice of the global batch on every rank."""
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    return x.to(device), y.to(device)


def train_step(net, opt, step: int, args, device) -> torch.Tensor:
    x, y = batch(step, args, device)
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # DDP averages the ranks' gradients here
    opt.step()       # freezeframe's step hooks run around this call
    return loss


def set_body_trainable(model, trainable: bool) -> None:
    for name, p in model.named_parameters():
        if not name.startswith("fc."):
            p.requires_grad_(trainable)


def fine_tune(args, device) -> None:
    model = build_model(device)
    # Wrap while every tensor is trainable: DDP synchronises only the gradients of tensors that
    # require grad when it is built. find_unused_parameters: the frozen body has no gradient.
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = 0
    # Every rank calls watch() with the same arguments: all ranks record, so that they take the
    # same decisions; only rank 0 writes the run. Names are the model's own (no "module.").
    with freezeframe.watch(net, opt, args.out, every=args.every) as rec:
        set_body_trainable(model, False)
        with rec.stage("head"):
            for _ in range(args.steps):
                rec.log(loss=train_step(net, opt, step, args, device))
                step += 1
        set_body_trainable(model, True)
        with rec.stage("all"):
            for _ in range(args.steps):
                rec.log(loss=train_step(net, opt, step, args, device))
                step += 1
    if dist.get_rank() == 0:
        run = freezeframe.load(args.out)
        print(run)
        print(f"read it with: freezeframe summary {args.out}")


def measure(args, device) -> None:
    """Per rank: medians of a plain step, of a watched step without and with tensor metrics."""
    every, n, warmup = 4, args.measure_steps, 2
    plain, watched = build_model(device), build_model(device)
    ids = [device.index] if device.type == "cuda" else None
    net_a, net_b = DDP(plain, device_ids=ids), DDP(watched, device_ids=ids)
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_b = torch.optim.SGD(watched.parameters(), lr=0.01, momentum=0.9)
    times = {"plain": [], "unrecorded": [], "recorded": []}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with freezeframe.watch(net_b, opt_b, args.out, every=every) as rec, rec.stage("measure"):
        for i in range(warmup + n):
            # the same step of both models, in alternating order (every rank in the same
            # order, so that their collectives match)
            took = {}
            for name, net, opt in sorted([("a", net_a, opt_a), ("b", net_b, opt_b)], reverse=bool(i % 2)):
                sync()
                t0 = time.perf_counter()
                train_step(net, opt, i, args, device)
                sync()
                took[name] = time.perf_counter() - t0
            if i >= warmup:
                times["plain"].append(took["a"])
                # step i of the stage has tensor metrics when i % every == 0 (step 0 also
                # hashes every tensor: the stage's start, left out here)
                times["unrecorded" if i % every else "recorded"].append(took["b"])
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (dist.get_rank(), med, {k: len(v) for k, v in times.items()}))
    if dist.get_rank() == 0:
        print(f"ResNet-18, {args.size} px, batch {args.batch} per rank, {dist.get_world_size()} ranks, "
              f"every={every}, {n} timed steps per model (median seconds per step)")
        print(f"{'rank':>4} {'plain':>8} {'unrecorded':>11} {'recorded':>9} {'unrec/plain':>12} {'rec/plain':>10}")
        for r, m, counts in rows:
            print(f"{r:>4} {m['plain']:8.4f} {m['unrecorded']:11.4f} {m['recorded']:9.4f} "
                  f"{m['unrecorded'] / m['plain']:12.3f} {m['recorded'] / m['plain']:10.3f}")


def main() -> None:
    args = parse_args()
    if torch.cuda.is_available():
        dist.init_process_group("nccl")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    try:
        measure(args, device) if args.measure else fine_tune(args, device)
    finally:
        dist.barrier()  # without it a rank sometimes aborts while another is still tearing down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
