"""examples/fastai_walkthrough.ipynb, run end to end by a real Jupyter kernel (nbclient + ipykernel,
the kernel being this test's own Python): the inline display of the run it records holds the layer
view and the answers, and says what the run itself says."""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastai")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

import freezeframe  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "fastai_walkthrough.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after a kernel ran every cell in a temporary folder, and that folder."""
    tmp = tmp_path_factory.mktemp("notebook")
    # a kernelspec named python3 that starts this interpreter, found first on JUPYTER_PATH
    spec = tmp / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)", "language": "python"}))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("OMP_NUM_THREADS", "1")        # 2 shared cores: one intra-op thread per process
    mp.setenv("MPLBACKEND", "Agg")
    work = tmp / "work"
    work.mkdir()
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                         resources={"metadata": {"path": str(work)}})
        client.execute()
    finally:
        mp.undo()
    return nb, work


def _outputs(cell) -> list[dict]:
    return cell.get("outputs", [])


def _html_of(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in _outputs(cell)
                   if o["output_type"] in ("execute_result", "display_data"))


def test_the_notebook_is_committed_without_outputs_and_runs_on_python3():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    text = "".join(c.source for c in code)
    assert "vision_learner(dls, resnet34, pretrained=False, metrics=accuracy" in text
    assert "FreezeFrame(" in text and "fine_tune(" in text and "load_digits" in text


def test_every_cell_ran_without_an_error(executed):
    nb, work = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in _outputs(c) if o["output_type"] == "error"]
    assert (work / "runs" / "digits" / "manifest.json").exists()


def test_the_inline_display_holds_the_layer_view_and_the_answers(executed):
    """The cell ending in `run` displays the run's HTML: the layer view (a `<section id="layers">`
    with one row per module that owns parameters) and every answer of the run's own summary."""
    nb, work = executed
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.strip().endswith("\nrun"))
    shown = _html_of(cell)
    assert 'class="freezeframe-run"' in shown
    assert '<section id="layers"' in shown and "<script" not in shown
    summary = freezeframe.load(work / "runs" / "digits").summary()
    for answer in summary["answers"]:
        assert html.escape(answer["question"]) in shown, answer["question"]
        assert html.escape(answer["answer"]) in shown, answer["question"]
    section = shown[shown.index('<section id="layers"'):]
    section = section[:section.index("</section>")]
    # one layer row per module owning parameters, each named, in forward order
    modules = [x["module"] for x in summary["layers"]]
    rows = re.findall(r"data-i=(\d+)", section)
    assert len(rows) == len(modules) == summary["run"]["layer_counts"]["modules"]
    positions = [section.find(html.escape(m)) for m in modules]
    assert -1 not in positions


def test_the_run_is_the_fine_tune_the_notebook_did(executed):
    """The recorded run against the model and fit the notebook built: fastai's resnet34 body and a
    head of 2 Linear layers, two stages (frozen, then unfrozen) whose epochs and steps match the
    DataLoaders (20 training batches per epoch)."""
    from fastai.vision.all import resnet34
    from torch import nn

    nb, work = executed
    summary = freezeframe.load(work / "runs" / "digits").summary()
    assert summary["run"]["framework"] == "fastai"
    stages = summary["stages"]
    assert [st["name"] for st in stages] == [f"fine_tune(3, base_lr=0.01) · {k}" for k in ("frozen", "unfrozen")]
    assert [st["epochs"] for st in stages] == [1, 3]
    assert [st["steps"] for st in stages] == [20, 60]
    assert stages[1]["starts_from_previous_end"] is True
    tv = resnet34()
    main_convs = [n for n, m in tv.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    counts = summary["run"]["layer_counts"]
    assert (len(main_convs), counts["shortcut_weight_layers"], counts["head_weight_layers"]) == (33, 3, 2)
    assert counts["weight_layers"] == len(main_convs) + 2
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in _outputs(c)
                      if o["output_type"] == "stream")
    assert "320 training images in 20 batches, 80 for validation" in printed
    assert str(counts) in printed
