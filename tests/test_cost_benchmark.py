"""The cost-at-scale benchmark's measurement pieces (benchmarks/cost_measure.py) against oracles:
coreutils `du` and files of known size, an allocation of known size in a fresh process, and a
tiny watched run whose facts come from its own state dict. Nothing here is timed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import cost_measure  # noqa: E402
import cost_tables  # noqa: E402
from cost_workloads import Built, Case, _classify_step  # noqa: E402

MiB = 1024 * 1024


def _du(flag: str, path: Path) -> int:
    return int(subprocess.run(["du", "-s", flag, str(path)], check=True, capture_output=True, text=True)
               .stdout.split()[0])


def test_du_bytes_counts_what_du_counts(tmp_path):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    big = root / "big.bin"
    big.write_bytes(os.urandom(3 * MiB + 123))
    (root / "sub" / "small.txt").write_bytes(b"0123456789")
    os.link(big, root / "sub" / "same-as-big.bin")  # a hard link: counted once, as du does
    got = cost_measure.du_bytes(root)
    dirs = sum(os.lstat(d).st_size for d in (root, root / "sub"))
    assert got["apparent"] == 3 * MiB + 123 + 10 + dirs
    assert got["files"] == 2
    assert got["allocated"] >= 3 * MiB + 123
    if sys.platform.startswith("linux"):
        assert got["apparent"] == _du("-b", root)
        assert got["allocated"] == _du("-B1", root)
    largest = cost_measure.largest_files(root, 1)
    assert largest[0][1] == 3 * MiB + 123 and largest[0][0] in ("big.bin", "sub/same-as-big.bin")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_rss_sees_an_allocation_of_known_size(cli_env):
    """In a fresh process: the high-water mark, reset to the current RSS, rises by at least an
    allocation's size, keeps it after the allocation is freed, and a second reset drops it."""
    n = 96 * MiB
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(BENCH)!r})
        import cost_measure as m
        m.trim()
        reset = m.reset_peak()
        start = m.memory_status()
        block = b"\\x01" * {n}           # written, so resident
        during = m.memory_status()
        del block
        m.trim()
        after = m.memory_status()
        reset2 = m.reset_peak()
        again = m.memory_status()
        print(json.dumps(dict(reset=reset, reset2=reset2, start=start, during=during, after=after, again=again)))
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=cli_env)
    import json

    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["reset"] and r["reset2"]
    assert r["start"]["hwm"] - r["start"]["rss"] < 8 * MiB  # the reset brought the mark down to the RSS
    # The kernel batches RSS counts per thread (a few hundred KiB may not be folded in yet when the
    # mark is taken), hence 98 % of the allocation rather than all of it.
    assert r["during"]["rss"] - r["start"]["rss"] >= 0.98 * n
    assert r["after"]["hwm"] - r["start"]["rss"] >= 0.98 * n    # the peak outlives the allocation
    assert r["after"]["rss"] - r["start"]["rss"] < n / 2        # which was handed back
    assert r["again"]["hwm"] - r["start"]["rss"] < n / 2        # and a reset forgets it


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def _build_tiny() -> Built:
    torch.manual_seed(0)
    model = _Tiny()
    model.body.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = [(torch.randn(8, 32), torch.randint(0, 4, (8,))) for _ in range(2)]
    return Built(model, opt, batches, _classify_step, "tiny")  # the benchmark's own step


def test_a_tiny_case_plain_and_watched_gives_plausible_figures():
    case = Case("tiny", "tiny model", _build_tiny, steps=3)
    sd = _build_tiny().model.state_dict()
    param_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    trainable = sum(sd[k].numel() * sd[k].element_size() for k in ("head.weight", "head.bias"))
    plain = cost_measure.run_child(case, "plain")
    watched = cost_measure.run_child(case, "watched")
    for r in (plain, watched):
        assert (r["param_bytes"], r["trainable_bytes"], r["buffer_bytes"]) == (param_bytes, trainable, 0)
        assert r["param_count"] == sum(t.numel() for t in sd.values())
        assert r["rss_start"] > 10 * MiB and r["hwm"] >= r["rss_start"] and r["peak"] == r["hwm"] - r["rss_start"]
        assert r["steps_s"] > 0 and r["total_s"] >= r["steps_s"]
    assert "run_dir" not in plain
    import freezeframe

    assert watched["freezeframe_file"] == freezeframe.__file__
    assert watched["rss_after_watch"] >= watched["rss_after_import"] > 0
    d = watched["run_dir"]
    assert d["files"] >= 3 and d["apparent"] > 1000 and d["allocated"] >= 4096
    names = [n for n, _ in watched["largest_files"]]
    assert "manifest.json" in names or any(n.endswith(".parquet") for n in names)
    with pytest.raises(ValueError):
        cost_measure.run_child(case, "both")

    res = cost_measure.summarise({"plain": [plain], "watched": [watched]})
    assert res["peak_added"] == watched["peak"] - plain["peak"]
    assert res["rss_budget"] == 96 * MiB + 4 * trainable and res["disk_budget"] == 8 * MiB + 2 * trainable
    assert res["disk_allocated"] == d["allocated"] and res["disk_met"] is (d["allocated"] <= res["disk_budget"])
    assert res["time_ratio"] == pytest.approx(watched["total_s"] / plain["steps_s"])
    meta = {"date": "d", "command": "c", "reps": 1, "load_start": [0], "load_end": [0], "elapsed_s": 1.0,
            "machine": {"cores": 2, "cpu": "x", "torch": "t", "torch_threads": 1, "python": "p", "freezeframe": "f"}}
    block = cost_tables.markdown_block([res], None, meta)
    assert block.startswith(cost_tables.BEGIN) and block.endswith(cost_tables.END)
    assert "| tiny model |" in block and f"{d['allocated'] / MiB:.1f}" in block


def test_update_docs_replaces_only_its_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n\nbefore\n\n<!-- report-scaling:begin -->\nkept\n<!-- report-scaling:end -->\n")
    first = f"{cost_tables.BEGIN}\none\n{cost_tables.END}"
    cost_tables.update_docs(doc, first)
    cost_tables.update_docs(doc, f"{cost_tables.BEGIN}\ntwo\n{cost_tables.END}")
    text = doc.read_text()
    assert text.count(cost_tables.BEGIN) == 1 and "two" in text and "one" not in text
    assert "before" in text and "<!-- report-scaling:begin -->\nkept\n<!-- report-scaling:end -->" in text
