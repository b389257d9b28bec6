"""The report's data: the numbers embedded in the HTML equal the run's (recomputed the slow, obvious
way), the PNGs are drawn, the notebook display works, and every name from the model is escaped."""

from __future__ import annotations

import base64
import html as html_lib
import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import freezeframe
from freezeframe.analyse import figures
from freezeframe.analyse.rollup import rollup
from freezeframe.cli import main as cli_main
from freezeframe.errors import FreezeFrameError
from freezeframe.render.html import render_html, write_html
from freezeframe.render.images import write_pngs
from models import BodyHead, Branchy, batch, build, loss_of

EVIL_MODULE = "<img src=q onerror=alert(1)>"
EVIL_NAMES = (EVIL_MODULE, "</script><script>alert(2)</script>", 'x" onmouseover="alert(3)')
EVIL_STAGE = "</script><img src=q onerror=alert(4)> $cost$"
EVIL_GROUP = "<b onmouseover=alert(5)>g</b>"


# ----------------------------------------------------------------------------- real runs
def two_stage_run(run_dir, steps=(10, 14)):
    """Body frozen except BatchNorm, head trained with one-cycle; unfreeze, a new optimizer with
    one lr per layer group (1e-4 / 1e-3 / 1e-2). Returns (model at the end, the losses logged)."""
    model = build(BodyHead)
    groups = model.layer_groups()
    model.freeze_body(keep_bn=True)
    opt = torch.optim.SGD([{"params": g} for g in groups], lr=0.05, momentum=0.9)
    losses = []
    with freezeframe.watch(model, opt, run_dir, every=1, mode="new") as rec:
        def fit(name, opt, sched, n, offset):
            with rec.stage(name):
                for i in range(n):
                    x, y = batch(model, offset + i)
                    opt.zero_grad()
                    loss = loss_of(model, x, y)
                    loss.backward()
                    opt.step()
                    sched.step()
                    rec.log(loss=loss.item())
                    losses.append(loss.item())

        fit("head only", opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps[0]), steps[0], 0)
        model.unfreeze()
        opt2 = torch.optim.SGD([{"params": g} for g in groups], lr=1e-3, momentum=0.9)
        rec.track(opt2)
        fit("unfrozen", opt2, torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=[1e-4, 1e-3, 1e-2], total_steps=steps[1]),
            steps[1], 100)
    return model, losses


class Evil(nn.Module):
    def __init__(self):
        super().__init__()
        for name in EVIL_NAMES:
            self.add_module(name, nn.Linear(3, 3))

    def forward(self, x):
        for m in self.children():
            x = m(x)
        return x


def evil_run(run_dir):
    """A two-stage run whose module, stage and param-group names are HTML/script injections."""
    torch.manual_seed(0)
    model = Evil()
    first = getattr(model, EVIL_NAMES[0])
    opt = torch.optim.SGD([{"params": list(first.parameters()), "name": EVIL_GROUP},
                           {"params": [p for n, p in model.named_parameters() if not n.startswith(EVIL_MODULE)]}],
                          lr=0.01)
    x = torch.randn(4, 3)
    with freezeframe.watch(model, opt, run_dir, every=1, mode="new") as rec:
        for p in first.parameters():
            p.requires_grad_(False)
        with rec.stage(EVIL_STAGE):
            for _ in range(3):
                opt.zero_grad()
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                rec.log(loss=loss.item())
        for p in first.parameters():
            p.requires_grad_(True)
        with rec.stage("all"):
            for _ in range(3):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
    return model


# ----------------------------------------------------------------------------- helpers
def embedded(text: str) -> dict:
    m = re.search(r'<script type="application/json" id="ff-data">(.*?)</script>', text, re.S)
    assert m, "the report embeds its data as JSON"
    return json.loads(m.group(1))


