"""torch.distributed with real `torchrun --nproc_per_node 2` processes (gloo, CPU): one run
directory written by rank 0 with the user's names; the same per-tensor facts as the same training
in one process (norms within floating-point tolerance, bitwise facts and content hashes exact,
steps equal), under DDP and FSDP2 (`fully_shard`); a recorder failing on one rank neither hangs
the job nor changes its training; no process outlives torchrun."""

from __future__ import annotations

import inspect
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import freezeframe
import oracle

pytestmark = pytest.mark.distributed


class Net(nn.Module):
    """A conv body and a linear head, on (N, 1, 6, 6); no BatchNorm (its statistics are per rank)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x))


LAUNCH_TIMEOUT = 300  # seconds; a launch that takes longer hung

# Written into tmp_path and run by torchrun on 2 ranks, or in this process for the one-process twin.
_SCRIPT = r'''
"""Two-stage fine-tuning of a tiny conv net, in one process or on every rank of torchrun (DDP,
then FSDP2), watched by freezeframe. Each phase writes what this rank saw to OUT/results/.

Phase "facts" (each mode; run directory OUT/run-MODE): stage "head" (body frozen), stage "all"
(unfrozen), every=1; then a second watch() appends stage "again". Phase "failure" (with
--fail-rank R and --fail-cases MODE:CASE ...): the recorder of rank R fails at one point of its
work (CASES: freezeframe function, which call); the same training runs again unwatched, and
both final states are kept."""

import argparse
import contextlib
import hashlib
import json
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import freezeframe
import freezeframe.capture.metrics as metrics
import freezeframe.hashing as hashing
from freezeframe.capture.boundaries import BoundaryTracker
from freezeframe.capture.layerorder import LayerOrder

ap = argparse.ArgumentParser()
ap.add_argument("--modes", nargs="+", choices=["single", "ddp", "fsdp"], required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--fail-rank", type=int, default=None)
ap.add_argument("--fail-cases", nargs="*", default=[])
args = ap.parse_args()
torch.set_num_threads(1)

B, STEPS, FAIL_STEPS = 4, (3, 3, 2), 14  # per-rank batch; steps of the 3 stages; steps of the failure phase


# NET
distributed = args.modes != ["single"]
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 2)
# Every rank draws the same global batches and trains on its slice; one process on all of them
# (a mean loss over the whole batch: the average of the ranks' gradients, as DDP takes it).
g = torch.Generator().manual_seed(1)
X, Y = torch.randn(16, world * B, 1, 6, 6, generator=g), torch.randint(0, 3, (16, world * B), generator=g)
part = slice(rank * B, (rank + 1) * B) if distributed else slice(None)


def build(mode):
    torch.manual_seed(0)
    model = Net()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Wrapped while every tensor is trainable: DDP synchronises only the gradients of tensors
        # that require grad when it is built. find_unused_parameters: the frozen body has none.
        net = DDP(model, find_unused_parameters=True)
    elif mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for m in (model.body[0], model.body[2], model.head):
            fully_shard(m, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
    else:
        net = model
    for p in model.body.parameters():
        p.requires_grad_(False)
    return model, net, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(net, opt, steps, start):
    for k in range(start, start + steps):
        loss = F.cross_entropy(net(X[k, part]), Y[k, part])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start + steps


def state_hash(model):
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2: every rank, same order
        h.update(name.encode() + t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def report(phase, out):
    os.makedirs(os.path.join(args.out, "results"), exist_ok=True)
    with open(os.path.join(args.out, "results", f"{phase}.rank{rank}.json"), "w") as f:
        json.dump(dict(out, rank=rank, pid=os.getpid(), done=True), f)


@contextlib.contextmanager
def freezeframe_warnings():
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield seen
    seen += [str(w.message) for w in caught if "freezeframe" in str(w.message)]


def facts(mode):
    with freezeframe_warnings() as seen:
        model, net, opt = build(mode)
        run = os.path.join(args.out, f"run-{mode}")
        with freezeframe.watch(net, opt, run, every=1) as rec:
            with rec.stage("head"):
                k = train(net, opt, STEPS[0], 0)
            for p in model.body.parameters():
                p.requires_grad_(True)
            with rec.stage("all"):
                k = train(net, opt, STEPS[1], k)
        with freezeframe.watch(net, opt, run, every=1) as rec, rec.stage("again"):  # appends a session
            train(net, opt, STEPS[2], k)
        final = state_hash(model)
    report(f"facts-{mode}", {"final": final, "warnings": seen})


# Where the recorder fails (every=None: the first 10 steps are recorded, then the ranks agree on
# `every`): (object, function, the call that raises). The net has 6 parameters and no buffer.
CASES = {
    "snapshot": (metrics, "snapshot", 1),            # W_before of the first recorded step (pre-step)
    "hash-init": (hashing, "_digest", 2),            # hashing the start state inside watch()
    "hash-stage": (hashing, "_digest", 8),           # between two gathers, hashing stage 0's start
    "norms": (metrics, "distances_into", 3),         # step 2's local norms, before the cross-rank sum
    "forward": (LayerOrder, "pass_begins", 4),      # the forward pre-hook: outside any collective
    # (the net has no buffer: its forward post-hook is gone after the first step, docs/recording.md)
    "late": (BoundaryTracker, "after_step", 12),     # step 11, after the agreement on `every`
}


def inject(case):
    """Make one freezeframe function raise on its k-th call; returns the undo."""
    owner, attr, k = CASES[case]
    original, calls = getattr(owner, attr), [0]

    def broken(*a, **kw):
        calls[0] += 1
        if calls[0] == k:
            raise RuntimeError(f"injected failure on rank {rank} ({case})")
        return original(*a, **kw)

    setattr(owner, attr, broken)
    return lambda: setattr(owner, attr, original)


def failure(mode, case):
    finals = []
    with freezeframe_warnings() as seen:
        for watched in (True, False):
            model, net, opt = build(mode)
            for p in model.body.parameters():
                p.requires_grad_(True)
            undo = inject(case) if watched and rank == args.fail_rank else (lambda: None)
            try:
                rec = freezeframe.watch(net, opt, os.path.join(args.out, f"failrun-{mode}-{case}")) if watched else None
                with rec if rec is not None else contextlib.nullcontext():
                    train(net, opt, FAIL_STEPS, 0)
            finally:
                undo()
            finals.append(state_hash(model))
    report(f"failure-{mode}-{case}", {"final_watched": finals[0], "final_unwatched": finals[1], "warnings": seen})


for mode in args.modes:
    facts(mode)
    for spec in args.fail_cases:
        if spec.split(":")[0] == mode:
            failure(mode, spec.split(":")[1])

if distributed:
    dist.barrier()  # without it a rank sometimes aborts while the other is still tearing down
    dist.destroy_process_group()
'''
SCRIPT = _SCRIPT.replace("# NET\n", inspect.getsource(Net))


# ====================================================================================== launching
def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def torchrun(out: Path, *args: str) -> dict:
    """Run SCRIPT on 2 ranks with torchrun in its own process group; a launch that outlives
    LAUNCH_TIMEOUT is killed (group and all) and the test fails: it hung."""
    script = out / "train.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "--out", str(out), *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=out, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung (killed after {LAUNCH_TIMEOUT} s):\n{output[-4000:]}")
    results = {}
    for f in sorted((out / "results").glob("*.json")) if (out / "results").exists() else []:
        results[f.stem] = json.loads(f.read_text())
    time.sleep(0.2)  # let the kernel finish reaping
    return {"rc": proc.returncode, "output": output, "results": results, "pgid": proc.pid,
            "left": _group_members(proc.pid), "seconds": time.monotonic() - t0, "out": out}


def one_process(out: Path) -> Path:
    """The same training in this process, on the 2 ranks' batches together."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "train.py"
    script.write_text(SCRIPT)
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [str(script), "--modes", "single", "--out", str(out)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return out / "run-single"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return one_process(tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> dict:
    """One torchrun launch (each costs ~10 s of imports on 2 busy cores): DDP's facts, DDP with
    rank 1's recorder failing at each of FAILURES' points, then the same under FSDP2."""
    return torchrun(tmp_path_factory.mktemp("torchrun"), "--modes", "ddp", "fsdp", "--fail-rank", "1",
                    "--fail-cases", *[f"{mode}:{case}" for mode, case in FAILURES])


def check_launch(launch: dict, *phases: str) -> None:
    """Both ranks finished these phases (a later phase failing is another test's failure)."""
    for phase in phases:
        for r in (0, 1):
            res = launch["results"].get(f"{phase}.rank{r}")
            assert res is not None and res["done"], f"{phase}: rank {r} did not finish\n{launch['output'][-4000:]}"


# ====================================================================================== comparing
def close(a, b, rel=1e-4, abs_=1e-6) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def summary(run_dir: Path) -> dict:
    doc = oracle.strict_json(json.dumps(freezeframe.load(run_dir).summary(), allow_nan=False))
    oracle.check_summary_schema(doc)
    return doc


EXACT_STAGE = ("index", "name", "kind", "complete", "first_step", "last_step", "steps", "forward_passes",
               "params_trainable", "tensors_trainable", "starts_from_previous_end", "continuity",
               "changed_since_previous_end")
EXACT_PARAM_STAGE = ("group", "trainable", "in_optimizer", "grad_steps", "changed")
CLOSE_PARAM_STAGE = ("drift_abs", "drift_rel", "update_ratio_median")


def same_facts(dist_run: Path, single_run: Path) -> list[str]:
    """Every difference between a distributed run and the one-process run that a tolerance
    does not excuse: bitwise facts, counts, names and hashes exactly; norms within 1e-4."""
    a, b = summary(dist_run), summary(single_run)
    bad = []
    if a["run"]["steps"] != b["run"]["steps"]:
        bad.append(f"steps {a['run']['steps']} != {b['run']['steps']}")
    for sa, sb in zip(a["stages"], b["stages"], strict=True):
        for key in EXACT_STAGE:
            if sa[key] != sb[key]:
                bad.append(f"stage {sa['index']} {key}: {sa[key]!r} != {sb[key]!r}")
        for ga, gb in zip(sa["groups"], sb["groups"], strict=True):
            if ga != gb:
                bad.append(f"stage {sa['index']} group {ga['name']}: {ga} != {gb}")
    if [p["name"] for p in a["params"]] != [p["name"] for p in b["params"]]:
        bad.append(f"names {[p['name'] for p in a['params']]} != {[p['name'] for p in b['params']]}")
    for pa, pb in zip(a["params"], b["params"]):
        for k, (ea, eb) in enumerate(zip(pa["stages"], pb["stages"])):
            for key in EXACT_PARAM_STAGE:
                if ea[key] != eb[key]:
                    bad.append(f"{pa['name']} stage {k} {key}: {ea[key]!r} != {eb[key]!r}")
            for key in CLOSE_PARAM_STAGE:
                if not close(ea[key], eb[key]):
                    bad.append(f"{pa['name']} stage {k} {key}: {ea[key]!r} vs {eb[key]!r}")
    # the per-step rows: the same steps recorded, lr and momentum exactly, every norm close
    ra, rb = freezeframe.load(dist_run), freezeframe.load(single_run)
    for col in ("step", "stage", "recorded", "lr", "momentum", "weight_decay", "grads"):
        if ra.steps().column(col).to_pylist() != rb.steps().column(col).to_pylist():
            bad.append(f"steps.{col} differ")
    ta, tb = oracle.stored_metrics(ra.tensors()), oracle.stored_metrics(rb.tensors())
    if sorted(ta) != sorted(tb):
        bad.append(f"recorded steps {sorted(ta)} != {sorted(tb)}")
    for step in sorted(set(ta) & set(tb)):
        if set(ta[step]) != set(tb[step]):
            bad.append(f"step {step}: rows for {sorted(ta[step])} != {sorted(tb[step])}")
        for name in sorted(set(ta[step]) & set(tb[step])):
            for label, x, y in zip(("grad_norm", "update_norm", "param_norm", "drift"), ta[step][name], tb[step][name]):
                if not close(x, y):
                    bad.append(f"step {step} {name}.{label}: {x!r} vs {y!r}")
    # content hashes: every stage's start is bitwise the one-process run's while nothing trained
    # differs (the same initial weights: stage 0 everything, the frozen body until stage 1)
    ma, mb = ra.manifest, rb.manifest
    if ma["stages"][0]["start_hashes"] != mb["stages"][0]["start_hashes"]:
        bad.append("stage 0 start hashes differ from the one-process run's")
    n_body = sum(p["name"].startswith("body.") for p in a["params"])
    if ma["stages"][0]["end_hashes"][:n_body] != mb["stages"][0]["end_hashes"][:n_body]:
        bad.append("the frozen body's hashes at stage 0's end differ from the one-process run's")
    return bad


def initial_hashes() -> list[str]:
    """Ground truth: the content hashes of the initial weights, the script's model built here."""
    torch.manual_seed(0)
    return [oracle.content_hash(p) for _, p in Net().named_parameters()]


# ====================================================================================== tests
def test_ddp_writes_one_run_from_rank_0_with_the_facts_of_one_process(launch, single):
    check_launch(launch, "facts-ddp")
    r0, r1 = launch["results"]["facts-ddp.rank0"], launch["results"]["facts-ddp.rank1"]
    assert r0["final"] == r1["final"] and not r0["warnings"] and not r1["warnings"]
    run_dir = launch["out"] / "run-ddp"
    run = freezeframe.load(run_dir)
    sessions = run.manifest["sessions"]
    assert [s["pid"] for s in sessions] == [r0["pid"], r0["pid"]]  # two watch() calls, both rank 0's
    assert f'"pid": {r1["pid"]}' not in json.dumps(run.manifest)
    assert not (run_dir / "writer.lock").exists()
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".")]  # no half-written file
    names = [p["name"] for p in run.summary()["params"]]
    assert names == [n for n, _ in Net().named_parameters()]  # DDP's "module." nowhere
    assert [s["name"] for s in run.summary()["stages"]] == ["head", "all", "again"]
    assert run.manifest["stages"][0]["start_hashes"][:len(names)] == initial_hashes()
    bad = same_facts(run_dir, single)
    assert not bad, "\n".join(bad[:30])


