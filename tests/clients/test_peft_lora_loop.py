"""A plain PyTorch loop over a PEFT LoRA GPT-2 (built from a config), two named stages: what the
answers and the report say of it, against the model's own state dicts (docs/peft.md)."""

from __future__ import annotations

import html
import re

import freezeframe
from freezeframe.render.html import write_html
from peft_helpers import gpt2_lm, lora_layers, oracle_delta_rel, run_loop


def test_answers_and_report_of_a_lora_loop(run_dir, tmp_path):
    model = gpt2_lm()
    snaps, _ = run_loop(model, run_dir)
    base = [n for n, _ in model.named_parameters() if ".lora_" not in n]
    adapters = [n for n, _ in model.named_parameters() if ".lora_" in n]
    unchanged = all(snaps[0][n].equal(snaps[2][n]) for n in base)
    rel = {m: oracle_delta_rel(snaps[2], m) for m in lora_layers(model)}
    top = max(rel, key=rel.get)
    numel = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    assert unchanged and len(base) == 28 and len(adapters) == 4
    run = freezeframe.load(run_dir)
    answer = run.summary()["answers"][1]["answer"]
    assert (f"At the end of stage 1 (two), the {len(base)} base tensors ({numel:,} parameters) are bitwise "
            f"unchanged; the {len(adapters)} adapter tensors trained; the effective update ΔW = scale·B·A is "
            f"largest in {top}, {100 * rel[top]:.3g} % of W (‖ΔW‖/‖W‖ at the end of stage 1 (two)).") in answer
    page = write_html(run, tmp_path / "report.html").read_text()
    table = page[page.index("<h3>Adapters</h3>"):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr><td>([^<]+)</td><td>default</td>(.*?)</tr>", table)
    assert [html.unescape(r[0]) for r in rows] == sorted(rel)
    for name, cells in rows:
        values = re.findall(r"<td>([0-9.e+-]+) %</td>", cells)
        want = [f"{100 * oracle_delta_rel(snaps[k + 1], name):.3g}" for k in range(2)]
        assert values == want
        assert "non-zero" in cells and "bitwise unchanged" in cells


def test_no_adapters_table_without_peft(run_dir, tmp_path):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir) as rec, rec.stage("one"):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    run = freezeframe.load(run_dir)
    assert run.summary()["run"]["peft"] is None
    page = write_html(run, tmp_path / "report.html").read_text()
    assert "<h3>Adapters</h3>" not in page and "Adapters" not in run.summary()["answers"][1]["answer"]
