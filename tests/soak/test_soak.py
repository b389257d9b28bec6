"""Soak: 20,000 recorded steps (`every=1`) of a small MLP (10 tensors) with the loss logged at every
step. The training process's memory (VmRSS) must stay within a fixed bound after a warm-up, and the
stored log within its budget: <= 32 bytes per tensor per recorded step after the compaction at close
(DESIGN.md, "Budgets"). Prints the figures. Runs only with `make soak` (see conftest.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import freezeframe

STEPS = 20_000
SAMPLE_EVERY = 1_000
WARMUP = 2_000
PLAIN_STEPS = 2_000
RSS_GROWTH_LIMIT_MB = 30.0
BYTES_PER_TENSOR_STEP = 32.0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError("no VmRSS in /proc/self/status")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_soak_memory_stays_bounded_and_the_log_within_its_budget(tmp_path, capsys):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32),
                          nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    n_tensors = len(list(model.parameters()))
    assert n_tensors == 10
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(16)]
    run_dir = tmp_path / "soak"

    def train_step(step):
        x, y = data[step % len(data)]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    for step in range(PLAIN_STEPS):  # the same loop unwatched, for scale (not asserted)
        train_step(step)
    plain_ms = 1000 * (time.perf_counter() - t0) / PLAIN_STEPS
    samples: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    with freezeframe.watch(model, opt, run_dir, every=1) as rec:
        for step in range(STEPS):
            loss = train_step(step)
            rec.log(loss=loss)
            if (step + 1) % SAMPLE_EVERY == 0:
                samples.append((step + 1, rss_mb()))
        train_s = time.perf_counter() - t0
    close_s = time.perf_counter() - t0 - train_s

    t1 = time.perf_counter()
    run = freezeframe.load(run_dir)
    summary = run.summary()
    load_s = time.perf_counter() - t1
    recorded = sum(run.steps().column("recorded").to_pylist())
    tensor_rows = run.tensors().num_rows
    total_bytes = dir_bytes(run_dir)
    chunk_bytes = sum(dir_bytes(run_dir / t) for t in ("steps", "tensors", "scalars"))
    per_tensor_step = total_bytes / (recorded * n_tensors)

    base = next(mb for s, mb in samples if s == WARMUP)
    after = [mb for s, mb in samples if s >= WARMUP]
    growth = max(after) - base
    figures = {
        "steps": summary["run"]["steps"], "recorded_steps": recorded, "tensors": n_tensors,
        "tensor_rows": tensor_rows, "train_s": round(train_s, 1), "close_s": round(close_s, 2),
        "load_and_summary_s": round(load_s, 2), "ms_per_step": round(1000 * train_s / STEPS, 3),
        "ms_per_step_unwatched": round(plain_ms, 3),
        "rss_mb": {"at_1000": samples[0][1], "at_warmup": base, "end": samples[-1][1], "max": max(mb for _, mb in samples),
                   "growth_after_warmup": round(growth, 1), "limit": RSS_GROWTH_LIMIT_MB},
        "run_dir_bytes": total_bytes, "chunk_bytes": chunk_bytes,
        "files": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()),
        "bytes_per_tensor_step": round(per_tensor_step, 2), "budget": BYTES_PER_TENSOR_STEP,
        "rss_samples_mb": [round(mb, 1) for _, mb in samples],
    }
    with capsys.disabled():
        print("\nfreezeframe soak figures: " + json.dumps(figures, indent=1))

    assert summary["run"]["steps"] == STEPS and summary["run"]["complete"] is True
    assert recorded == STEPS and tensor_rows == STEPS * n_tensors
    assert run.scalars().num_rows == STEPS
    assert run.warnings == []
    assert growth <= RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.1f} MB after the warm-up: {figures['rss_samples_mb']}"
    assert per_tensor_step <= BYTES_PER_TENSOR_STEP, (
        f"{per_tensor_step:.2f} bytes per tensor per recorded step ({total_bytes} bytes)")