def decode(v) -> np.ndarray:
    """A plotly array from the embedded JSON: a typed array {dtype, bdata, shape} or a plain list."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]).newbyteorder("<"))
        return a.reshape([int(n) for n in v["shape"].split(",")]) if "shape" in v else a
    return np.asarray([math.nan if x is None else x for x in v], dtype=float)


def traces(fig: dict, type_: str) -> list[dict]:
    return [t for t in fig["data"] if t["type"] == type_]


def row_modules(fig: dict, rows: list[dict]) -> list[str]:
    """The module of each y row of a figure. The y values are the readable labels, the same text
    on the axis and in every hover (never `head.0` in one and `head[0]` in the other)."""
    axis = fig["layout"]["yaxis"]
    assert axis["ticktext"] == axis["tickvals"]
    assert [html_lib.unescape(v) for v in axis["tickvals"]] == [r["label"] for r in rows]
    return [r["name"] for r in rows]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    model, losses = two_stage_run(run_dir)
    run = freezeframe.load(run_dir)
    text = render_html(run)
    return {"dir": run_dir, "model": model, "losses": losses, "run": run, "html": text, "data": embedded(text)}


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evil") / "run"
    evil_run(run_dir)
    run = freezeframe.load(run_dir)
    return {"dir": run_dir, "run": run, "html": render_html(run)}


# ----------------------------------------------------------------------------- numbers
def test_every_figure_is_embedded(demo):
    data = demo["data"]
    assert data["order"] == ["freeze_map", "heatmap", "lr", "drift", "loss"]
    assert set(data["figures"]) == set(data["order"])
    for name in data["order"]:
        assert f'id="fig-{name}"' in demo["html"]


def test_learning_rates_equal_the_stored_steps(demo):
    """Oracle: the steps Parquet read directly, lr of group g where g's optimizer stepped."""
    stored = pq.read_table(demo["dir"] / "steps").to_pylist()
    summary = demo["run"].summary()
    opt_of = {g["index"]: g["optimizer"] for s in summary["stages"] for g in s["groups"]}
    expected = defaultdict(dict)
    for row in stored:
        for g, lr in enumerate(row["lr"]):
            if opt_of.get(g) == row["optimizer"]:
                expected[g][row["step"]] = lr
    got = defaultdict(dict)
    for t in traces(demo["data"]["figures"]["lr"], "scatter"):
        for x, y in zip(decode(t["x"]), decode(t["y"])):
            got[t["meta"]["group"]][int(x)] = float(y)
    assert got == expected  # exact: float64 typed arrays
    # the discriminative lrs of stage 1 (groups 3-5): 1e-4 / 1e-3 / 1e-2 at every step
    for step, lr0 in got[3].items():
        assert [got[4][step] / lr0, got[5][step] / lr0] == pytest.approx([10, 100], rel=1e-9)


def test_update_heatmap_equals_naive_recomputation(demo):
    run = demo["run"]
    fig = demo["data"]["figures"]["heatmap"]
    hm = figures.update_heatmap(run.summary(), run._stored.steps, run._stored.tensors)
    assert not hm["downsampled"]
    module_of = {p["name"]: p["module"] or "(root)" for p in run.summary()["params"]}
    upd, par = defaultdict(float), defaultdict(float)
    for row in run.tensors().to_pylist():
        if row["name"] in module_of and row["update_norm"] is not None:
            key = (module_of[row["name"]], row["step"])
            upd[key] += row["update_norm"] ** 2
            par[key] += row["param_norm"] ** 2
    names = row_modules(fig, hm["rows"])
    checked = 0
    for t in traces(fig, "heatmap"):
        if "meta" not in t:
            continue
        z, xs = decode(t["z"]), decode(t["x"])
        for r, name in enumerate(names):
            for c, step in enumerate(xs):
                key = (name, int(step))
                if key in upd and upd[key] > 0:
                    assert z[r, c] == pytest.approx(0.5 * math.log10(upd[key] / par[key]), abs=1e-4)
                    checked += 1
                elif key not in upd:
                    assert math.isnan(z[r, c])
    assert checked > 100


def test_frozen_cells_are_distinct_from_small_values(demo):
    fig = demo["data"]["figures"]["heatmap"]
    run = demo["run"]
    names = row_modules(fig, figures.update_heatmap(run.summary(), run._stored.steps, run._stored.tensors)["rows"])
    stage0 = next(t for t in traces(fig, "heatmap") if t.get("meta") == {"stage": 0})
    z = decode(stage0["z"])
    conv = names.index("body.0")   # frozen in stage 0; its BatchNorm trains ("partial" block)
    bn = names.index("body.1")
    assert np.isnan(z[conv]).all() and np.isfinite(z[bn]).all()
    overlay = next(t for t in traces(fig, "heatmap") if "frozen" in t["name"] and "0" in t["name"])
    assert [v[0] for v in overlay["z"]][conv] == 1 and [v[0] for v in overlay["z"]][bn] is None
    assert "frozen" in overlay["hovertemplate"]


