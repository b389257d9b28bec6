"""Where freezeframe's own outputs (the HTML report, the PNGs) may be written, and how: never over a
file of a run, never over a file that is not one of ours, each file complete or not there at all
(docs/run-format.md, "What is written where")."""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from ..errors import FreezeFrameError
from . import layout

HTML_SUFFIXES = (".html", ".htm")


def is_run_dir(path: Path) -> bool:
    """A directory holding a freezeframe run (its manifest, or the lock of one being written)."""
    if (path / layout.LOCK).is_file():
        return True
    manifest = path / layout.MANIFEST
    if not manifest.is_file():
        return False
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return (path / layout.STEPS).is_dir()  # a damaged run is still a run
    return isinstance(doc, dict) and str(doc.get("schema", "")).startswith("freezeframe.run")


def _enclosing_run(path: Path, runs: tuple[Path, ...]) -> Path | None:
    """The run directory `path` is inside of (or is), None when there is none."""
    known = {r.resolve() for r in runs}
    for d in (path, *path.parents):
        if d in known or (d.is_dir() and is_run_dir(d)):
            return d
    return None


def check_report_file(path, *, runs=()) -> Path:
    """Refuse, naming the reason, any place a report must not be written: a directory, an
    existing file that is not HTML, any file inside a run directory but its report.html."""
    given = Path(path)
    where = given.resolve()
    run = _enclosing_run(where.parent, tuple(Path(r) for r in runs))
    if run is not None and where != run / layout.REPORT:
        raise FreezeFrameError(f"{str(given)!r} is inside the run directory {str(run)!r}, where freezeframe "
                               f"writes only {layout.REPORT} and {layout.PNG_DIR}/: choose a file outside it")
    if where.is_dir():
        raise FreezeFrameError(f"{str(given)!r} is a directory: give the report a file name, "
                               f"e.g. {str(given / layout.REPORT)!r}")
    if where.exists() and where.suffix.lower() not in HTML_SUFFIXES:
        raise FreezeFrameError(f"{str(given)!r} exists and is not an HTML file: freezeframe replaces only an "
                               "existing .html report; choose another file name")
    _probe(where.parent, given)
    return given


def check_png_dir(path, *, runs=()) -> Path:
    """Refuse a PNG folder that is a file, a run directory, or any folder inside a run but its png/."""
    given = Path(path)
    where = given.resolve()
    if where.exists() and not where.is_dir():
        raise FreezeFrameError(f"{str(given)!r} is a file, not a folder: --png takes the folder to write the PNGs into")
    run = _enclosing_run(where, tuple(Path(r) for r in runs))
    if run is not None and where == run:
        raise FreezeFrameError(f"{str(given)!r} is a run directory: write its PNGs into "
                               f"{str(given / layout.PNG_DIR)!r} or a folder outside it")
    if run is not None and where != run / layout.PNG_DIR:
        raise FreezeFrameError(f"{str(given)!r} is inside the run directory {str(run)!r}, where freezeframe "
                               f"writes PNGs only into {layout.PNG_DIR}/: choose a folder outside it")
    _probe(where, given)
    return given


def _probe(folder: Path, given: Path) -> None:
    """Writability decided by writing a temporary file into `folder`, or into its nearest existing
    parent when it is still to be made (permission bits do not stop root; a read-only mount does)."""
    d = folder
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise FreezeFrameError(f"cannot write {str(given)!r}: {str(d)!r} is a file, not a folder")
    probe = d / f".probe-{os.getpid()}-{threading.get_ident()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        probe.unlink()
    except OSError as e:
        raise FreezeFrameError(f"cannot write {str(given)!r}: {e.strerror or e}") from None


def make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FreezeFrameError(f"cannot create the folder {str(path)!r}: a file is in the way") from None
    except OSError as e:
        raise FreezeFrameError(f"cannot create the folder {str(path)!r}: {e.strerror or e}") from None


@contextmanager
def replacing(path: Path):
    """Write `path` through a temporary file beside it, opened first (an unwritable place fails
    before any work) and renamed over `path` when complete; on any error the temporary file is
    removed and `path` is as it was. Yields the open binary file."""
    path = Path(path)
    make_dir(path.parent)
    if path.is_dir():
        raise FreezeFrameError(f"cannot write {str(path)!r}: it is a directory")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        f = open(tmp, "wb")
    except OSError as e:
        raise FreezeFrameError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    try:
        with f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FreezeFrameError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
