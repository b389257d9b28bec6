"""The layer view and the step scrubber's data (docs/report.md, "Layer view" and "Step scrubber"),
from runs written by the real Recorder: each layer's state per stage against the model's own
requires_grad flags and state-dict bytes, the frames' step / epoch / batch against what the training
loop counted itself, update sizes and lrs against the model and optimizer seen around every step,
binning of a long run against a pandas group-by, and the HTML (escaped, readable with no script,
bounded at 1,000 modules)."""

from __future__ import annotations

import html as html_lib
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freezeframe
from freezeframe.analyse import figures
from freezeframe.analyse.timeline import MAX_FRAMES, frame_budget, layer_view, timeline
from freezeframe.demo_model import DigitResNet34
from freezeframe.render.layers import STATE_STYLE, frame_label, layers_section

NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
EPOCHS, BATCHES = (2, 3), (4, 3)            # per stage: epochs, batches per epoch
GROUP_LR = ((0.02, 0.05, 0.1), (1e-4, 1e-3, 1e-2))
WRITTEN = "layer1.0.conv1"                  # frozen in stage 0, yet written in place during it
TRAINS_IN_FROZEN_BODY = "layer4.2.conv2"    # the one body convolution that trains in stage 0


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _owned(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    return {name: [(f"{name}.{n}" if name else n, p) for n, p in m.named_parameters(recurse=False)]
            for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}


def resnet_run(run_dir, *, every=1, write_frozen=True):
    """A plain PyTorch loop on the demo's resnet34-shaped network, with rec.epoch() at each epoch:
    stage 0 trains the BatchNorm layers, one body convolution and fc (the body otherwise frozen,
    one frozen weight written in place); stage 1 trains everything with one lr per layer group.
    Returns the oracle: what the loop saw at every step and at every stage's start and end."""
    torch.manual_seed(0)
    model = DigitResNet34()
    owned = _owned(model)
    opt = torch.optim.SGD([{"params": g} for g in model.layer_groups()], lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    oracle = {"steps": [], "stages": [], "loss": {}}
    step = 0
    with freezeframe.watch(model, opt, run_dir, every=every, mode="new") as rec:
        for k, name in enumerate(("body frozen", "unfrozen")):
            for mod, tensors in owned.items():
                for _, p in tensors:
                    p.requires_grad_(k == 1 or isinstance(model.get_submodule(mod), NORM) or mod in (
                        "fc", TRAINS_IN_FROZEN_BODY))
            trainable = {n: p.requires_grad for ts in owned.values() for n, p in ts}
            with rec.stage(name):
                start = {n: _bytes(p) for n, p in model.named_parameters()}
                for epoch in range(EPOCHS[k]):
                    rec.epoch()
                    for b in range(BATCHES[k]):
                        for j, group in enumerate(opt.param_groups):
                            group["lr"] = GROUP_LR[k][j] * (1 + (step % 3)) / 3
                        lrs = [group["lr"] for group in opt.param_groups]
                        x, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
                        before = {n: p.detach().clone() for n, p in model.named_parameters()}
                        opt.zero_grad()
                        loss = F.cross_entropy(model(x), y)
                        loss.backward()
                        opt.step()
                        rec.log(loss=loss.item())
                        oracle["loss"][step] = loss.item()
                        upd = {}
                        for mod, tensors in owned.items():
                            du = sum(float((p.detach() - before[n]).double().norm() ** 2) for n, p in tensors)
                            pw = sum(float(before[n].double().norm() ** 2) for n, _ in tensors)
                            upd[mod] = 0.5 * (math.log10(du) - math.log10(pw)) if du > 0 and pw > 0 else (
                                -math.inf if pw > 0 else math.nan)
                        oracle["steps"].append({"step": step, "stage": k, "epoch": epoch + 1, "batch": b + 1,
                                                "lr": lrs, "update": upd})
                        step += 1
                        if write_frozen and k == 0 and epoch == 0 and b == 1:
                            with torch.no_grad():
                                model.get_submodule(WRITTEN).weight.mul_(1.5)   # a frozen weight, written
                end = {n: _bytes(p) for n, p in model.named_parameters()}
            oracle["stages"].append({"trainable": trainable, "changed": {n: start[n] != end[n] for n in start}})
    return model, oracle


def oracle_state(model: nn.Module, module: str, stage: dict) -> str:
    """docs/report.md's states, from the model: requires_grad and bytes seen by the loop. The block
    of a BasicBlock's layer is the BasicBlock; conv1 and bn1 are the stem."""
    tensors = [n for n, _ in _owned(model)[module]]
    trains = [stage["trainable"][n] for n in tensors]
    if any(not t and stage["changed"][n] for n, t in zip(tensors, trains)):
        return "changed-while-frozen"
    if any(trains):
        if isinstance(model.get_submodule(module), NORM):
            block = ".".join(module.split(".")[:2]) if module.startswith("layer") else "stem"
            weights = [m for m, mm in model.named_modules() if isinstance(mm, (nn.Conv2d, nn.Linear))
                       and (m.startswith(block + ".") if block != "stem" else m == "conv1")]
            if not any(stage["trainable"][f"{m}.weight"] for m in weights):
                return "bn-only"
        return "trained"
    return "frozen-unchanged" if not any(stage["changed"][n] for n in tensors) else "changed-while-frozen"


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("layerview") / "run"
    model, oracle = resnet_run(run_dir, every=2)
    run = freezeframe.load(run_dir)
    return {"model": model, "oracle": oracle, "run": run, "summary": run.summary()}


def _timeline(run):
    stored = run._stored
    return timeline(run.summary(), stored.steps, stored.tensors, stored.scalars)


# ----------------------------------------------------------------------------- the layer view
def test_each_layers_state_per_stage_is_what_the_model_went_through(resnet):
    model, oracle, summary = resnet["model"], resnet["oracle"], resnet["summary"]
    lv = layer_view(summary)
    assert [x["module"] for x in lv["layers"]] == [x["module"] for x in summary["layers"]]
    assert len(lv["layers"]) == len(_owned(model)) == 73
    for layer in lv["layers"]:
        expected = [oracle_state(model, layer["module"], st) for st in oracle["stages"]]
        assert layer["states"] == expected, layer["module"]
    by = {x["module"]: x["states"] for x in lv["layers"]}
    assert by[WRITTEN] == ["changed-while-frozen", "trained"]
    assert by["layer1.0.bn1"] == ["bn-only", "trained"] and by["bn1"] == ["bn-only", "trained"]
    assert by["layer4.2.bn1"] == ["trained", "trained"]            # its block's conv2 trains
    assert by["layer2.0.downsample.1"] == ["bn-only", "trained"]
    assert by["layer1.1.conv1"] == ["frozen-unchanged", "trained"] and by["fc"] == ["trained", "trained"]
    assert [s["label"] for s in lv["stages"]] == ["0: body frozen", "1: unfrozen"]


def test_the_view_is_the_networks_shape_in_forward_order(resnet):
    model, lv = resnet["model"], layer_view(resnet["summary"])
    assert [p["name"] for p in lv["parts"]] == ["body", "head"]
    body, head = lv["parts"]
    assert body["blocks"][0]["label"] == "stem"
    assert [lv["layers"][i]["module"] for i in body["blocks"][0]["layers"]] == ["conv1", "bn1"]
    rest = body["blocks"][1:]
    assert [b["name"] for b in rest] == [f"layer{s}.{i}" for s, n in enumerate((3, 4, 6, 3), 1) for i in range(n)]
    assert [b["parent_label"] for b in rest] == [f"layer{s}" for s, n in enumerate((3, 4, 6, 3), 1) for _ in range(n)]
    assert [lv["layers"][i]["module"] for b in head["blocks"] for i in b["layers"]] == ["fc"]
    # every layer sits in exactly one block, blocks keep the layers' order
    assert [i for p in lv["parts"] for b in p["blocks"] for i in b["layers"]] == list(range(len(lv["layers"])))
    # the weight-layer numbers: 33 convolutions of the main path and fc, in forward order
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in n]
    numbered = [(x["weight_layer"], x["module"]) for x in lv["layers"] if x["weight_layer"] is not None]
    assert [w for w, _ in numbered] == list(range(1, 35)) and sorted(m for _, m in numbered) == sorted(convs)
    assert numbered[0][1] == "conv1" and numbered[-1][1] == "fc"
    shortcut = [x["module"] for x in lv["layers"] if x["branch"] == "shortcut"]
    assert shortcut == [f"layer{s}.0.downsample.{i}" for s in (2, 3, 4) for i in (0, 1)]
    assert lv["counts"] == {"modules": 73, "weight_layers": 34, "shortcut_weight_layers": 3, "head_weight_layers": 1}
    by = {x["module"]: x for x in lv["layers"]}
    assert by["layer2.0.conv1"]["detail"] == "3×3 8→16" and by["fc"]["detail"] == "64→5" and by["bn1"]["detail"] == "8"
    assert by["layer2.0.downsample.0"]["detail"] == "1×1 8→16"
    assert by["layer2.0.conv1"]["type"] == "Conv2d" and by["layer2.0.conv1"]["label"] == "layer2[0].conv1"
    groups = {x["module"]: x["group_label"] for x in lv["layers"]}
    assert groups["conv1"] == "group 0" and groups["layer3.0.conv1"] == "group 1" and groups["fc"] == "group 2"
    assert by["fc"]["params_numel"] == 64 * 5 + 5


def test_a_summary_without_layers_falls_back_to_model_order(resnet):
    """An older run's summary has no `layers[]`: model order, `ran` null, the same states."""
    summary = {k: v for k, v in resnet["summary"].items() if k != "layers"}
    summary["run"] = {k: v for k, v in summary["run"].items() if k != "layer_counts"}
    old, new = layer_view(summary), layer_view(resnet["summary"])
    model_order = [n for n in _owned(resnet["model"])]
    assert [x["module"] for x in old["layers"]] == model_order
    assert all(x["ran"] is None for x in old["layers"]) and old["forward_order"] is False
    assert new["forward_order"] is True
    states = {x["module"]: x["states"] for x in new["layers"]}
    assert {x["module"]: x["states"] for x in old["layers"]} == states
    assert old["counts"]["weight_layers"] == 34
    text = layers_section({"layer_view": old, "timeline": _timeline(resnet["run"])})
    assert "model order" in text and text.count("data-i=") == 73


def test_a_frozen_layer_whose_end_was_not_captured_is_frozen_not_unchanged(resnet):
    summary = resnet["summary"]
    summary = {**summary, "params": [{**p, "stages": [{**e, "changed": None} for e in p["stages"]]}
                                     for p in summary["params"]]}
    by = {x["module"]: x["states"] for x in layer_view(summary)["layers"]}
    assert by["layer1.1.conv1"] == ["frozen", "trained"]
    assert by[WRITTEN] == ["frozen", "trained"]           # the write cannot be seen without the end's bytes


# ----------------------------------------------------------------------------- the scrubber's frames
def test_frames_are_the_loops_steps_epochs_and_batches(resnet):
    oracle, tl = resnet["oracle"], _timeline(resnet["run"])
    steps = oracle["steps"]
    fr = tl["frames"]
    assert fr["step"] == [s["step"] for s in steps] == fr["step_last"] and tl["binned"] is False
    assert fr["stage"] == [s["stage"] for s in steps]
    assert fr["epoch"] == [s["epoch"] for s in steps]
    assert fr["batch"] == [s["batch"] for s in steps]
    starts = [s["step"] for s in steps if s["batch"] == 1]
    assert [t["step"] for t in tl["epoch_ticks"]] == starts
    assert [t["label"] for t in tl["epoch_ticks"]] == ["epoch 1", "epoch 2", "epoch 1", "epoch 2", "epoch 3"]
    assert [ev["step"] for ev in tl["events"]] == [EPOCHS[0] * BATCHES[0] - 0.5]
    s = steps[13]
    assert frame_label(tl, 13) == f"stage 1 · epoch {s['epoch']} · batch {s['batch']} · step 13"
    assert np.allclose(tl["loss"], [oracle["loss"][s["step"]] for s in steps], rtol=1e-6)


def test_update_sizes_and_lrs_per_frame_are_the_models_and_optimizers(resnet):
    run, oracle, summary = resnet["run"], resnet["oracle"], resnet["summary"]
    tl = _timeline(run)
    lv = layer_view(summary)
    tensors = run._stored.tensors
    measured = set(tensors.column("step").to_numpy().tolist())
    assert 0 < len(measured) < len(oracle["steps"])               # every=2: some steps not measured
    upd = tl["update"]
    assert upd.dtype == np.float32 and upd.shape == (len(lv["layers"]), len(oracle["steps"]))
    compared = 0
    for f, s in enumerate(oracle["steps"]):
        for r, layer in enumerate(lv["layers"]):
            trainable = oracle["stages"][s["stage"]]["trainable"][f"{layer['module']}.weight"]
            got = float(upd[r, f])
            if s["step"] not in measured:
                assert math.isnan(got)
            elif trainable:
                assert got == pytest.approx(s["update"][layer["module"]], abs=2e-4, nan_ok=True), (layer["module"], s["step"])
                compared += 1
            else:
                assert math.isnan(got) or got == -math.inf           # frozen: not measured, or a zero update
    assert compared > 200
    assert tl["range"] == [pytest.approx(float(np.nanmin(upd[np.isfinite(upd)]))),
                           pytest.approx(float(np.nanmax(upd[np.isfinite(upd)])))]
    assert tl["recorded"].tolist() == [s["step"] in measured for s in oracle["steps"]]
    # one lr row per param group: the lr each group stepped with
    assert tl["group_names"] == ["pg0", "pg1", "pg2"] and tl["group_labels"] == ["group 0", "group 1", "group 2"]
    expected = np.array([s["lr"] for s in oracle["steps"]]).T
    assert np.allclose(tl["lr"], expected, rtol=1e-6)


def test_a_long_run_is_binned_to_at_most_max_frames_within_stages(tmp_path):
    from test_report_scale import synthetic_run

    run_dir = tmp_path / "run"
    synthetic_run(run_dir, steps_per_stage=3_000)
    run = freezeframe.load(run_dir)
    summary = run.summary()
    tl = _timeline(run)
    fr = tl["frames"]
    n = len(fr["step"])
    assert tl["binned"] is True and n == MAX_FRAMES and tl["update"].shape == (len(summary["layers"]), n)
    assert fr["step"][0] == 0 and fr["step_last"][-1] == 5_999
    assert all(fr["step_last"][f] + 1 == fr["step"][f + 1] for f in range(n - 1))   # every step in one frame
    stage_of = lambda step: 0 if step < 3_000 else 1                                     # noqa: E731
    assert all(stage_of(a) == stage_of(b) == st for a, b, st in zip(fr["step"], fr["step_last"], fr["stage"]))
    sizes = np.array(fr["step_last"]) - np.array(fr["step"]) + 1
    assert sizes.max() - sizes.min() <= 1
    # the pooled update ratio of every (layer, frame) cell, by a pandas group-by of the stored rows
    t = run._stored.tensors.to_pandas()
    index = {p["name"]: i for i, p in enumerate(summary["params"])}
    layer_of = {index[n]: r for r, x in enumerate(summary["layers"]) for n in x["params"]}
    t["layer"] = t["tensor"].map(layer_of)
    t["frame"] = np.searchsorted(np.array(fr["step"]), t["step"].to_numpy(), side="right") - 1
    t["u2"] = t["update_norm"].astype(float) ** 2
    t["p2"] = t["param_norm"].astype(float) ** 2
    cells = t.groupby(["layer", "frame"])[["u2", "p2"]].sum()
    expected = np.full(tl["update"].shape, np.nan)
    li, fi = (cells.index.get_level_values(k).to_numpy().astype(int) for k in (0, 1))
    expected[li, fi] = 0.5 * (np.log10(cells["u2"].to_numpy()) - np.log10(cells["p2"].to_numpy()))
    assert np.array_equal(np.isnan(tl["update"]), np.isnan(expected))
    assert np.allclose(tl["update"][~np.isnan(expected)], expected[~np.isnan(expected)], atol=1e-5)
    # lr: the frame's first step's
    lr = run._stored.steps.column("lr").to_pylist()
    assert np.allclose(tl["lr"], np.array([lr[s] for s in fr["step"]]).T)
    assert "6,000 steps shown as 2,000 frames" in tl["note"]


def test_frame_budget_shrinks_for_very_large_models_only():
    assert frame_budget(100_000, 76) == MAX_FRAMES
    assert frame_budget(100_000, 1_000) == 250
    assert frame_budget(100_000, 100_000) == 200
    assert frame_budget(37, 1_000) == 37


# ----------------------------------------------------------------------------- the HTML
class Tree(HTMLParser):
    """Tags as nested (tag, attrs, children) with text; enough to check the static page."""

    def __init__(self):
        super().__init__()
        self.root = {"tag": None, "attrs": {}, "children": [], "text": ""}
        self.stack = [self.root]

    VOID = {"input", "br", "img", "meta", "option"}

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "children": [], "text": ""}
        self.stack[-1]["children"].append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack[-1]["tag"] == tag, (self.stack[-1]["tag"], tag)
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1]["text"] += data


