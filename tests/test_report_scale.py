"""Report size: a very large run (200 tensors × 20,000 steps, every step recorded) makes a report
within its budget (≤ 3 MiB; the heatmap binned to its cell budget, and saying so); the demo's and a
fastai resnet34 run's reports are ≤ 3 MiB, with plotly.js the vendored cartesian bundle."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

import freezeframe
from freezeframe.analyse.figures import MAX_HEATMAP_CELLS, from_run, heatmap_columns
from freezeframe.render.html import render_html
from freezeframe.store import layout

MiB = 1024 * 1024
MIB = 1024 * 1024
VENDOR = Path(freezeframe.__file__).parent / "render" / "vendor"


def synthetic_run(run_dir, *, steps_per_stage: int = 10_000, blocks: int = 10, width: int = 10, seed: int = 0):
    """Record a tiny real two-stage run of a model with blocks × width Linear(1, 1) (200 tensors,
    3 param groups, the first block frozen in stage 0), then write its tables at full size with
    the store's schemas: every tensor trainable in a stage has a row at every step."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Sequential(*[nn.Linear(1, 1) for _ in range(width)]) for _ in range(blocks)])
    groups = [list(model[:5].parameters()), list(model[5:9].parameters()), list(model[9].parameters())]
    opt = torch.optim.SGD([{"params": g} for g in groups], lr=0.1)
    x = torch.randn(4, 1)
    with freezeframe.watch(model, opt, run_dir, every=1, mode="new") as rec:
        for p in model[0].parameters():
            p.requires_grad_(False)
        for name in ("body frozen", "unfrozen"):
            with rec.stage(name):
                for _ in range(2):
                    opt.zero_grad()
                    model(x).sum().backward()
                    opt.step()
            for p in model.parameters():
                p.requires_grad_(True)

    m = json.loads((run_dir / layout.MANIFEST).read_text())
    P, S = len(m["model"]["params"]), steps_per_stage
    rng = np.random.default_rng(seed)
    step = np.arange(2 * S, dtype=np.int64)
    stage = (step >= S).astype(np.int32)
    cycle = 0.1 * np.sin(np.pi * np.linspace(1e-3, 1, S)) + 1e-6
    lr = [[float(v)] * 3 for v in cycle] + [[float(v * 1e-2), float(v * 1e-1), float(v)] for v in cycle]
    trainable = [m["stages"][k]["trainable"] for k in range(2)]
    masks = []
    for k in range(2):
        bits = np.zeros(P, dtype=np.uint8)
        bits[trainable[k]] = 1
        masks.append(np.packbits(bits).tobytes())
    tables = {layout.STEPS: pa.Table.from_pydict({
        "step": step, "stage": stage, "session": np.zeros(2 * S, np.int32), "optimizer": np.zeros(2 * S, np.int16),
        "time": 1.7e9 + step * 0.01, "recorded": np.ones(2 * S, bool), "lr": lr, "momentum": [[0.9] * 3] * (2 * S),
        "weight_decay": [[0.0] * 3] * (2 * S), "grads": [masks[k] for k in stage]}, schema=layout.STEPS_SCHEMA)}
    t_step = np.concatenate([np.repeat(np.arange(k * S, (k + 1) * S), len(trainable[k])) for k in range(2)])
    t_tensor = np.concatenate([np.tile(np.asarray(trainable[k], np.int32), S) for k in range(2)])
    pn = rng.uniform(0.5, 2.0, P).astype(np.float32)[t_tensor]
    un = (pn * 10 ** rng.normal(-3, 0.5, len(t_step))).astype(np.float32)
    tables[layout.TENSORS] = pa.Table.from_pydict({
        "step": t_step, "tensor": t_tensor, "grad_norm": un * 3, "update_norm": un, "param_norm": pn,
        "drift": (pn * 0.01 * t_step / (2 * S)).astype(np.float32)}, schema=layout.TENSORS_SCHEMA)
    tables[layout.SCALARS] = pa.Table.from_pydict({
        "step": step, "name": ["loss"] * (2 * S), "value": 2.0 * np.exp(-step / 5000) + rng.normal(0, 0.05, 2 * S)},
        schema=layout.SCALARS_SCHEMA)
    for name, table in tables.items():
        shutil.rmtree(run_dir / name)
        (run_dir / name).mkdir()
        pq.write_table(table, run_dir / layout.chunk_name(name, 1, 0), compression="zstd")
    for k in range(2):
        m["stages"][k].update(first_step=k * S, last_step=(k + 1) * S - 1, steps=S)
    m["steps_total"] = 2 * S
    (run_dir / layout.MANIFEST).write_text(json.dumps(m))


