"""`freezeframe demo`: a real transfer-learning story on scikit-learn's digits, recorded and shown.

A network with resnet34's shape (demo_model.py: BasicBlock stages [3, 4, 6, 3], 1/8 the widths) is
pretrained on digits 0-4 (cached), then fine-tuned on digits 5-9 the way the course does it: body
frozen, head trained with a one-cycle schedule; unfreeze; train again with discriminative learning
rates over 3 layer groups."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .demo_model import DigitResNet34
from .errors import FreezeFrameError
from .store import layout
from .store.layout import DEMO_MARKER
from .store.outputs import is_run_dir, replacing

CACHE_VERSION = 2  # 2: the resnet34-shaped network (1: a 2-block CNN)


# ----------------------------------------------------------------------------- the data
@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def digits(seed: int) -> dict[str, Split]:
    """scikit-learn's 8x8 digits (ships with the package): source = 0-4, target = 5-9, the
    target split into a small training set and held-out data."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    src = (y < 5).nonzero().squeeze(1)
    tgt = (y >= 5).nonzero().squeeze(1)
    tgt = tgt[torch.randperm(len(tgt), generator=g)]
    n_train = 250
    return {"source": Split(x[src], y[src]),
            "target_train": Split(x[tgt[:n_train]], y[tgt[:n_train]] - 5),
            "target_test": Split(x[tgt[n_train:]], y[tgt[n_train:]] - 5)}