def test_drift_equals_summary_and_the_reference(demo):
    run, model = demo["run"], demo["model"]
    summary = run.summary()
    fig = demo["data"]["figures"]["drift"]
    names = row_modules(fig, figures.freeze_map(summary)["rows"])
    depth = figures.freeze_map(summary)["depth"]
    rows = {r["name"]: r for r in rollup(summary, depth)}
    ref = run.reference()
    now = dict(model.named_parameters())
    last = len(summary["stages"]) - 1
    for t in traces(fig, "scatter"):
        if "meta" not in t:
            continue
        k = t["meta"]["stage"]
        xs = decode(t["x"])
        for name, x in zip(names, xs):
            want = rows[name]["stages"][k]["drift_rel"]
            assert x == pytest.approx(want, rel=1e-12)
            if k == last:  # the slow, obvious way: the model as it ended vs the stored reference
                params = rows[name]["params"]
                num = sum(float((now[p].detach() - ref[p]).pow(2).sum()) for p in params)
                den = sum(float(ref[p].pow(2).sum()) for p in params)
                assert x == pytest.approx(math.sqrt(num / den), rel=1e-4)


def test_freeze_map_states_match_the_summary(demo):
    summary = demo["run"].summary()
    fm = figures.freeze_map(summary)
    mods = {m["name"] or "(root)": m for m in summary["modules"]}
    word = {True: "trainable", False: "frozen", "partial": "partial"}
    for r, row in enumerate(fm["rows"]):
        for k in range(len(summary["stages"])):
            assert fm["state"][r][k] == word[mods[row["name"]]["stages"][k]["trainable"]]
    fig = demo["data"]["figures"]["freeze_map"]
    z = fig["data"][0]["z"]
    conv = row_modules(fig, fm["rows"]).index("body.0")
    assert 0 <= z[conv][0] < 1 and 2 <= z[conv][1] < 3     # frozen band, then trainable band
    assert fm["text"][conv][0] == "frozen, unchanged"        # bitwise unchanged while frozen
    assert "group 0" in fm["rows"][conv]["label"]


def test_loss_and_stage_boundaries(demo):
    fig = demo["data"]["figures"]["loss"]
    assert [t["meta"]["stage"] for t in fig["data"]] == [0, 1]          # one trace per stage
    assert np.concatenate([decode(t["y"]) for t in fig["data"]]).tolist() == demo["losses"]
    xs = [decode(t["x"]).tolist() for t in fig["data"]]
    assert xs == [list(range(10)), list(range(10, 24))]
    for t in fig["data"]:                                                # hover names its stage and step
        assert f"stage {t['meta']['stage']}" in t["hovertemplate"] and "step %{x}" in t["hovertemplate"]
    lines = [s for s in fig["layout"]["shapes"] if s["type"] == "line"]
    assert [s["x0"] for s in lines] == [9.5]
    assert len([s for s in fig["layout"]["shapes"] if s["type"] == "rect"]) == 2
    event = [a["text"] for a in fig["layout"]["annotations"] if a["x"] == 9.5]
    assert event == ["▸ 4 tensors unfrozen"]                             # what began stage 1


def test_answers_and_findings_are_in_the_page(demo):
    summary = demo["run"].summary()
    for a in summary["answers"]:
        assert html_lib.escape(a["answer"]) in demo["html"]
    assert "Findings" in demo["html"]


def test_zero_updates_are_marked_not_drawn_as_small(tmp_path):
    """A trainable module that gets no gradient is recorded with an update of exactly 0."""
    model = build(Branchy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, tmp_path / "run", every=1):
        for i in range(3):
            x, y = batch(model, i)
            opt.zero_grad()
            loss_of(model, x, y, use_b=False).backward()
            opt.step()
    run = freezeframe.load(tmp_path / "run")
    hm = figures.from_run(run)["heatmap"]
    b = [r["name"] for r in hm["rows"]].index("head_b")
    assert hm["zero"][b].all() and np.isnan(hm["values"][b]).all()
    assert not hm["zero"][[r for r in range(len(hm["rows"])) if r != b]].any()
    fig = embedded(render_html(run))["figures"]["heatmap"]
    overlay = next(t for t in traces(fig, "heatmap") if t["name"].startswith("update exactly 0"))
    assert np.isfinite(decode(overlay["z"])[b]).all() and "exactly 0" in overlay["hovertemplate"]


