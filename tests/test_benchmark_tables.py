"""The benchmarks' table writers and verdicts, from hand-made results (benchmarks/step_cost_tables.py,
benchmarks/overhead_verdicts.py, benchmarks/overhead_results.py). Oracle: the strings written out
here. Nothing is timed."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import overhead_results  # noqa: E402
import step_cost_tables  # noqa: E402
from overhead_tables import time_rows  # noqa: E402
from overhead_verdicts import budget_lines  # noqa: E402


def _case(tensors, mode, plain, extra, lo, hi):
    return {"tensors": tensors, "mode": mode, "plain_us_median": plain, "extra_us_median": extra,
            "extra_us_ci95": [lo, hi], "pairs": 100}


STEP_RESULTS = [
    _case(8, "unrecorded", 312.4, 9.94, 8.0, 12.0),         # budget 15.4: met
    _case(8, "recorded", 311.0, 250.0, 240.0, 260.5),
    _case(100, "unrecorded", 2000.0, 19.0, 15.0, 25.0),     # budget 20.0: met, the CI holds it
    _case(100, "recorded", 2001.0, 1500.0, 1400.0, 1600.0),
    _case(2000, "unrecorded", 40000.0, 300.0, 250.0, 350.0),  # budget 115.0: NOT met
    _case(2000, "recorded", 40010.0, -5.0, -20.0, 9.0),
    _case(2000, "empty hooks", 40005.0, 240.0, 230.0, 250.0),
]


def test_step_cost_budget():
    assert [step_cost_tables.budget_us(n) for n in (8, 100, 400, 2000)] == [15.4, 20.0, 35.0, 115.0]


def test_step_cost_rows():
    assert step_cost_tables.table_rows(STEP_RESULTS) == [
        ["8", "312", "+9.9 (+8.0 to +12.0)", "+250.0 (+240.0 to +260.5)", "—", "15.4", "met"],
        ["100", "2000", "+19.0 (+15.0 to +25.0)", "+1500.0 (+1400.0 to +1600.0)", "—", "20.0",
         "met (the 95 % CI holds the budget)"],
        ["2,000", "40000", "+300.0 (+250.0 to +350.0)", "-5.0 (-20.0 to +9.0)", "+240.0 (+230.0 to +250.0)",
         "115.0", "NOT met"],
    ]


def test_step_cost_row_without_unrecorded_case():
    only_rec = [_case(400, "recorded", 9000.0, 700.0, 650.0, 750.0)]
    assert step_cost_tables.table_rows(only_rec) == [["400", "9000", "—", "+700.0 (+650.0 to +750.0)", "—", "35.0", "—"]]


META = {"command": ".venv/bin/python benchmarks/step_cost.py", "date": "2026-12-07T20:00:00+00:00",
        "machine": {"cores": 2, "cpu": "AMD EPYC", "torch": "2.14.1", "torch_threads": 1, "python": "3.11.7",
                    "freezeframe": "0.1.0"},
        "load_start": [1.0, 1.0, 1.0], "load_end": [2.0, 2.0, 2.0], "elapsed_s": 120.0, "batch": 2, "warmup": 20}


def test_step_cost_markdown_block_and_placement(tmp_path):
    block = step_cost_tables.markdown_block(STEP_RESULTS, META)
    lines = block.split("\n")
    assert lines[0] == "<!-- step-cost:begin -->" and lines[-1] == "<!-- step-cost:end -->"
    assert ("| tensors | plain µs/step | unrecorded +µs (95 % CI) | recorded +µs (95 % CI) | "
            "empty hooks +µs (95 % CI) | budget (unrecorded) µs | budget |") in lines
    assert ("| 2,000 | 40000 | +300.0 (+250.0 to +350.0) | -5.0 (-20.0 to +9.0) | +240.0 (+230.0 to +250.0) | "
            "115.0 | NOT met |") in lines
    assert ("- Budget for the unrecorded step (15 µs + 0.05 µs × tensors): NOT met at 2,000 tensors "
            "(+300.0 µs, 2.6× the budget).") in lines
    assert ("- Of that, torch's calls of the hooks alone (the same hooks with empty bodies): 2,000 tensors "
            "+240.0 µs (2.1× the budget), leaving +60.0 µs of the recorder's own work.") in lines

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\ntext\n\n<!-- report-scaling:begin -->\nR\n<!-- report-scaling:end -->\n")
    step_cost_tables.write_docs(doc, STEP_RESULTS, META)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\ntext\n\n<!-- step-cost:begin -->")
    assert text.endswith("<!-- step-cost:end -->\n\n<!-- report-scaling:begin -->\nR\n<!-- report-scaling:end -->\n")
    step_cost_tables.write_docs(doc, STEP_RESULTS[:2], META)          # replaced in place, once
    again = doc.read_text()
    assert again.count("<!-- step-cost:begin -->") == 1 and "| 2,000 |" not in again
    assert again.endswith("<!-- step-cost:end -->\n\n<!-- report-scaling:begin -->\nR\n<!-- report-scaling:end -->\n")


def _row(workload, instrument, ratio, lo, hi, **kw):
    return {"workload": workload, "instrument": instrument, "ratio": ratio, "ci95": [lo, hi], **kw}


RESNET, MLP = "ResNet-18, 64 px, batch 16", "MLP 256-256-256-10, batch 64"
OVERHEAD = [
    _row(RESNET, "freezeframe default", 1.020, 1.010, 1.029),
    _row(RESNET, "freezeframe every=1", 1.150, 1.120, 1.180),
    _row(RESNET, "floor (every=1)", 1.140, 1.100, 1.170),
    _row(MLP, "freezeframe default", 1.025, 1.010, 1.040),
    _row(MLP, "freezeframe every=1", 1.527, 1.500, 1.550),
    _row(MLP, "floor (every=1)", 1.271, 1.250, 1.290),
]


def test_budget_lines():
    assert budget_lines(OVERHEAD) == [
        "ResNet-18, freezeframe default: 1.020× (95 % CI 1.010–1.029), budget ≤ 1.03×: met",
        "ResNet-18, freezeframe every=1 1.150× (95 % CI 1.120–1.180) vs the floor 1.140× (95 % CI 1.100–1.170): "
        "1.009× the floor's ratio (0.982–1.035), budget ≤ 1.05×: met",
        "ResNet-18, freezeframe every=1: 1.150× (95 % CI 1.120–1.180), budget ≤ 1.10×: NOT met",
        "MLP 256-256-256-10, freezeframe default: 1.025× (95 % CI 1.010–1.040), budget ≤ 1.03×: met "
        "(the 95 % CI holds the budget: within noise)",
        "MLP 256-256-256-10, freezeframe every=1 1.527× (95 % CI 1.500–1.550) vs the floor 1.271× "
        "(95 % CI 1.250–1.290): 1.201× the floor's ratio (1.180–1.220), budget ≤ 1.05×: NOT met",
    ]


def test_selects():
    assert overhead_results.selects("", RESNET, "anything")
    assert overhead_results.selects("Freezeframe,floor", MLP, "floor (every=1)")
    assert overhead_results.selects("resnet", RESNET, "wandb.watch all, log_freq=1")
    assert not overhead_results.selects("freezeframe,floor", MLP, "TensorBoard histograms, every step")
    # ", " belongs to the names: one substring, not two
    assert overhead_results.selects(f"{MLP} / floor", MLP, "floor (every=1)")
    assert not overhead_results.selects(f"{MLP} / floor", RESNET, "floor (every=1)")


def test_merge_keeps_unselected_rows_with_their_date():
    peer = _row(MLP, "TensorBoard histograms, every step", 3.0, 2.9, 3.1)
    previous = {"meta": {"date": "2026-11-29T09:49:42+00:00",
                         "skipped": [{"workload": MLP, "instrument": "wandb.watch all, log_freq=1", "reason": "x"},
                                     {"workload": MLP, "instrument": "floor (every=1)", "reason": "y"}]},
                "results": [OVERHEAD[3], peer, OVERHEAD[5]]}
    fresh = [{**OVERHEAD[5], "ratio": 1.2, "measured": "2026-12-07"},
             {**OVERHEAD[4], "measured": "2026-12-07"}]
    rows, skipped = overhead_results.merge(previous, fresh, [], "freezeframe,floor")
    assert [(r["instrument"], r["ratio"], r["measured"]) for r in rows] == [
        ("TensorBoard histograms, every step", 3.0, "2026-11-29"),   # kept, with its file's date
        ("floor (every=1)", 1.2, "2026-12-07"),                      # replaced in place
        ("freezeframe every=1", 1.527, "2026-12-07"),                # new: last
    ]                                                                # default: selected, not re-measured → gone
    assert skipped == [{"workload": MLP, "instrument": "wandb.watch all, log_freq=1", "reason": "x"}]
    assert time_rows([{**rows[0], "every": 1, "pairs": 10, "step_ms_plain_median": 1.0, "ratio_kind": "median",
                       "ratio_median_steps": 1.0, "ratio_mean": 1.0, "per_block_iqr": [1.0, 1.0],
                       "cpu_ratio": 1.0}])[0][-1] == "2026-11-29"


def test_the_empty_hooks_case_carries_the_hooks_an_unrecorded_step_runs(tmp_path):
    """step_cost.py's 'empty hooks' model: the same hooks torch calls on the recorder's unrecorded
    steps (counted on a watched model after its first steps), none of the recorder's work."""
    import torch

    import freezeframe
    import step_cost

    def hooks(model, opt):
        return (len(model._forward_pre_hooks), len(model._forward_hooks),
                sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules() if m is not model),
                len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks),
                [len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()])

    x = torch.randn(2, 4)
    watched = step_cost.make_model(8)
    opt = torch.optim.SGD(watched.parameters(), lr=1e-3, momentum=0.9)
    with freezeframe.watch(watched, opt, tmp_path / "run", every=10 ** 9, mode="new"):
        for _ in range(3):
            step_cost.train_step(watched, opt, x)
        got = hooks(watched, opt)
    bare = step_cost.make_model(8)
    bare_opt = torch.optim.SGD(bare.parameters(), lr=1e-3, momentum=0.9)
    step_cost.empty_hooks(bare, bare_opt)
    assert hooks(bare, bare_opt) == got == (1, 0, 0, 1, 1, [1] * 8)