# Under DDP the recorder's only collective is the agreement on `every`; under FSDP2 every recorded
# step and stage boundary has collectives (cross-rank norms, gathers for the hashes): rank 1 fails
# before the first of them, between two gathers, between its local norms and their sum, in a
# forward hook, at watch start, and after the agreement on `every`.
FAILURES = [("ddp", "snapshot"), ("ddp", "hash-init"), ("ddp", "late"),
            ("fsdp", "snapshot"), ("fsdp", "hash-init"), ("fsdp", "hash-stage"), ("fsdp", "norms"),
            ("fsdp", "forward"), ("fsdp", "late")]


@pytest.mark.parametrize("mode,case", FAILURES, ids=[f"{m}-{c}" for m, c in FAILURES])
def test_a_recorder_failing_on_rank_1_neither_hangs_nor_changes_training(launch, mode, case):
    """Rank 1's recorder dies; it posts its failure flag, the other rank's next agreement (before
    its next collective, or at close) completes with it, and every rank stops recording there:
    the job finishes, training is bitwise the same as unwatched, one warning per rank."""
    phase = f"failure-{mode}-{case}"
    check_launch(launch, phase)
    r0, r1 = launch["results"][f"{phase}.rank0"], launch["results"][f"{phase}.rank1"]
    for r in (r0, r1):
        assert r["final_watched"] == r["final_unwatched"]  # bitwise the training without freezeframe
    assert r0["final_watched"] == r1["final_watched"]
    assert len(r1["warnings"]) == 1 and f"injected failure on rank 1 ({case})" in r1["warnings"][0], r1["warnings"]
    assert len(r0["warnings"]) == 1 and "another rank's recorder failed" in r0["warnings"][0], r0["warnings"]
    run_dir = launch["out"] / f"failrun-{mode}-{case}"
    run = freezeframe.load(run_dir)  # rank 0's run is readable, what it recorded kept
    s = run.summary()
    assert s["run"]["complete"] is False and s["run"]["steps"] <= 14  # fsdp: may stop in step 0
    assert "another rank's recorder failed" in run.manifest["error"]
    if case == "late":  # learnt at close (DDP) or at the next recorded step: step 11 was recorded
        assert s["run"]["steps"] >= 11


