"""A model and optimizer prepared by `accelerate.Accelerator(cpu=True)` are watched like plain
PyTorch ones: the user's names, the steps Accelerate applied (with gradient accumulation, one
per `gradient_accumulation_steps` batches), and every metric against ground truth taken by the
test around each step of the torch optimizer inside Accelerate's wrapper."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("accelerate")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402

import freezeframe  # noqa: E402
import oracle  # noqa: E402
from models import BodyHead  # noqa: E402

BATCHES, ACCUMULATE, BS = 6, 2, 4


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # other test processes share the 2 cores
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_a_model_and_optimizer_prepared_by_accelerate_are_watched_like_plain_ones(run_dir):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = BodyHead()
    model.freeze_body(keep_bn=True)  # the convolutions frozen, the BatchNorm layers and the head train
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(BATCHES * BS, 3, 6, 6, generator=g),
                                          torch.randint(0, 3, (BATCHES * BS,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=BS)
    names = [n for n, _ in model.named_parameters()]
    p_model, p_opt, p_loader, p_sched = accelerator.prepare(model, opt, loader, sched)
    assert type(p_opt).__name__ == "AcceleratedOptimizer" and type(p_sched).__name__ == "AcceleratedScheduler"

    # ground truth around every step of the torch optimizer inside Accelerate's wrapper
    inner = p_opt.optimizer
    tape = oracle.Tape(model)
    pending = {}

    def before(optimizer, args, kwargs):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        pending.update({"lr": [float(g["lr"]) for g in optimizer.param_groups],
                        "rows": [n for n, p in model.named_parameters()
                                 if id(p) in held and (p.requires_grad or p.grad is not None)],
                        "before": oracle.state(model)})

    def after(optimizer, args, kwargs):
        tape.steps.append(dict(
            pending, step=len(tape.steps), after={n: p.detach().clone() for n, p in model.named_parameters()},
            grad={n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()},
            buffers={n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}))

    start = oracle.state(model)
    with freezeframe.watch(p_model, p_opt, run_dir, every=1) as rec:
        handles = [inner.register_step_pre_hook(before), inner.register_step_post_hook(after)]
        try:
            with rec.stage("accelerate"):
                for x, y in p_loader:
                    with accelerator.accumulate(p_model):
                        loss = F.cross_entropy(p_model(x), y)
                        accelerator.backward(loss)
                        p_opt.step()      # applied every ACCUMULATE batches only
                        p_sched.step()
                        p_opt.zero_grad()
        finally:
            for h in handles:
                h.remove()
    end = oracle.state(model)

    doc = oracle.strict_json(json.dumps(freezeframe.load(run_dir).summary(), allow_nan=False))
    oracle.check_summary_schema(doc)
    steps = BATCHES // ACCUMULATE
    assert len(tape.steps) == steps
    assert [p["name"] for p in doc["params"]] == names
    (st,) = doc["stages"]
    assert (st["name"], st["steps"], st["complete"]) == ("accelerate", steps, True)
    assert st["forward_passes"]["train"] == BATCHES
    changed = oracle.differing(start, end)
    for p in doc["params"]:
        e, trainable = p["stages"][0], model.get_parameter(p["name"]).requires_grad
        assert (e["trainable"], e["in_optimizer"], e["changed"], e["grad_steps"]) == \
            (trainable, True, p["name"] in changed, steps if trainable else 0), p["name"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & changed  # the truth: the frozen convolutions kept their bytes
    assert [b["stages"][0]["changed"] for b in doc["buffers"]] == [b["name"] in changed for b in doc["buffers"]]
    # the lr Accelerate's scheduler gave each applied step, and every metric, step by step
    stored = pq.read_table(run_dir / "steps").sort_by("step").to_pydict()
    assert stored["lr"] == [rec["lr"] for rec in tape.steps]
    assert stored["lr"] == [[0.05 * 0.5 ** k] for k in range(steps)]
    bad = oracle.compare_with_tape(freezeframe.load(run_dir).tensors(), tape)
    assert not bad, "\n".join(bad[:20])