def test_heatmap_downsamples_honestly():
    """Bins never straddle a stage, each column is the median of its steps, and the note says so."""
    rng = np.random.default_rng(0)
    values = rng.normal(-3, 1, (3, 50))
    lo, hi = np.array([0, 7, 20, 33]), np.array([7, 20, 33, 50])
    got = figures.binned_median(values, lo, hi)
    assert np.allclose(got, np.stack([np.median(values[:, a:b], axis=1) for a, b in zip(lo, hi)], axis=1))


def test_readable_names():
    assert figures.readable_name("0.4.0.conv1", fastai=True) == "body[4][0].conv1"
    assert figures.readable_name("1.8", fastai=True) == "head[8]"
    assert figures.readable_name("stem.0") == "stem[0]"
    assert figures.readable_name("") == "(root)"


# ----------------------------------------------------------------------------- PNGs, CLI, notebook
def test_pngs_are_drawn(demo, tmp_path):
    import matplotlib.image

    paths = write_pngs(demo["run"], tmp_path / "png")
    assert sorted(p.name for p in paths) == ["drift.png", "freeze_map.png", "learning_rates.png", "loss.png",
                                             "update_heatmap.png"]
    for p in paths:
        assert p.stat().st_size > 10_000
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05


def test_cli_report_writes_html_and_pngs(demo, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert cli_main(["report", str(demo["dir"]), "-o", str(out), "--png", str(tmp_path / "png")]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "update_heatmap.png" in printed and "report built in" in printed
    assert embedded(out.read_text())["order"][0] == "freeze_map"
    assert cli_main(["report", str(demo["dir"])]) == 0
    assert (demo["dir"] / "report.html").exists()


def test_notebook_display_and_show(demo):
    run = demo["run"]
    text = run._repr_html_()
    assert "<table" in text and "Does unfreezing eliminate" in text and "frozen, unchanged" in text
    for name in ("freeze_map", "heatmap", "lr", "drift", "loss"):
        fig = run.show(name)  # plotly.py validates every property of the figure
        assert type(fig).__name__ == "Figure" and len(fig.data) >= 1
    with pytest.raises(FreezeFrameError, match="unknown figure"):
        run.show("histogram")


def test_plotting_libraries_are_imported_only_when_drawing(demo):
    code = ("import sys, freezeframe; r = freezeframe.load(sys.argv[1]); r.summary(); r._repr_html_(); repr(r); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('plotly', 'matplotlib')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(demo["dir"])], check=True, capture_output=True, timeout=120)


# ----------------------------------------------------------------------------- escaping
def _attributes(text: str) -> list[str]:
    """Every attribute name of every tag, as a browser's tokenizer reads them (a name in an
    escaped, quoted attribute value is text, not an attribute)."""
    from html.parser import HTMLParser

    names: list[str] = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            names.extend(k.lower() for k, _ in attrs)

    Tags().feed(text)
    return names


def test_names_from_the_model_are_escaped_in_html(evil):
    text = evil["html"]
    for raw in EVIL_NAMES + (EVIL_STAGE, EVIL_GROUP):
        assert raw not in text
    page = re.sub(r"<script>.*?</script>", "", text, count=1, flags=re.S)   # everything but plotly.js
    assert "<img" not in page.lower() and 'onmouseover="' not in page
    assert not [a for a in _attributes(page) if a.startswith("on")]         # no tag with an event handler
    # plotly.js, the data, the boot code, the layer view's scrubber
    assert text.count("<script") == 4 and text.count("</script>") == 4
    assert html_lib.escape(EVIL_STAGE) in text                             # shown as text in the stages table
    data = embedded(text)
    fm = data["figures"]["freeze_map"]
    assert any(html_lib.escape(EVIL_MODULE) in v for v in fm["layout"]["yaxis"]["tickvals"])
    labels = " ".join(fm["layout"]["yaxis"]["ticktext"])
    assert html_lib.escape(EVIL_MODULE) in labels and EVIL_MODULE not in labels
    lr_names = {t["name"] for t in data["figures"]["lr"]["data"]}
    assert html_lib.escape(EVIL_GROUP) in lr_names


def test_names_are_escaped_in_notebook_and_images(evil, tmp_path):
    text = evil["run"]._repr_html_()
    assert "<img" not in text and "<script" not in text and html_lib.escape(EVIL_MODULE) in text
    paths = write_pngs(evil["run"], tmp_path / "png")   # '$' in a stage name is not mathtext
    assert len(paths) == 5
    write_html(evil["run"], tmp_path / "evil.html")


# ----------------------------------------------------------------------------- the summary's format
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _doc_section(text: str, heading: str) -> str:
    m = re.search(rf"^#+ `{re.escape(heading)}`\s*$(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert m, f"docs/summary-format.md has no section `{heading}`"
    return m.group(1)


def test_every_summary_field_is_documented(demo, tmp_path):
    s = demo["run"].summary()
    doc = (DOCS / "summary-format.md").read_text()
    sections = {
        "run": s["run"], "run.sessions[]": s["run"]["sessions"][0], "stages[]": s["stages"][0],
        "stages[].groups[]": s["stages"][0]["groups"][0], "params[]": s["params"][0],
        "params[].stages[]": s["params"][0]["stages"][0], "modules[]": s["modules"][0],
        "buffers[]": s["buffers"][0], "findings[]": s["findings"][0], "answers[]": s["answers"][0],
        "layers[]": s["layers"][0], "transitions[]": s["transitions"][0],
    }
    assert set(s) - {"schema"} == {k.split("[")[0] for k in sections if "." not in k}
    for heading, obj in sections.items():
        text = _doc_section(doc, heading)
        missing = [k for k in obj if f"`{k}`" not in text]
        assert not missing, f"{heading}: {missing} not documented"
        table = re.search(r"^\| field \| meaning \|\n(?:^\|.*\n?)*", text, re.M)  # the fields table, if any
        rows = re.findall(r"^\| ([^|]+) \|", table.group(0), re.M)[2:] if table else []
        documented = {k for row in rows for k in re.findall(r"`([a-z_]+)`", row)}
        assert documented <= set(obj), f"{heading}: documented but not produced: {documented - set(obj)}"
    for key in s["modules"][0]["stages"][0]:
        assert f"`{key}`" in _doc_section(doc, "modules[]"), key
    for key in s["buffers"][0]["stages"][0]:
        assert f"`{key}`" in _doc_section(doc, "buffers[]"), key


def test_every_finding_code_is_documented_with_its_severity():
    src = Path(freezeframe.__file__).parent / "analyse"
    found = set()
    for f in ("findings.py", "findings_writes.py"):
        found |= set(re.findall(r'_finding\(\s*"([a-z-]+)",\s*"(error|warning|info)"', (src / f).read_text()))
    assert len(found) >= 13
    table = _doc_section((DOCS / "summary-format.md").read_text(), "findings[]")
    readme = (DOCS.parent / "README.md").read_text()
    readme_table = readme[readme.index("## What the findings catch"):]
    assert "(docs/summary-format.md#findings)" in readme_table
    for code, severity in sorted(found):
        assert re.search(rf"^\| `{code}` \| {severity} \| [^|]+ \| [^|]+ \|$", table, re.M), code
        assert re.search(rf"^\| `{code}` \| {severity} \| ", readme_table, re.M), code


def test_summary_says_how_many_steps_were_expected_and_read(tmp_path):
    run_dir = tmp_path / "run"
    two_stage_run(run_dir)
    r = freezeframe.load(run_dir).summary()["run"]
    assert (r["complete"], r["in_progress"], r["steps"], r["steps_expected"], r["unreadable"]) == (True, False, 24, 24, [])
    for chunk in (run_dir / "steps").glob("*.parquet"):  # a damaged steps table
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    r = freezeframe.load(run_dir).summary()["run"]
    assert r["complete"] is False and r["steps_expected"] == 24 and r["steps"] < 24
