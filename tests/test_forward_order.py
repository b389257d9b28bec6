"""`manifest["model"]["forward_order"]`: the modules owning parameters, in the order they first ran
in the first training forward before the first applied step, against the test's own forward
pre-hooks (docs/run-format.md, "The model's forward order")."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import freezeframe


class FirstCalls:
    """The oracle: forward pre-hooks on every module of `model` that owns parameters directly,
    noting each one's first call with autograd on, until `stop()`."""

    def __init__(self, model: nn.Module):
        self.order: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            if list(module.parameters(recurse=False)):
                self.handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def pre(module, args):
            if torch.is_grad_enabled() and name not in self.order:
                self.order.append(name)
        return pre

    def stop(self) -> list[str]:
        for h in self.handles:
            h.remove()
        self.handles = []
        return self.order


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        # the shortcut runs first here: forward order is not the order of definition
        identity = self.downsample(x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + identity)


class Net(nn.Module):
    """A stem, a residual block, a shared block called twice, a module defined but never run, a
    validation-only probe, a head, and a parameter owned by the root. Input (N, 1, 6, 6)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1 = Residual(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.unused = nn.Linear(4, 4)
        self.probe = nn.Linear(4, 1)
        self.head = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(()))
        self.swap = False

    def forward(self, x):
        if self.swap:  # a later session of the run calls the blocks in another order
            x = self.layer1(self.shared(self.stem(x)))
        else:
            x = self.shared(self.layer1(self.stem(x)))
        x = self.shared(x)
        return self.head(x.mean((2, 3))) * self.scale

    def validate(self, x):
        return self.probe(self.stem(x).mean((2, 3))), self(x)  # the probe runs first


def data(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def pre_hook_counts(model: nn.Module) -> dict[str, int]:
    return {name: len(m._forward_pre_hooks) for name, m in model.named_modules()}


def train(model, opt, batches, rec=None, *, validate_first: bool = True, after_first=None):
    """A plain loop: a no_grad validation pass before training, then one step per batch."""
    if validate_first:
        model.eval()
        with torch.no_grad():
            model.validate(batches[0][0])
        model.train()
    for k, (x, y) in enumerate(batches):
        if rec is not None:
            rec.epoch()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if k == 0 and after_first is not None:
            after_first()


def test_forward_order_is_the_first_training_forward_of_the_run(run_dir):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = pre_hook_counts(model)
    seen = {}
    with freezeframe.watch(model, opt, run_dir) as rec:
        oracle = FirstCalls(model)
        watched = pre_hook_counts(model)

        def after_first():
            seen["oracle"] = oracle.stop()
            seen["after_step"] = pre_hook_counts(model)
        train(model, opt, data(), rec, after_first=after_first)
    order = freezeframe.load(run_dir).manifest["model"]["forward_order"]
    assert order == seen["oracle"]
    # the oracle itself: the shortcut before the main path, `shared` once, `unused` and the
    # validation-only `probe` absent, the root first (its pre-hook runs before its children's)
    assert order == ["", "stem.0", "stem.1", "layer1.downsample.0", "layer1.downsample.1", "layer1.conv1",
                     "layer1.bn1", "layer1.conv2", "layer1.bn2", "shared", "head"]
    owners = [n for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    assert all(watched[n] > before[n] for n in owners)  # hooked while watching began
    # gone right after the first step: only the root's pass counter is left (capture/passes.py)
    assert {n: c - before[n] for n, c in seen["after_step"].items()} == {n: int(n == "") for n in before}
    assert pre_hook_counts(model) == before  # and that one at close


def test_an_appended_session_keeps_the_first_order_and_a_run_without_a_step_has_none(run_dir, tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir):
        oracle = FirstCalls(model)
        train(model, opt, data(2), after_first=oracle.stop)
    first = freezeframe.load(run_dir).manifest["model"]["forward_order"]
    assert first == oracle.order and first.index("shared") > first.index("layer1.bn2")
    model.swap = True  # this session's first forward runs `shared` before layer1
    swapped = FirstCalls(model)
    with freezeframe.watch(model, opt, run_dir, mode="append"):
        train(model, opt, data(2), after_first=swapped.stop)
    assert swapped.order.index("shared") < swapped.order.index("layer1.conv1")  # the test sees the new order
    m = freezeframe.load(run_dir).manifest
    assert m["model"]["forward_order"] == first and len(m["sessions"]) == 2

    # no applied step: the order was not observed (null), whatever the forwards
    other = tmp_path / "no-step"
    fresh = Net()
    with freezeframe.watch(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05), other):
        fresh(torch.randn(2, 1, 6, 6)).sum().backward()
    assert freezeframe.load(other).manifest["model"]["forward_order"] is None


def test_gradient_accumulation_counts_every_forward_before_the_first_applied_step(run_dir):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = data(3)
    with freezeframe.watch(model, opt, run_dir):
        oracle = FirstCalls(model)
        nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
        model.probe(torch.randn(2, 4)).sum().backward()  # the second micro-batch runs the probe too
        opt.step()
        oracle.stop()
        model.unused(torch.randn(2, 4)).sum().backward()  # after the first step: not counted
        opt.step()
    order = freezeframe.load(run_dir).manifest["model"]["forward_order"]
    assert order == oracle.order and order[-1] == "probe" and "unused" not in order


def test_a_failing_order_hook_is_one_warning_and_training_is_unchanged(run_dir, monkeypatch):
    torch.manual_seed(0)
    plain = Net()
    watched = Net()
    watched.load_state_dict(plain.state_dict())
    batches = data()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    train(plain, opt_plain, batches)
    rng_plain = torch.get_rng_state()

    from freezeframe.capture import layerorder

    def failing(self, name):
        raise RuntimeError("injected")
    monkeypatch.setattr(layerorder.LayerOrder, "_note", failing)
    before = pre_hook_counts(watched)
    opt = torch.optim.SGD(watched.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with freezeframe.watch(watched, opt, run_dir) as rec:
            train(watched, opt, batches, rec)
        rng_watched = torch.get_rng_state()
    ours = [w for w in caught if "freezeframe" in str(w.message)]
    assert len(ours) == 1 and "forward-order hook" in str(ours[0].message), [str(w.message) for w in ours]
    assert pre_hook_counts(watched) == before
    for (n, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b) and a.dtype == b.dtype, n
    assert torch.equal(rng_plain, rng_watched)
    m = freezeframe.load(run_dir).manifest
    assert m["model"]["forward_order"] is None and "forward-order hook" in m["error"]


def test_torchscript_module_gives_no_order(run_dir):
    """A module that takes no hooks: the order would miss it, so none is stated."""
    model = nn.Sequential(nn.Linear(3, 4), torch.jit.script(nn.Linear(4, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir):
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
    assert freezeframe.load(run_dir).manifest["model"]["forward_order"] is None


class TrainingPassCalls:
    """The oracle for a model that runs part of its training forward under no_grad: each
    module's first call inside a call of the root that began with autograd on."""

    def __init__(self, model: nn.Module):
        self.order: list[str] = []
        self.training = False

        def root(module, args):
            self.training = torch.is_grad_enabled()
        self.handles = [model.register_forward_pre_hook(root)]
        for name, module in model.named_modules():
            if list(module.parameters(recurse=False)):
                self.handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def pre(module, args):
            if self.training and name not in self.order:
                self.order.append(name)
        return pre

    def stop(self) -> list[str]:
        for h in self.handles:
            h.remove()
        return self.order