def walk(node):
    yield node
    for c in node["children"]:
        yield from walk(c)


def parse(text: str) -> dict:
    p = Tree()
    p.feed(text)
    p.close()
    assert len(p.stack) == 1, "every element is closed"
    return p.root


def test_the_static_section_shows_structure_and_states_without_script(resnet):
    lv = layer_view(resnet["summary"])
    tl = _timeline(resnet["run"])
    text = layers_section({"layer_view": lv, "timeline": tl})
    assert "<script" not in text
    root = parse(text)
    section = next(n for n in walk(root) if n["tag"] == "section")
    assert section["attrs"]["id"] == "layers"
    nodes = list(walk(section))
    slider = next(n for n in nodes if n["attrs"].get("id") == "step")
    assert slider["tag"] == "input" and slider["attrs"]["type"] == "range"
    assert (slider["attrs"]["min"], slider["attrs"]["max"]) == ("0", str(len(tl["frames"]["step"]) - 1))
    assert next(n for n in nodes if n["attrs"].get("id") == "play")["tag"] == "button"
    label = next(n for n in nodes if n["attrs"].get("id") == "step-label")
    assert label["text"] == "stage 0 · epoch 1 · batch 1 · step 0"
    # nesting: part > layer group > block > rows; all open at this size
    parts = [n for n in section["children"][-1]["children"] if n["tag"] == "details"]
    assert [n["children"][0]["text"] for n in parts] == ["body", "head"]
    assert all("open" in n["attrs"] for n in nodes if n["tag"] == "details")
    layer1 = next(n for n in walk(parts[0]) if n["tag"] == "details" and n["children"][0]["text"] == "layer1")
    blocks = [n for n in layer1["children"] if n["tag"] == "details"]
    assert [b["children"][0]["text"] for b in blocks] == ["layer1[0]", "layer1[1]", "layer1[2]"]
    # each row: number, type, shape, name, group and one lettered, coloured cell per stage
    rows = [n for n in nodes if n["tag"] == "div" and "data-i" in n["attrs"]]
    assert len(rows) == len(lv["layers"])
    letter = {st: (cls, ch) for st, (cls, ch, _, _) in STATE_STYLE.items()}
    for row in rows:
        layer = lv["layers"][int(row["attrs"]["data-i"])]
        spans = {c["attrs"]["class"]: c for c in row["children"]}
        assert spans["t"]["text"] == layer["type"]
        assert spans["n"]["text"] == (f"#{layer['weight_layer']}" if layer["weight_layer"] else "")
        cells = [(c["attrs"]["class"], c["text"]) for c in spans["s"]["children"]]
        assert cells == [letter[s] for s in layer["states"]]
    # the shortcut branch sits in its own column beside the block's main path
    block = next(n for n in nodes if n["tag"] == "details" and n["children"][0]["text"] == "layer2[0]")
    columns = next(c for c in block["children"] if c["attrs"].get("class") == "bb")["children"]
    assert [c["attrs"]["class"] for c in columns] == ["mn", "sc"]
    side = [r["children"][3]["text"] for r in walk(columns[1]) if "data-i" in r["attrs"]]
    assert side == ["downsample[0]", "downsample[1]"]
    # the legend: exactly the states the cells use, each swatch in the cells' class (one colour each)
    legend = next(n for n in nodes if n["attrs"].get("class") == "ffl-legend")
    swatches = [li["children"][0]["attrs"]["class"] for li in legend["children"]]
    used = {c["attrs"]["class"] for r in rows for c in r["children"][5]["children"]}
    assert set(swatches) == used == {"st-tr", "st-bn", "st-fu", "st-cf"} and len(swatches) == len(used)
    css = "".join(n["text"] for n in nodes if n["tag"] == "style")
    for cls in used:
        assert len(re.findall(rf"#layers \.{cls}\{{background:(#[0-9a-f]{{6}})", css)) == 1


