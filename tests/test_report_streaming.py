"""The report's figures from the tensors table read block by block (docs/report.md, "How figures
are downsampled"): the heatmap's and the scrubber's cells equal a plain recomputation from the
whole table, long lr and loss lines keep every bin's lowest and highest value, the report never
loads the whole table, and its size does not grow with the number of steps."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import freezeframe
from freezeframe.analyse import figures
from freezeframe.analyse.figures import from_run
from freezeframe.analyse.timeline import timeline
from freezeframe.render.html import render_html
from freezeframe.store import layout


def synthetic_run(run_dir, *, steps_per_stage: int, blocks: int = 2, width: int = 5, chunks: int = 3,
                  oddities: bool = False, seed: int = 0):
    """A tiny real two-stage run of blocks × width Linear(1, 1) (one param group per block, the
    first block frozen in stage 0), its tables then rewritten at full size with the store's schemas,
    the tensors table in `chunks` chunk files. `oddities`: some NaN, Inf, null and exactly-zero
    measurements, and tensor rows at a step with no step row."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Sequential(*[nn.Linear(1, 1) for _ in range(width)]) for _ in range(blocks)])
    opt = torch.optim.SGD([{"params": list(b.parameters())} for b in model], lr=0.1)
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
    P, S, G = len(m["model"]["params"]), steps_per_stage, blocks
    rng = np.random.default_rng(seed)
    step = np.arange(2 * S, dtype=np.int64)
    stage = (step >= S).astype(np.int32)
    cycle = 0.1 * np.sin(np.pi * np.linspace(1e-3, 1, S)) + 1e-6
    cycle[S // 3] *= 40                                  # one spike in the schedule
    lr = [[float(v)] * G for v in cycle] + [[float(v * 10.0 ** (k - G + 1)) for k in range(G)] for v in cycle]
    trainable = [m["stages"][k]["trainable"] for k in range(2)]
    masks = []
    for k in range(2):
        bits = np.zeros(P, dtype=np.uint8)
        bits[trainable[k]] = 1
        masks.append(np.packbits(bits).tobytes())
    steps = pa.Table.from_pydict({
        "step": step, "stage": stage, "session": np.zeros(2 * S, np.int32), "optimizer": np.zeros(2 * S, np.int16),
        "time": 1.7e9 + step * 0.01, "recorded": np.ones(2 * S, bool), "lr": lr, "momentum": [[0.9] * G] * (2 * S),
        "weight_decay": [[0.0] * G] * (2 * S), "grads": [masks[k] for k in stage]}, schema=layout.STEPS_SCHEMA)
    t_step = np.concatenate([np.repeat(np.arange(k * S, (k + 1) * S), len(trainable[k])) for k in range(2)])
    t_tensor = np.concatenate([np.tile(np.asarray(trainable[k], np.int32), S) for k in range(2)])
    pn = rng.uniform(0.5, 2.0, P).astype(np.float32)[t_tensor]
    un = (pn * 10 ** rng.normal(-3, 0.5, len(t_step))).astype(np.float32)
    un_mask = pn_mask = None
    if oddities:
        n = len(t_step)
        un[rng.choice(n, 20, replace=False)] = np.nan
        un[rng.choice(n, 5, replace=False)] = np.inf
        pn[rng.choice(n, 5, replace=False)] = np.nan
        un[t_step == S + 7] = 0.0                        # a step where nothing moved
        un_mask = np.zeros(n, bool)
        un_mask[rng.choice(n, 15, replace=False)] = True
        pn_mask = np.zeros(n, bool)
        pn_mask[rng.choice(n, 15, replace=False)] = True
        t_step[t_step == 11] = 2 * S + 5                 # rows of a step the step table does not have
    tensors = pa.Table.from_pydict({
        "step": t_step, "tensor": t_tensor, "grad_norm": un * 3,
        "update_norm": pa.array(un, mask=un_mask), "param_norm": pa.array(pn, mask=pn_mask),
        "drift": (pn * 0.01 * t_step / (2 * S)).astype(np.float32)}, schema=layout.TENSORS_SCHEMA)
    value = 2.0 * np.exp(-step / (S / 2)) + rng.normal(0, 0.05, 2 * S)
    value[S // 2] = 50.0                                 # one loss spike
    value[S + 3] = np.nan                                # and one NaN
    scalars = pa.Table.from_pydict({"step": step, "name": ["loss"] * (2 * S), "value": value},
                                   schema=layout.SCALARS_SCHEMA)
    for name, table in {layout.STEPS: steps, layout.SCALARS: scalars}.items():
        shutil.rmtree(run_dir / name)
        (run_dir / name).mkdir()
        pq.write_table(table, run_dir / layout.chunk_name(name, 1, 0), compression="zstd")
    shutil.rmtree(run_dir / layout.TENSORS)
    (run_dir / layout.TENSORS).mkdir()
    edges = np.linspace(0, tensors.num_rows, chunks + 1).round().astype(int)
    for k, (a, b) in enumerate(zip(edges, edges[1:])):
        pq.write_table(tensors.slice(a, b - a), run_dir / layout.chunk_name(layout.TENSORS, k + 1, 0),
                       compression="zstd", row_group_size=1000)
    for k in range(2):
        m["stages"][k].update(first_step=k * S, last_step=(k + 1) * S - 1, steps=S)
    m["steps_total"] = 2 * S
    (run_dir / layout.MANIFEST).write_text(json.dumps(m))
    return run_dir


def _log_ratio(u2: float, p2: float) -> float:
    if p2 <= 0:
        return math.nan
    return -math.inf if u2 == 0 else 0.5 * (math.log10(u2) - math.log10(p2))


def _rows_of_tensors(rows: list[dict], index: dict[str, int]) -> dict[int, int]:
    out = {}
    for r, row in enumerate(rows):
        for name in row["params"]:
            if name in index:
                out[index[name]] = r
    return out


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("odd") / "run", steps_per_stage=2500, oddities=True)


def test_streamed_heatmap_and_timeline_cells_equal_a_plain_recomputation(odd_run, monkeypatch):
    from freezeframe.analyse import heatmap
    from freezeframe.analyse.timeline import frames

    monkeypatch.setattr(heatmap, "BLOCK_ROWS", 777)       # blocks that cut steps and chunk files apart
    run = freezeframe.load(odd_run)
    stored = run._stored
    assert len(stored.tensor_files) == 3
    summary, steps = run.summary(), stored.steps
    depth, hm_rows = figures.heatmap_rows(summary)
    fr = frames(summary, steps)
    got = heatmap.aggregate(summary, steps, stored, heat_rows=hm_rows, layer_rows=fr["rows"],
                            frame_of_pos=fr["frame_of_pos"], F=fr["F"])

    # the oracle: every tensor row of the whole table, one at a time
    table = run.tensors().to_pylist()
    params = summary["params"]
    index = {p["name"]: i for i, p in enumerate(params)}
    step_stage = {}
    for s, st in zip(steps.column("step").to_pylist(), steps.column("stage").to_pylist()):
        step_stage.setdefault(s, st)
    heat_row = _rows_of_tensors(hm_rows, index)
    with_aliases = dict(index)
    for i, p in enumerate(params):
        for a in p.get("aliases") or []:
            with_aliases[a] = i
    layer_of = _rows_of_tensors(fr["rows"], with_aliases)
    frame_steps = [int(fr["index"].steps[a]) for a in fr["lo"]]
    cells, bad, seen = {}, {}, set()
    t_cells = {}
    for r in table:
        t, s, u, p = r["tensor"], r["step"], r["update_norm"], r["param_norm"]
        if s not in step_stage:
            continue
        finite = u is not None and p is not None and math.isfinite(u) and math.isfinite(p)
        if t in heat_row and u is not None and p is not None:
            seen.add(s)
            if finite:
                c = cells.setdefault((heat_row[t], s), [0.0, 0.0])
                c[0] += u * u
                c[1] += p * p
            else:
                bad[(heat_row[t], s)] = bad.get((heat_row[t], s), 0) + 1
        if t in layer_of and finite:
            f = max(k for k, first in enumerate(frame_steps) if first <= s)
            c = t_cells.setdefault((layer_of[t], f), [0.0, 0.0])
            c[0] += u * u
            c[1] += p * p
    cols = sorted(s for s in seen if step_stage[s] >= 0)
    hm = got["heatmap"]
    assert hm["steps"].tolist() == cols and hm["stage"].tolist() == [step_stage[s] for s in cols]
    want = np.array([[_log_ratio(*cells.get((r, s), (0.0, 0.0))) for s in cols] for r in range(len(hm_rows))])
    assert np.array_equal(np.isnan(hm["values"]), np.isnan(want))
    assert np.array_equal(np.isneginf(hm["values"]), np.isneginf(want)) and np.isneginf(want).any()
    ok = np.isfinite(want)
    np.testing.assert_allclose(hm["values"][ok], want[ok], rtol=1e-12, atol=1e-12)
    assert hm["nonfinite"].tolist() == [[bad.get((r, s), 0) for s in cols] for r in range(len(hm_rows))]
    assert hm["nonfinite"].sum() > 0
    tl_want = np.array([[_log_ratio(*t_cells.get((r, f), (0.0, 0.0))) for f in range(fr["F"])]
                        for r in range(len(fr["rows"]))], dtype=np.float32)
    tl = got["timeline"]
    assert tl.shape == tl_want.shape and np.array_equal(np.isnan(tl), np.isnan(tl_want))
    ok = np.isfinite(tl_want)
    np.testing.assert_allclose(tl[ok], tl_want[ok], rtol=1e-6)
    # the figures built from the stream are the figures built from the table in memory
    streamed = from_run(run)
    whole = figures.figure_data(summary, steps, stored.tensors, stored.scalars)
    for key in ("values", "zero", "nonfinite", "x", "x_first", "x_last"):
        assert np.array_equal(streamed["heatmap"][key], whole["heatmap"][key], equal_nan=key == "values"), key
    assert np.array_equal(streamed["timeline"]["update"], whole["timeline"]["update"], equal_nan=True)
    assert np.array_equal(timeline(summary, steps, stored, stored.scalars)["update"], tl, equal_nan=True)


def _check_envelope(steps, values, shown_steps, shown_values, bin_first, bin_last):
    """Every drawn point is a real one; the bins cover the steps in order; each bin's lowest and
    highest value (and its NaN) are drawn, by plain Python over the raw points."""
    raw = dict(zip(steps.tolist(), values.tolist()))
    for s, v in zip(shown_steps.tolist(), shown_values.tolist()):
        assert s in raw and (raw[s] == v or (math.isnan(raw[s]) and math.isnan(v)))
    assert bin_first[0] == steps[0] and bin_last[-1] == steps[-1]
    for a, b in zip(bin_last[:-1].tolist(), bin_first[1:].tolist()):
        assert [s for s in steps.tolist() if a < s < b] == []
    for a, b in zip(bin_first.tolist(), bin_last.tolist()):
        vals = [raw[s] for s in steps.tolist() if a <= s <= b]
        got = [v for s, v in zip(shown_steps.tolist(), shown_values.tolist()) if a <= s <= b]
        finite = [v for v in vals if not math.isnan(v)]
        if finite:
            assert min(v for v in got if not math.isnan(v)) == min(finite)
            assert max(v for v in got if not math.isnan(v)) == max(finite)
        assert any(math.isnan(v) for v in got) == any(math.isnan(v) for v in vals)


def test_long_lr_and_loss_lines_keep_every_bins_lowest_and_highest_value(odd_run):
    MAX_POINTS = figures.MAX_POINTS
    run = freezeframe.load(odd_run)
    summary, stored = run.summary(), run._stored
    lr = figures.learning_rates(summary, stored.steps)
    step = stored.steps.column("step").to_numpy()
    lrs = stored.steps.column("lr").to_pylist()
    cut = [s for s in lr["series"] if "steps_total" in s]
    assert cut and "downsampled" in lr["note"]
    for s in lr["series"]:
        mine = [i for i, st in enumerate(stored.steps.column("stage").to_pylist()) if st == s["stage"]]
        raw_steps = step[mine]
        raw = np.array([lrs[i][s["group"]] for i in mine])
        assert len(s["steps"]) <= MAX_POINTS
        if len(raw) <= MAX_POINTS:
            assert s["steps"].tolist() == raw_steps.tolist() and s["lr"].tolist() == raw.tolist()
            continue
        assert s["steps_total"] == len(raw)
        _check_envelope(raw_steps, raw, s["steps"], s["lr"], s["bin_first"], s["bin_last"])
        assert raw.max() in s["lr"].tolist()                 # the spike is drawn
    ls = figures.loss(stored.scalars, summary=summary)
    sc = stored.scalars
    raw_steps, raw = sc.column("step").to_numpy(), sc.column("value").to_numpy()
    assert ls["steps_total"] == len(raw) and len(ls["steps"]) <= 2 * MAX_POINTS   # one line per stage
    assert "downsampled" in ls["note"] and 50.0 in ls["values"].tolist() and np.isnan(ls["values"]).any()
    _check_envelope(raw_steps, raw, ls["steps"], ls["values"], ls["bin_first"], ls["bin_last"])
    assert ls["stage"].tolist() == [0 if s < 2500 else 1 for s in ls["steps"].tolist()]
    short = figures.loss(sc.slice(0, 700), summary=summary)      # under the cap: every point as logged
    assert short["steps"].tolist() == raw_steps[:700].tolist() and "note" not in short
    assert np.array_equal(short["values"], raw[:700], equal_nan=True)
    text = render_html(run)
    assert "downsampled: 5,000 logged steps shown as" in text and "lines of 10,000 steps in all shown as" in text


def test_the_report_never_loads_the_whole_tensors_table(odd_run, monkeypatch):
    from freezeframe.render.notebook import repr_html
    from freezeframe.store.reader import StoredRun

    run = freezeframe.load(odd_run)
    stored = run._stored
    run.summary()                       # the summary's own reading is not the figures'
    stored._tensors = None

    def refuse(self):
        raise AssertionError("the whole tensors table was loaded")

    monkeypatch.setattr(StoredRun, "tensors", property(refuse), raising=False)
    text = render_html(run)
    assert "Update size per module and step" in text and repr_html(run)
    assert stored._tensors is None


def test_the_report_size_does_not_grow_with_steps(tmp_path):
    sizes = {}
    for s in (2_500, 10_000):
        run = freezeframe.load(synthetic_run(tmp_path / f"r{s}", steps_per_stage=s, chunks=2))
        sizes[s] = len(render_html(run).encode("utf-8"))
    assert abs(sizes[10_000] - sizes[2_500]) <= 0.03 * sizes[2_500], sizes