class FrozenBackbone(nn.Module):
    """A feature extractor run under no_grad inside the training forward, a trained head, and a
    probe that only a no_grad validation pass runs."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 3)
        self.probe = nn.Linear(4, 1)

    def forward(self, x):
        with torch.no_grad():
            f = self.backbone(x).mean((2, 3))
        return self.head(f)

    def validate(self, x):
        return self.probe(self.backbone(x).mean((2, 3))), self(x)


def test_modules_run_under_no_grad_inside_the_training_forward_are_in_the_order(run_dir):
    torch.manual_seed(0)
    model = FrozenBackbone()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.05)
    with freezeframe.watch(model, opt, run_dir) as rec:
        oracle = TrainingPassCalls(model)
        train(model, opt, data(2), rec, after_first=oracle.stop)  # a no_grad validation pass first
    order = freezeframe.load(run_dir).manifest["model"]["forward_order"]
    assert order == oracle.order == ["backbone.0", "backbone.1", "head"]  # the probe ran only in validation
    layers = freezeframe.load(run_dir).summary()["layers"]
    assert [(x["module"], x["ran"]) for x in layers] == [("backbone.0", True), ("backbone.1", True),
                                                         ("head", True), ("probe", False)]


def test_a_reentrant_checkpoint_is_in_the_order_where_its_forward_ran_it(run_dir):
    """A reentrant activation checkpoint runs its segment under no_grad inside the training
    forward, then again inside the backward: the forward's call places it."""
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.c(checkpoint(self.b, self.a(x), use_reentrant=True))

    model = Ckpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with freezeframe.watch(model, opt, run_dir):
        oracle = TrainingPassCalls(model)
        model(torch.randn(2, 3)).sum().backward()
        oracle.stop()
        opt.step()
    assert freezeframe.load(run_dir).manifest["model"]["forward_order"] == oracle.order == ["a", "b", "c"]


def test_a_module_first_run_inside_a_backward_gives_no_order(run_dir):
    """The whole forward is a reentrant checkpoint called without the model: each of its two runs
    (no_grad, then inside the backward) is a pass of its own, so the recomputation's place in the
    forward is unknown and no order is stated."""
    from torch.utils.checkpoint import checkpoint

    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, requires_grad=True)
    with freezeframe.watch(model, opt, run_dir):
        checkpoint(model[0], x, use_reentrant=True).sum().backward()
        opt.step()
    assert freezeframe.load(run_dir).manifest["model"]["forward_order"] is None


def test_ddp_names_are_the_unwrapped_models(run_dir, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = Net()
        ddp = DistributedDataParallel(net, find_unused_parameters=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        with freezeframe.watch(ddp, opt, run_dir):
            oracle = FirstCalls(net)
            for x, y in data(2):
                nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
                opt.zero_grad()
                oracle.stop()
        order = freezeframe.load(run_dir).manifest["model"]["forward_order"]
        assert order == oracle.order and order[1] == "stem.0"
    finally:
        dist.destroy_process_group()


def test_compiled_model_order_is_right_or_null(run_dir):
    """torch.compile: the hooks may not run inside the compiled graph; the order is then null,
    never wrong."""
    torch.manual_seed(0)
    net = Net()
    compiled = torch.compile(net, backend="eager")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    ref = Net()  # the same model, run eagerly under the oracle
    ref.load_state_dict(net.state_dict())
    calls = FirstCalls(ref)
    x, y = data(1)[0]
    nn.functional.cross_entropy(ref(x), y).backward()
    calls.stop()
    with freezeframe.watch(compiled, opt, run_dir):
        for x, y in data(2):
            nn.functional.cross_entropy(compiled(x), y).backward()
            opt.step()
            opt.zero_grad()
    order = freezeframe.load(run_dir).manifest["model"]["forward_order"]
    print("compiled:", order)
    assert order is None or order == calls.order