def test_every_model_name_is_escaped(tmp_path):
    from test_report_data import EVIL_GROUP, EVIL_NAMES, EVIL_STAGE, evil_run

    evil_run(tmp_path / "run")
    run = freezeframe.load(tmp_path / "run")
    text = layers_section(figures.from_run(run))
    for raw in (*EVIL_NAMES, EVIL_STAGE, EVIL_GROUP):
        assert raw not in text
    assert html_lib.escape(EVIL_NAMES[0]) in text and html_lib.escape(EVIL_STAGE) in text
    nodes = list(walk(parse(text)))
    assert not {n["tag"] for n in nodes} & {"img", "script"}
    assert not [a for n in nodes for a in n["attrs"] if a.startswith("on")]     # no handler from a name


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.ModuleList([nn.Linear(2, 2) for _ in range(8)])
        self.norm = nn.LayerNorm(2)
        self.out = nn.Linear(2, 2)

    def forward(self, x):
        for m in self.lin:
            x = m(x)
        return self.out(self.norm(x))


def test_a_1000_module_model_stays_readable_and_small(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[Wide() for _ in range(100)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with freezeframe.watch(model, opt, tmp_path / "run", every=1, mode="new"):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 2)).sum().backward()
            opt.step()
    run = freezeframe.load(tmp_path / "run")
    lv = layer_view(run.summary())
    assert len(lv["layers"]) == 1000 and lv["collapsed"] is True
    assert [b["label"] for b in lv["parts"][0]["blocks"]] == [f"[{i}]" for i in range(100)]
    text = layers_section({"layer_view": lv, "timeline": _timeline(run)})
    root = parse(text)
    blocks = [n for n in walk(root) if n["tag"] == "details" and n["attrs"].get("class") == "b"]
    assert len(blocks) == 100 and not any("open" in b["attrs"] for b in blocks)   # collapsed, but ...
    for b in blocks:                                    # ... each still shows its states per stage
        bars = next(c for c in b["children"][0]["children"] if c["attrs"].get("class") == "bs")
        assert [len(s["children"]) for s in bars["children"]] == [1]
        assert bars["children"][0]["children"][0]["attrs"]["class"] == "st-tr"
    assert text.count("data-i=") == 1000
    assert len(text) < 400 * 1000                       # about 330 bytes a layer



def test_the_counts_line_and_part_facts_say_what_the_model_holds(resnet):
    """The oracle is the model itself: its Conv2d / Linear modules on the main path, those in
    downsample branches, the head's, and the modules owning parameters, counted here; the head
    count belongs to the numbered weight layers, never to the shortcut convolutions; counts of one
    are singular."""
    model = resnet["model"]
    owners = [n for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    weights = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    short = [n for n in weights if ".downsample." in n]
    head = [n for n in weights if n == "fc"]
    text = html_lib.unescape(re.sub(r"<[^>]+>", " ", layers_section(
        {"layer_view": layer_view(resnet["summary"]), "timeline": _timeline(resnet["run"])})))
    text = " ".join(text.split())
    assert (f"{len(weights) - len(short)} weight layers (convolutions and Linear layers on the main path, numbered "
            f"#1… in forward order; {len(head)} of them in the head), plus {len(short)} convolutions on shortcut "
            f"branches (not numbered); {len(owners)} modules own parameters.") in text
    assert f"head {len(head)} module with parameters, 1 weight layer " in text
    assert not re.search(r"\b1 (modules|weight layers)\b", text)