def test_no_process_outlives_torchrun(launch):
    assert launch["rc"] == 0, launch["output"][-4000:]
    assert launch["left"] == [], f"processes left in torchrun's process group: {launch['left']}"
    pids = {r["pid"] for r in launch["results"].values()}
    assert len(pids) == 2 and not [pid for pid in pids if _alive(pid)]


def test_fsdp2_fully_shard_writes_one_run_with_the_facts_of_one_process(launch, single):
    """FSDP2 shards every parameter (DTensor): norms are combined across ranks and hashes are of
    the gathered tensors, so the record equals the one-process run's; the appended session
    scatters the stored reference to the ranks for drift."""
    check_launch(launch, "facts-fsdp")
    r0, r1 = launch["results"]["facts-fsdp.rank0"], launch["results"]["facts-fsdp.rank1"]
    assert r0["final"] == r1["final"] and not r0["warnings"] and not r1["warnings"]
    run_dir = launch["out"] / "run-fsdp"
    run = freezeframe.load(run_dir)
    assert [s["pid"] for s in run.manifest["sessions"]] == [r0["pid"], r0["pid"]]
    names = [p["name"] for p in run.summary()["params"]]
    assert names == [n for n, _ in Net().named_parameters()]
    assert run.manifest["stages"][0]["start_hashes"][:len(names)] == initial_hashes()
    bad = same_facts(run_dir, single)
    assert not bad, "\n".join(bad[:30])
