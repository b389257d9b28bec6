"""The report's panels and time axes against a real two-stage PyTorch run whose loop counts its own
epochs, lrs, trainable flips and BatchNorm buffers (the oracle): "Between the fits", BatchNorm
running statistics, per-epoch values, the glossary, epoch ticks and stage events on every time
chart, hover context, and the legends and scales of the figures."""

from __future__ import annotations

import html as html_lib
import math
import re

import numpy as np
import pytest
import torch

import freezeframe
from freezeframe.analyse import figures
from freezeframe.render.charts import STATE_COLORS, STATE_LABELS
from freezeframe.render.html import render_html
from freezeframe.render.panels import slice_note
from models import BodyHead, batch, build, loss_of
from test_report_data import decode, embedded

EPOCHS = ((5, 5), (7, 7))   # batches per epoch, per stage
LRS = [1e-4, 1e-3, 1e-2]


def epoch_run(run_dir) -> dict:
    """Body frozen except BatchNorm, then unfrozen with a new optimizer and one-cycle lrs of
    1e-4 / 1e-3 / 1e-2; two epochs per stage, `rec.epoch()` and `rec.log_epoch()` each epoch.
    Returns what the loop saw: epoch and stage starts, the values logged, the lr of every group
    at every step, which tensors flipped, and BatchNorm buffers at watch start and stage ends."""
    model = build(BodyHead)
    groups = model.layer_groups()
    model.freeze_body(keep_bn=True)
    opt = torch.optim.SGD([{"params": g} for g in groups], lr=0.05, momentum=0.9)
    bufs = lambda: {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}  # noqa: E731
    truth = {"epoch_starts": [], "stage_starts": [], "values": [], "lr": {}, "buffers": [bufs()], "step": 0}
    with freezeframe.watch(model, opt, run_dir, every=1, mode="new") as rec:
        def fit(name, opt, sched, epochs, offset):
            truth["stage_starts"].append(truth["step"])
            truth["epoch_starts"].append([])
            with rec.stage(name):
                for ep, n in enumerate(epochs):
                    rec.epoch()
                    truth["epoch_starts"][-1].append(truth["step"])
                    losses = []
                    for i in range(n):
                        x, y = batch(model, offset + 10 * ep + i)
                        opt.zero_grad()
                        loss = loss_of(model, x, y)
                        loss.backward()
                        truth["lr"][truth["step"]] = [g["lr"] for g in opt.param_groups]
                        opt.step()
                        sched.step()
                        rec.log(loss=loss.item())
                        losses.append(loss.item())
                        truth["step"] += 1
                    model.eval()
                    with torch.no_grad():
                        x, y = batch(model, 999)
                        out = model(x)
                        valid = float(loss_of(model, x, y))
                        acc = float((out.argmax(1) == y).float().mean())
                    model.train()
                    values = {"train_loss": sum(losses) / len(losses), "valid_loss": valid, "accuracy": acc}
                    rec.log_epoch(**values)
                    truth["values"].append(values)
            truth["buffers"].append(bufs())

        fit("head only", opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10), EPOCHS[0], 0)
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        model.unfreeze()
        truth["unfrozen"] = sorted(n for n, p in model.named_parameters() if p.requires_grad and not before[n])
        opt2 = torch.optim.SGD([{"params": g} for g in groups], lr=1e-3, momentum=0.9)
        rec.track(opt2)
        fit("unfrozen", opt2, torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=LRS, total_steps=14), EPOCHS[1], 100)
    return truth


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("panels") / "run"
    truth = epoch_run(run_dir)
    run = freezeframe.load(run_dir)
    text = render_html(run)
    return {"truth": truth, "run": run, "html": text, "data": embedded(text)}


def section(text: str, name: str) -> str:
    m = re.search(rf'<section id="{name}">(.*?)</section>', text, re.S)
    assert m, f"no section {name}"
    return m.group(1)