def n_batches(n: int, batch_size: int) -> int:
    """Batches per epoch; a last batch of one image joins the one before (BatchNorm in train mode
    needs two values per channel, and layer4 works at 1x1 pixels)."""
    return max(1, n // batch_size + (n % batch_size > 1))


def batches(split: Split, batch_size: int, gen: torch.Generator):
    order = torch.randperm(len(split.y), generator=gen)
    k = n_batches(len(order), batch_size)
    for i in range(k):
        idx = order[i * batch_size:(i + 1) * batch_size if i < k - 1 else len(order)]
        yield split.x[idx], split.y[idx]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """(loss, accuracy) in eval mode."""
    was = model.training
    model.eval()
    out = model(split.x)
    model.train(was)
    return F.cross_entropy(out, split.y).item(), (out.argmax(1) == split.y).float().mean().item()


def accuracy(model: nn.Module, split: Split) -> float:
    return evaluate(model, split)[1]


# ----------------------------------------------------------------------------- the story
def cache_dir() -> Path:
    root = os.environ.get("FREEZEFRAME_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "freezeframe")
    return Path(root)


def pretrained(seed: int, data: dict[str, Split], progress=None, epochs: int = 8) -> tuple[DigitResNet34, bool]:
    """The source-task model, from the cache when there (returns (model, from_cache))."""
    path = cache_dir() / f"demo-resnet34-narrow-v{CACHE_VERSION}-seed{seed}-e{epochs}.pt"
    torch.manual_seed(seed)
    model = DigitResNet34()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, True
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * n_batches(len(data["source"].y), 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    task = progress.add_task("pretraining on digits 0-4", total=steps) if progress else None
    for _ in range(epochs):
        for xb, yb in batches(data["source"], 32, gen):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
            if progress:
                progress.advance(task)
    # Drop the last batch's gradients, as a model loaded from disk has none: fastai's optimizer
    # steps every tensor holding a gradient, frozen or not (freezeframe reports that as
    # frozen-param-changed).
    model.zero_grad(set_to_none=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, False


def fine_tune(model: DigitResNet34, data: dict[str, Split], out: str, seed: int, *, epochs=(3, 5), progress=None,
              every: int = 1) -> dict:
    """Stage 1: body frozen (BatchNorm still trains, as fastai does), new head (fc), one-cycle.
    Stage 2: everything unfrozen, one lr per layer group (1e-4 / 1e-3 / 1e-2)."""
    import freezeframe

    torch.manual_seed(seed)
    model.fc = nn.Linear(model.fc.in_features, 5)  # a new head for the new task
    gen = torch.Generator().manual_seed(seed)
    groups = model.layer_groups()
    accs = {"before fine-tuning": accuracy(model, data["target_test"])}
    per_epoch = n_batches(len(data["target_train"].y), 16)

    def run_stage(name, opt, sched, n_epochs):
        task = progress.add_task(name, total=n_epochs * per_epoch) if progress else None
        with rec.stage(name):
            for _ in range(n_epochs):
                rec.epoch()  # each stage then states its epochs and where each began (docs/recording.md)
                losses = []
                for xb, yb in batches(data["target_train"], 16, gen):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                    rec.log(loss=losses[-1])
                    if progress:
                        progress.update(task, advance=1, description=f"{name}  loss {losses[-1]:.3f}")
                valid_loss, acc = evaluate(model, data["target_test"])  # a validation pass each epoch (eval mode)
                rec.log_epoch(train_loss=sum(losses) / len(losses), valid_loss=valid_loss, accuracy=acc)
        accs[f"after {name}"] = accuracy(model, data["target_test"])

    # Stage 1: freeze the body, keep its BatchNorm layers trainable, train the head.
    for p in groups[0] + groups[1]:
        p.requires_grad_(False)
    for m in model.body_modules():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": g} for g in groups], lr=1e-2, weight_decay=0.01)
    with freezeframe.watch(model, opt, out, every=every, mode="overwrite") as rec:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs[0] * per_epoch)
        run_stage(f"head only, {epochs[0]} epochs", opt, sched, epochs[0])
        # Stage 2: unfreeze everything; discriminative learning rates across the 3 groups.
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW([{"params": g} for g in groups], lr=1e-3, weight_decay=0.01)
        rec.track(opt)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-4, 1e-3, 1e-2],
                                                    total_steps=epochs[1] * per_epoch)
        run_stage(f"unfrozen, {epochs[1]} epochs", opt, sched, epochs[1])
    return accs


def fine_tune_fastai(model: DigitResNet34, data: dict[str, Split], out: str, seed: int, *, epochs=(3, 5),
                     progress=None, every: int = 1) -> dict:
    """The same story with a real fastai Learner: freeze(), fit_one_cycle, unfreeze(),
    fit_one_cycle with lr_max=slice(...) over the 3 layer groups."""
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.torch_core import set_seed
    import fastai.callback.schedule  # noqa: F401 - Learner.fit_one_cycle

    from freezeframe.fastai import FreezeFrame

    set_seed(seed)
    model.fc = nn.Linear(model.fc.in_features, 5)
    accs = {"before fine-tuning": accuracy(model, data["target_test"])}
    train = list(zip(data["target_train"].x, data["target_train"].y))
    valid = list(zip(data["target_test"].x, data["target_test"].y))
    dls = DataLoaders.from_dsets(train, valid, bs=16, device="cpu", num_workers=0)

    class Progress(Callback):
        order = 90

        def before_fit(self):
            self.task = (progress.add_task(self.learn.ff_stage, total=self.n_epoch * len(self.dls.train))
                         if progress is not None and self.learn.training and self.n_epoch else None)

        def after_batch(self):
            if self.task is not None and self.training:
                progress.update(self.task, advance=1, description=f"{self.learn.ff_stage}  loss {float(self.loss):.3f}")

    ff = FreezeFrame(out, every=every, mode="overwrite")
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=[ff, Progress()],
                    splitter=lambda m: m.layer_groups(), wd=0.01)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
    learn.logger = lambda *a, **k: None
    try:
        learn.freeze()
        learn.ff_stage = f"fit_one_cycle({epochs[0]})"
        learn.fit_one_cycle(epochs[0], 1e-2)
        accs[f"after {learn.ff_stage}"] = accuracy(model, data["target_test"])
        learn.unfreeze()
        learn.ff_stage = f"fit_one_cycle({epochs[1]}, lr_max=slice(1e-4, 1e-2))"
        learn.fit_one_cycle(epochs[1], lr_max=slice(1e-4, 1e-2))
        accs[f"after {learn.ff_stage}"] = accuracy(model, data["target_test"])
    finally:
        ff.close()
    return accs


