"""The `freezeframe` command line: argument parsing and calls into the library (the only place that prints)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import FreezeFrameError


def _console():
    from rich.console import Console

    return Console()


def _load(path):
    from .run import Run

    return Run.load(path)


def cmd_summary(args) -> int:
    run = _load(args.run)
    if args.json:
        print(json.dumps(run.summary(), indent=2, allow_nan=False))
        return 0
    from .render.terminal import run_renderable

    _console().print(run_renderable(run.summary(), depth=args.depth))
    return 0


def cmd_check(args) -> int:
    run = _load(args.run)
    findings = run.findings()
    if args.json:
        print(json.dumps({"schema": "freezeframe.check/1", "findings": findings}, indent=2, allow_nan=False))
    else:
        from .render.terminal import findings_renderable

        _console().print(findings_renderable(findings))
    return 1 if any(f["severity"] == "error" for f in findings) else 0


def cmd_diff(args) -> int:
    from .analyse.diff import diff_state_dicts
    from .store.checkpoint import load_checkpoint

    result = diff_state_dicts(load_checkpoint(args.a), load_checkpoint(args.b))
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        from .render.terminal import diff_renderable

        _console().print(diff_renderable(result, args.a, args.b))
    return 0


def cmd_report(args) -> int:
    import time
    from pathlib import Path

    from .analyse.figures import from_run
    from .render.html import write_html

    t0 = time.perf_counter()
    run = _load(args.run)
    data = from_run(run, depth=args.depth)
    written = [write_html(run, args.output or Path(args.run) / "report.html", data=data)]
    if args.png:
        from .render.images import write_pngs

        written += write_pngs(run, args.png, data=data)
    for path in written:
        print(path)
    print(f"report built in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    try:
        epochs = tuple(int(x) for x in args.epochs.split(","))
        assert len(epochs) == 2 and min(epochs) > 0
    except (ValueError, AssertionError):
        raise FreezeFrameError(f"--epochs takes two positive counts like 3,5 (head only, unfrozen), got {args.epochs!r}") from None
    return run_demo(out=args.out, seed=args.seed, console=_console(), epochs=epochs,
                    pretrain_epochs=args.pretrain_epochs, report=not args.no_report, fastai=args.fastai)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freezeframe",
                                description="See and verify what each stage of fine-tuning did to every layer.")
    p.add_argument("--version", action="version", version=f"freezeframe {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what freezeframe does")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("summary", help="the freeze map, the stages with their learning rates, the answers, the findings")
    s.add_argument("run", help="a run directory")
    s.add_argument("--json", action="store_true", help="print the summary as JSON (schema freezeframe.summary/1)")
    s.add_argument("--depth", type=int, default=None, help="module-tree depth of the freeze map (default: fits ~40 rows)")
    s.set_defaults(func=cmd_summary)

    c = sub.add_parser("check", help="list the findings; exit 1 if any is an error, 2 if the run cannot be read")
    c.add_argument("run", help="a run directory")
    c.add_argument("--json", action="store_true", help="print {schema: freezeframe.check/1, findings: [...]}")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("diff", help="compare two checkpoints tensor by tensor (state_dict, fastai, Lightning, safetensors)")
    f.add_argument("a", help="the earlier checkpoint")
    f.add_argument("b", help="the later checkpoint")
    f.add_argument("--json", action="store_true", help="print {schema: freezeframe.diff/1, params, only_in_a, only_in_b}")
    f.set_defaults(func=cmd_diff)

    r = sub.add_parser("report", help="one self-contained interactive HTML report (and PNGs with --png)")
    r.add_argument("run", help="a run directory")
    r.add_argument("-o", "--output", default=None, help="the HTML file to write (default: RUN/report.html)")
    r.add_argument("--png", metavar="DIR", default=None, help="also write every figure as a PNG into DIR")
    r.add_argument("--depth", type=int, default=None, help="module-tree depth of the freeze map (default: fits ~40 rows)")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="fine-tune a small pretrained CNN on scikit-learn's digits and show what happened")
    d.add_argument("--out", default="runs/demo", help="where to write the run (default: runs/demo)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.add_argument("--epochs", default="3,5", help="epochs of the two fine-tuning stages (default: 3,5)")
    d.add_argument("--pretrain-epochs", type=int, default=6, help="epochs of pretraining on digits 0-4 (default: 6)")
    d.add_argument("--no-report", action="store_true", help="skip report.html and the PNGs")
    d.add_argument("--fastai", action="store_true",
                   help="the same story with a real fastai Learner (freeze, fit_one_cycle, unfreeze, slice)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except FreezeFrameError as e:
        print(f"freezeframe: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
