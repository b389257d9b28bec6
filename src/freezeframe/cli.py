"""The `freezeframe` command line: argument parsing and calls into the library (the only place that prints)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ._version import __version__
from .errors import FreezeFrameError


def _console():
    from rich.console import Console

    return Console()


def _load(path):
    from .run import Run

    return Run.load(path)


def cmd_summary(args) -> int:
    run = _load(args.run)
    if args.json:  # json.dumps escapes every control character (ensure_ascii)
        print(json.dumps(run.summary(), indent=2, allow_nan=False))
        return 0
    from .render.terminal import run_renderable

    _console().print(run_renderable(run.summary(), depth=args.depth))
    return 0


def _refuse_partial(run) -> None:
    """A check is about the whole run: one that cannot be fully read is refused (exit 2), never
    answered from what was left (docs/run-format.md, "Reading a run")."""
    if run.fully_read():
        return
    lost = run.unreadable
    got = run.steps_read
    why = []
    if lost:
        why.append(lost[0] + (f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""))
    if run.steps_expected is not None and got < run.steps_expected:
        why.append(f"the manifest expects {run.steps_expected} steps, {got} could be read")
    raise FreezeFrameError(f"{str(run.path)!r} cannot be fully read, so it cannot be checked: {'; '.join(why)}")


def cmd_check(args) -> int:
    run = _load(args.run)
    _refuse_partial(run)
    findings = run.findings()
    if args.json:
        print(json.dumps({"schema": "freezeframe.check/1", "findings": findings}, indent=2, allow_nan=False))
    else:
        from .render.terminal import findings_renderable, run_status

        status = run_status(run.summary())
        if status is not None:  # a live or interrupted run: the findings are of what was recorded so far
            _console().print(status)
        _console().print(findings_renderable(findings))
    return 1 if any(f["severity"] == "error" for f in findings) else 0


def cmd_diff(args) -> int:
    from .analyse.diff import diff_files

    result = diff_files(args.a, args.b)
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

    from .store.outputs import check_png_dir, check_report_file

    t0 = time.perf_counter()
    run = _load(args.run)
    # every place refused before any work: never over a file of a run, never over a non-HTML file
    html = check_report_file(args.output or Path(args.run) / "report.html", runs=(run.path,))
    png = check_png_dir(args.png, runs=(run.path,)) if args.png else None
    data = from_run(run, depth=args.depth)
    written = [write_html(run, html, data=data)]
    if png is not None:
        from .render.images import write_pngs

        written += write_pngs(run, png, data=data)
    for path in written:
        print(path)
    print(f"report built in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, seed=args.seed, console=_console(), epochs=args.epochs,
                    pretrain_epochs=args.pretrain_epochs, report=not args.no_report, fastai=args.fastai)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `freezeframe demo: error: ... (see freezeframe demo --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(least: int, what: str):
    """An argparse type: an integer >= `least`, else one line saying what is wanted."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 4294967295, got {text!r}")
    return value


def _epoch_pair(text: str) -> tuple[int, int]:
    try:
        epochs = tuple(int(x) for x in text.split(","))
        assert len(epochs) == 2 and min(epochs) > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(
            f"expected two positive counts like 3,5 (head only, unfrozen), got {text!r}") from None
    return epochs


def build_parser() -> argparse.ArgumentParser:
    depth = _count(1, "depth")
    p = _Parser(prog="freezeframe",
                                description="See and verify what each stage of fine-tuning did to every layer.")
    p.add_argument("--version", action="version", version=f"freezeframe {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what freezeframe does")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("summary", help="the freeze map, the stages with their learning rates, the answers, the findings")
    s.add_argument("run", help="a run directory")
    s.add_argument("--json", action="store_true", help="print the summary as JSON (schema freezeframe.summary/1)")
    s.add_argument("--depth", type=depth, default=None,
                   help="module-tree depth of the freeze map, 1 or more (default: fits ~40 rows)")
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
    r.add_argument("-o", "--output", default=None,
                   help="the HTML file to write (default: RUN/report.html); never a file of a run or an existing "
                        "file that is not HTML")
    r.add_argument("--png", metavar="DIR", default=None,
                   help="also write every figure as a PNG into DIR (inside a run: only RUN/png)")
    r.add_argument("--depth", type=depth, default=None,
                   help="module-tree depth of the freeze map, 1 or more (default: fits ~40 rows)")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="fine-tune a narrow resnet34-shaped network, pretrained on scikit-learn's "
                                    "digits 0-4, on digits 5-9 and show what happened")
    d.add_argument("--out", default="runs/demo",
                   help="where to write the run: a new or empty folder, or one holding an earlier demo run, which "
                        "is replaced (default: runs/demo)")
    d.add_argument("--seed", type=_seed, default=0, help="random seed, 0 to 4294967295 (default: 0)")
    d.add_argument("--epochs", type=_epoch_pair, default=(3, 5),
                   help="epochs of the two fine-tuning stages, each 1 or more (default: 3,5)")
    d.add_argument("--pretrain-epochs", type=_count(1, "pretrain-epochs"), default=8,
                   help="epochs of pretraining on digits 0-4, 1 or more (default: 8)")
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
        from .render.terminal import safe  # one line, no control character of a name reaches the terminal

        print(f"freezeframe: error: {safe(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