def table_rows(fragment: str) -> list[list[str]]:
    rows = re.findall(r"<tr>(.*?)</tr>", fragment, re.S)
    return [[html_lib.unescape(re.sub(r"<[^>]+>", " ", c)).split() and " ".join(
        html_lib.unescape(re.sub(r"<[^>]+>", " ", c)).split()) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", r, re.S)]
            for r in rows]


# ----------------------------------------------------------------------------- panels
def test_per_epoch_table_holds_what_the_loop_logged(report):
    truth = report["truth"]
    rows = table_rows(section(report["html"], "epochs"))
    assert rows[0] == ["stage", "epoch", "steps", "train_loss", "valid_loss", "accuracy"]
    want, k = [], 0
    for stage, starts in enumerate(truth["epoch_starts"]):
        for e, first in enumerate(starts):
            last = first + EPOCHS[stage][e] - 1
            v = truth["values"][k]
            k += 1
            want.append([str(e + 1), f"{first:,}–{last:,}", f"{v['train_loss']:.4g}", f"{v['valid_loss']:.4g}",
                         f"{v['accuracy']:.4g}"])
    assert [r[1:] for r in rows[1:]] == want
    fig = report["data"]["figures"]["epochs"]                       # and the plot: values at each epoch's end
    valid = next(t for t in fig["data"] if t["name"] == "valid_loss")
    assert decode(valid["y"]).tolist() == pytest.approx([v["valid_loss"] for v in truth["values"]], rel=1e-12)


def test_between_the_fits_says_what_unfreeze_did(report):
    truth = report["truth"]
    text = section(report["html"], "between")
    flipped = re.search(r"became trainable: <details><summary>(\d+) tensors</summary><ul class=names>(.*?)</ul>",
                        text, re.S)
    assert int(flipped.group(1)) == len(truth["unfrozen"])
    assert sorted(re.findall(r"<code>(.*?)</code>", flipped.group(2))) == truth["unfrozen"]
    assert "became frozen: no tensors" in text
    assert "kept: every tensor bitwise" in text                     # nothing ran between the fits
    assert "a new optimizer; it started with empty state" in text
    rows = table_rows(text)[1:]
    last0, first1 = truth["lr"][truth["stage_starts"][1] - 1], truth["lr"][truth["stage_starts"][1]]
    assert [r[1] for r in rows] == [f"{a:.3g} → {b:.3g}" for a, b in zip(last0, first1)]
    assert [r[2] for r in rows] == [f"{x:.3g}" for x in LRS]
    # the loop gave OneCycleLR max_lr=[1e-4, 1e-3, 1e-2]: geometric, but no slice() was called
    assert "geometric, ×10 per group: group 0: 0.0001, group 1: 0.001, group 2: 0.01" in text
    assert "How stage 0 (head only) started" in text


def test_batchnorm_panel_equals_the_buffers(report):
    """Oracle: the buffers the loop copied at watch start and at each stage's end."""
    truth = report["truth"]
    rows = table_rows(section(report["html"], "bn"))[1:]
    start = truth["buffers"][0]
    for k, row in enumerate(rows):
        before, after = truth["buffers"][k], truth["buffers"][k + 1]
        changed = [n for n in after if not torch.equal(before[n], after[n])]
        assert row[1] == f"{len(changed)} / {len(after)}"
        assert row[2] == str(len({n.rsplit(".", 1)[0] for n in changed}))
        rel = {n: float((after[n] - start[n]).norm() / start[n].norm()) for n in after if start[n].norm() > 0}
        top = max(rel, key=rel.get)
        assert row[-1] == f"{top} {100 * rel[top]:.3g} %"
    assert rows[0][4].startswith("0 ")                              # BatchNorm trains in stage 0 (keep_bn)
    assert rows[0][5] == rows[0][1].split(" / ")[0]                 # …inside the frozen body's layer groups


def test_a_plain_loop_is_not_said_to_have_called_fastai(report):
    """The loop flipped requires_grad itself and gave OneCycleLR a list of lrs: no page text may say
    it called slice() or unfreeze(), and the per-epoch values are the loop's, not a framework's."""
    page = report["html"]
    assert report["run"].summary()["run"]["framework"] == "torch"
    event = report["run"].summary()["transitions"][0]["event"]
    assert "unfreeze()" not in event
    for name in ("stages", "between", "lr"):
        text = html_lib.unescape(re.sub(r"<[^>]+>", "", section(page, name) if name != "stages" else page))
        assert "slice(0.0001, 0.01) →" not in text, name
    assert "▸ unfreeze())" not in page
    between = section(page, "between")
    assert f"<span class=event>{html_lib.escape(event)}</span>" in between
    epochs = html_lib.unescape(section(page, "epochs"))
    assert "What the framework reported" not in epochs and "rec.log_epoch(...)" in re.sub(r"<[^>]+>", "", epochs)
    glossary = html_lib.unescape(re.sub(r"<[^>]+>", "", section(page, "glossary")))
    assert "no step changes it" not in glossary and "changed while frozen" in glossary
    assert "OneCycleLR" in glossary


def test_glossary_explains_every_term(report):
    text = html_lib.unescape(section(report["html"], "glossary"))
    for term in ("tensor", "module", "layer", "layer group, pg0", "bitwise unchanged", "relative L2 distance",
                 "‖ΔW‖/‖W‖", "train_bn", "one-cycle", "W_ref, the weights watching began with"):
        assert f"<dt>{term}</dt>" in text, term


def test_slice_is_explained_only_for_geometric_lrs():
    assert (slice_note([1e-4, 1e-3, 1e-2], "fastai")
            == "slice(0.0001, 0.01) → group 0: 0.0001, group 1: 0.001, group 2: 0.01")
    assert slice_note([1e-3, 1e-2], "fastai") == "slice(0.001, 0.01) → group 0: 0.001, group 1: 0.01"
    assert slice_note([1e-3, 1e-2], "torch") == "geometric, ×10 per group: group 0: 0.001, group 1: 0.01"
    assert slice_note([1e-4, 5e-4, 1e-2]) is None
    assert slice_note([1e-3, 1e-3, 1e-3]) is None and slice_note([1e-3]) is None and slice_note([None, 1e-3]) is None


# ----------------------------------------------------------------------------- time axes and hovers
def test_every_time_chart_has_epoch_ticks_and_the_stage_event(report):
    truth, figs = report["truth"], report["data"]["figures"]
    later = sorted(s - 0.5 for starts in truth["epoch_starts"] for s in starts[1:])
    for name in ("heatmap", "lr", "loss", "epochs"):
        layout = figs[name]["layout"]
        assert sorted(s["x0"] for s in layout["shapes"] if s.get("name") == "ff-epoch") == later, name
        assert [s["x0"] for s in layout["shapes"] if s.get("name") == "ff-event"] == [truth["stage_starts"][1] - 0.5]
        labels = [a["text"] for a in layout["annotations"] if a.get("name") == "ff-epoch"]
        assert labels == [f"epoch {e + 1}" for starts in truth["epoch_starts"] for e in range(len(starts))], name
        assert any(a["text"].startswith("▸ ") for a in layout["annotations"]), name
        assert f'class="fig ff-timechart" id="fig-{name}"' in report["html"]
    assert 'class="fig" id="fig-drift"' in report["html"] and 'class="fig" id="fig-freeze_map"' in report["html"]


def _context_oracle(truth: dict, step: int) -> tuple[int, int, int]:
    stage = max(k for k, s in enumerate(truth["stage_starts"]) if s <= step)
    starts = truth["epoch_starts"][stage]
    e = max(k for k, s in enumerate(starts) if s <= step)
    return stage, e + 1, step - starts[e] + 1


def test_hover_context_is_stage_epoch_batch_step(report):
    truth, figs = report["truth"], report["data"]["figures"]
    checked = 0
    for t in figs["loss"]["data"] + figs["lr"]["data"]:
        ctx, xs = decode(t["customdata"]), decode(t["x"])
        assert "stage %s · epoch %%{customdata[0]} · batch %%{customdata[1]} · step %%{x}" % t["meta"]["stage"] \
            in t["hovertemplate"]
        for (epoch, b), x in zip(ctx.tolist(), xs.tolist()):
            assert (t["meta"]["stage"], epoch, b) == _context_oracle(truth, int(x))
            checked += 1
    for t in figs["heatmap"]["data"]:
        if "meta" in t:
            ctx, xs = decode(t["customdata"]), decode(t["x"])
            for c, x in enumerate(xs.tolist()):
                assert (t["meta"]["stage"], *ctx[0, c].tolist()) == _context_oracle(truth, int(x))
                assert (ctx[:, c] == ctx[0, c]).all()
                checked += 1
    assert checked >= 24 * 4 + 24


def test_groups_sharing_one_lr_stay_visible(report):
    stage0 = [t for t in report["data"]["figures"]["lr"]["data"] if t["meta"]["stage"] == 0]
    assert len(stage0) == 3 and len({decode(t["y"]).tobytes() for t in stage0}) == 1   # one lr for all three
    styles = {(t["line"]["dash"], t["line"]["width"], t["marker"]["symbol"]) for t in stage0}
    assert len(styles) == 3 and all("markers" in t["mode"] for t in stage0)
    assert any(a["text"].startswith("one lr for ") for a in report["data"]["figures"]["lr"]["layout"]["annotations"])


def test_freeze_map_legend_shows_present_states_in_the_cells_colour(report):
    run = report["run"]
    fm = figures.freeze_map(run.summary())
    fig = report["data"]["figures"]["freeze_map"]
    legend = {t["meta"]["state"]: t["marker"]["color"] for t in fig["data"] if t["type"] == "scatter"}
    present = {s for row in fm["state"] for s in row if s}
    assert set(legend) == present and "partial" not in present
    frozen_shades = {sh for srow, hrow in zip(fm["state"], fm["shade"]) for s, sh in zip(srow, hrow) if s == "frozen"}
    assert frozen_shades == {0.0} and legend["frozen"] == STATE_COLORS["frozen"][0]   # the colour frozen cells have
    names = [t["name"] for t in fig["data"] if t["type"] == "scatter"]
    assert names == [STATE_LABELS[s] for s in ("trainable", "partial", "frozen") if s in present]
    text = " ".join(" ".join(r) for r in fm["text"])
    assert "Δ" not in text and "changed" in text and "% from start" in text


def test_drift_log_scale_draws_zero_on_a_labelled_floor(report):
    fig = report["data"]["figures"]["drift"]
    log = next(b for b in fig["layout"]["updatemenus"][0]["buttons"] if b["label"] == "log")
    traces, layout = log["args"]
    floor = layout["xaxis.tickvals"][0]
    assert layout["xaxis.ticktext"][0] == "0 (bitwise unchanged)" and floor > 0
    assert len(layout["xaxis.tickvals"]) <= 8
    assert all(math.log10(v).is_integer() for v in layout["xaxis.tickvals"][1:])   # powers of ten only
    stage_x = [decode(t["x"]) for t in fig["data"] if "meta" in t]
    zeros = [(k, r) for k, xs in enumerate(stage_x) for r, x in enumerate(xs) if x == 0]
    assert zeros                                                      # frozen modules: bitwise unchanged
    for k, r in zeros:
        assert traces["x"][1 + k][r] == floor                          # on the floor, not off the scale
        assert fig["data"][1 + k]["customdata"][r] == "0 (bitwise unchanged)"
    rings = [t["marker"]["symbol"] for t in fig["data"] if "meta" in t]
    assert rings == ["circle-open", "circle"]                          # the earlier stage's dot never hidden


def test_hover_names_are_the_axis_names(report):
    for name in ("freeze_map", "heatmap", "drift"):
        axis = report["data"]["figures"][name]["layout"]["yaxis"]
        assert axis["tickvals"] == axis["ticktext"]
        assert all("." not in v.split(" · ")[-1] or "[" in v or v.endswith(")") for v in axis["tickvals"]) or name
    hm = report["data"]["figures"]["heatmap"]
    assert all(t["hovertemplate"].startswith("<b>%{y}</b>") for t in hm["data"] if t["type"] == "heatmap")


def test_sections_come_in_reading_order(report):
    ids = re.findall(r'<section id="([a-z_]+)"', report["html"])
    assert ids == ["answers", "layers", "between", "freeze_map", "heatmap", "lr", "drift", "loss", "epochs", "bn",
                   "glossary"]
