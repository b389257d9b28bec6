"""The overhead benchmark's verdict lines: the budgets (DESIGN.md, "Budgets") and freezeframe
against each peer at the same cadence."""

from __future__ import annotations

from overhead_tables import _model, _models, _rng

DEFAULT_BUDGET = 1.03          # freezeframe default, every model: watched / plain
FLOOR_BUDGET = 1.05            # freezeframe every=1's ratio over the floor's, every model
RESNET_EVERY1_BUDGET = 1.10    # freezeframe every=1 on ResNet-18: watched / plain


def _met(value: float, budget: float, ci: list[float] | None = None) -> str:
    """'met' / 'NOT met' for `value` ≤ `budget`, saying so when the 95 % interval holds the budget."""
    word = "met" if value <= budget else "NOT met"
    if ci is not None and ci[0] <= budget < ci[1]:
        word += " (the 95 % CI holds the budget: within noise)"
    return word


def _find(rs: list[dict], prefix: str) -> dict | None:
    return next((r for r in rs if r["instrument"].startswith(prefix)), None)


def budget_lines(results: list[dict]) -> list[str]:
    """Per model: default ≤ 1.03×; every=1 within 5 % of the floor (every=1 ratio ≤ 1.05 × the
    floor's ratio; the interval is the every=1 interval over the floor's ratio, the floor's own
    interval given beside it); on ResNet-18 every=1 ≤ 1.10×."""
    out = []
    for model in _models(results):
        rs = [r for r in results if _model(r) == model]
        default, every1, floor = (_find(rs, "freezeframe default"), _find(rs, "freezeframe every=1"),
                                  _find(rs, "floor"))
        if default:
            out.append(f"{model}, freezeframe default: {default['ratio']:.3f}× (95 % CI {_rng(default['ci95'])}), "
                       f"budget ≤ {DEFAULT_BUDGET:.2f}×: {_met(default['ratio'], DEFAULT_BUDGET, default['ci95'])}")
        if every1 and floor:
            rel = every1["ratio"] / floor["ratio"]
            rel_ci = [every1["ci95"][0] / floor["ratio"], every1["ci95"][1] / floor["ratio"]]
            out.append(f"{model}, freezeframe every=1 {every1['ratio']:.3f}× (95 % CI {_rng(every1['ci95'])}) vs "
                       f"the floor {floor['ratio']:.3f}× (95 % CI {_rng(floor['ci95'])}): {rel:.3f}× the floor's "
                       f"ratio ({_rng(rel_ci)}), budget ≤ {FLOOR_BUDGET:.2f}×: {_met(rel, FLOOR_BUDGET, rel_ci)}")
        if every1 and model.startswith("ResNet-18"):
            out.append(f"{model}, freezeframe every=1: {every1['ratio']:.3f}× (95 % CI {_rng(every1['ci95'])}), "
                       f"budget ≤ {RESNET_EVERY1_BUDGET:.2f}×: "
                       f"{_met(every1['ratio'], RESNET_EVERY1_BUDGET, every1['ci95'])}")
    return out


def _cmp(ours: dict, peer: dict) -> str:
    below = ours["ratio"] < peer["ratio"]
    overlap = ours["ci95"][1] >= peer["ci95"][0] and peer["ci95"][1] >= ours["ci95"][0]
    word = "below" if below else "NOT below"
    if overlap:
        word += " (95 % CIs overlap: not a clear difference)"
    return (f"{ours['instrument']} {ours['ratio']:.3f}× (CPU {ours['cpu_ratio']:.3f}×) vs {peer['instrument']} "
            f"{peer['ratio']:.3f}× (CPU {peer['cpu_ratio']:.3f}×): {word}")


def _times(x: float) -> str:
    return f"{x:.1f}×" if x < 10 else f"{x:.0f}×"


def peer_lines(results: list[dict]) -> list[str]:
    out = []
    for model in _models(results):
        rs = [r for r in results if _model(r) == model]
        every1, default = _find(rs, "freezeframe every=1"), _find(rs, "freezeframe default")
        for peer in (r for r in rs if r.get("peer")):
            if peer["every"] != 1 and peer.get("recorded_in_loop") == 0:
                out.append(f"{model}, sparse: no verdict for {peer['instrument']}: its measured pairs hold "
                           "no recorded step (the time cap came first)")
            elif peer["every"] == 1 and every1:
                out.append(f"{model}, every step: {_cmp(every1, peer)}")
            elif peer["every"] != 1 and default:
                note = ""
                if default["every"] and default["every"] < peer["every"]:
                    note = (f" — freezeframe records {_times(peer['every'] / default['every'])} as often "
                            f"(every {default['every']} vs every {peer['every']})")
                elif default["every"] and default["every"] > peer["every"]:
                    note = (f" — freezeframe records {_times(default['every'] / peer['every'])} less often "
                            f"(every {default['every']} vs every {peer['every']})")
                out.append(f"{model}, sparse: {_cmp(default, peer)}{note}")
    return out


def verdicts(results: list[dict]) -> list[str]:
    return budget_lines(results) + peer_lines(results)