def test_200_tensors_by_20000_steps_stays_within_3_mib(tmp_path):
    run_dir = tmp_path / "big"
    synthetic_run(run_dir)
    run = freezeframe.load(run_dir)
    assert run.summary()["run"]["tensors_total"] == 200 and run.summary()["run"]["steps"] == 20_000
    assert run._stored.tensors.num_rows == 10_000 * 180 + 10_000 * 200
    data = from_run(run)
    hm = data["heatmap"]
    assert hm["downsampled"] and hm["values"].shape == (100, 1_000) == (100, heatmap_columns(100))
    assert hm["values"].size <= MAX_HEATMAP_CELLS
    assert "downsampled" in hm["note"] and "median" in hm["note"]
    assert set(hm["stage_of_column"].tolist()) == {0, 1}
    text = render_html(run, data=data)
    assert "downsampled: 20,000 recorded steps shown as 1,000 columns" in text
    assert len(text.encode("utf-8")) <= 3 * MiB  # DESIGN.md "Budgets": whatever the step count


def _scripts(text: str) -> list[str]:
    return re.findall(r"<script>(.*?)</script>", text, re.S)


def test_the_report_inlines_the_vendored_cartesian_bundle(tmp_path):
    """plotly.js is render/vendor's partial bundle (with its licence and where it came from), not
    the plotly Python package's full one: the report is drawn without importing plotly at all."""
    bundle = (VENDOR / "plotly-cartesian.min.js").read_text(encoding="utf-8")
    version = re.search(r"plotly\.js \(cartesian - minified\) v(\d+\.\d+\.\d+)", bundle[:400]).group(1)
    readme = (VENDOR / "README.md").read_text()
    assert f"v{version}" in readme and "npm pack plotly.js-cartesian-dist-min" in readme
    assert "MIT License" in (VENDOR / "LICENSE").read_text()
    for trace in ("heatmap", "scatter", "bar"):                     # the trace types the report draws
        assert re.search(rf'name:"{trace}"', bundle), trace
    run_dir = tmp_path / "run"
    synthetic_run(run_dir, steps_per_stage=50)
    code = ("import sys; import freezeframe; from freezeframe.render.html import render_html; "
            "t = render_html(freezeframe.load(sys.argv[1])); sys.stdout.write(t); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'plotly'); assert not bad, bad")
    text = subprocess.run([sys.executable, "-c", code, str(run_dir)], check=True, capture_output=True,
                          text=True, timeout=300).stdout
    assert _scripts(text)[0] == bundle                             # inlined whole, once
    assert text.count("Copyright 2012-") == 1


def test_the_demo_report_is_within_3_mib(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", FREEZEFRAME_CACHE=str(tmp_path / "cache"))
    exe = str(Path(sys.executable).parent / "freezeframe")
    proc = subprocess.run([exe, "demo", "--out", str(tmp_path / "demo")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = tmp_path / "demo" / "report.html"
    text = report.read_text(encoding="utf-8")
    assert 'id="fig-heatmap"' in text and 'id="between"' in text
    assert report.stat().st_size <= 3 * MIB, report.stat().st_size


def test_a_fastai_resnet34_report_is_within_3_mib(tmp_path):
    import torch

    fh = __import__("fastai_helpers")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path / "run"
        learn = fh.resnet_learner(tmp_path, n_train=24, bs=4, cbs=[fh.watching(run_dir, every=1)])
        learn.fine_tune(2)                                            # 6 frozen steps, then 12 unfrozen
        fh.collect()
    finally:
        torch.set_num_threads(before)
    run = freezeframe.load(run_dir)
    summary = run.summary()
    assert summary["run"]["tensors_total"] > 100 and summary["run"]["steps"] == 18
    text = render_html(run)
    assert len(text.encode("utf-8")) <= 3 * MIB
    data = from_run(run)
    assert len(data["heatmap"]["rows"]) > 60                          # the network drawn at resnet34's size


def test_the_heatmaps_column_budget_follows_its_rows():
    assert heatmap_columns(1) == heatmap_columns(50) == 2_000           # few rows: every column kept up to 2,000
    assert heatmap_columns(100) == 1_000 and heatmap_columns(120) == 833  # rows x columns within 100,000 cells
    assert heatmap_columns(1_000) == 500                                 # never fewer than 500 columns
    assert all(r * heatmap_columns(r) <= MAX_HEATMAP_CELLS for r in range(1, 201))