def check_out(out) -> None:
    """The demo replaces only what it wrote: `out` must be new, empty, or an earlier demo run (its
    run plus the demo's own files). Anything else is refused before any work, naming the reason."""
    path = Path(out)
    if not path.exists():
        return
    if not path.is_dir():
        raise FreezeFrameError(f"--out {str(path)!r} is a file, not a folder: choose a new or empty folder")
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if not names:
        return
    if not is_run_dir(path):
        raise FreezeFrameError(f"--out {str(path)!r} is not empty and holds no freezeframe run: "
                               "choose a new or empty folder")
    if not _written_by_demo(path):
        raise FreezeFrameError(f"--out {str(path)!r} holds a freezeframe run the demo did not write: the demo never "
                               "replaces another run; choose a new or empty folder")
    foreign = [n for n in names if n not in layout.RUN_FILES and n not in layout.OWN_OUTPUTS]
    if foreign:
        raise FreezeFrameError(f"--out {str(path)!r} holds an earlier demo run and files the demo did not write "
                               f"({', '.join(foreign[:5])}): move them or choose another folder")


def _written_by_demo(path: Path) -> bool:
    """The demo's marker is there and names this run (its `created` time; a marker of an older
    freezeframe names none)."""
    try:
        marker = json.loads((path / DEMO_MARKER).read_text())
        created = json.loads((path / layout.MANIFEST).read_text()).get("created")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(marker, dict) or "accuracy" not in marker:
        return False
    return marker.get("run_created", created) == created


def run_demo(*, out: str = "runs/demo", seed: int = 0, console=None, epochs=(3, 5), pretrain_epochs: int = 8,
             report: bool = True, fastai: bool = False) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    import freezeframe
    from freezeframe.render.terminal import run_renderable

    t0 = time.perf_counter()
    check_out(out)
    data = digits(seed)
    columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    threads = torch.get_num_threads()
    # One thread: an 8x8 image's convolutions are too small to share, and several threads waiting on
    # each other on a busy machine run many times slower (and the numbers then depend on no setting).
    torch.set_num_threads(1)
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            model, cached = pretrained(seed, data, progress, epochs=pretrain_epochs)
            tune = fine_tune_fastai if fastai else fine_tune
            accs = tune(model, data, out, seed, epochs=epochs, progress=progress)
    finally:
        torch.set_num_threads(threads)
    run = freezeframe.load(out)
    with replacing(Path(out) / DEMO_MARKER) as f:
        f.write(json.dumps(
            {"seed": seed, "fastai": fastai, "epochs": list(epochs), "pretrain_epochs": pretrain_epochs,
             "accuracy": accs, "pretrained_from_cache": cached, "run_created": run.manifest.get("created")},
            indent=2).encode())
    written = []
    if report:
        from freezeframe.analyse.figures import from_run
        from freezeframe.render.html import write_html
        from freezeframe.render.images import write_pngs

        data = from_run(run)
        written = [write_html(run, Path(out) / "report.html", data=data)]
        written += write_pngs(run, Path(out) / "png", data=data)
    if console is not None:
        console.print(run_renderable(run.summary()))
        table = Table(title="Accuracy on held-out digits 5-9", title_justify="left")
        table.add_column("when")
        table.add_column("accuracy", justify="right")
        for k, v in accs.items():
            table.add_row(k, f"{100 * v:.1f} %")
        console.print(table)
        console.print(f"pretrained model: {'from the cache' if cached else 'trained now and cached'} in {cache_dir()}")
        console.print(f"run: {out}    (freezeframe summary {out})")
        for path in written:
            console.print(f"wrote {path}")
        console.print(f"demo took {time.perf_counter() - t0:.1f} s")
    return 0
