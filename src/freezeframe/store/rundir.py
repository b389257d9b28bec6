"""Opens a run directory for writing: applies the mode, claims the directory with a lock, and
replaces an old run without ever leaving neither the old run nor a new one (docs/run-format.md,
"Replacing a run")."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from ..errors import FreezeFrameError
from . import layout

from ..modes import MODES  # one definition (freezeframe/modes.py), read by the integrations too


def pid_alive(pid) -> bool:
    """A process of this host with that pid exists (a pid that is not a positive int: no)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def read_manifest(path: Path) -> dict | None:
    """The existing manifest of a run directory, None when there is none."""
    mpath = path / layout.MANIFEST
    if not mpath.exists():
        return None
    try:
        return json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise FreezeFrameError(f"{mpath}: cannot be read as a freezeframe manifest ({e})") from None


def _cannot_write(path: Path, e: OSError) -> FreezeFrameError:
    return FreezeFrameError(f"cannot write the run directory {str(path)!r}: {e.strerror or e}")


def prepare_run_dir(run_dir: str | os.PathLike, mode: str) -> tuple[Path, dict | None]:
    """Apply `mode` to the directory; returns (path, existing manifest to append to or None).
    Every refusal comes before anything is moved or deleted."""
    if mode not in MODES:
        raise FreezeFrameError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if not isinstance(run_dir, (str, Path)) and not hasattr(run_dir, "__fspath__"):
        raise FreezeFrameError(f"run_dir must be a path (str or pathlib.Path), got {run_dir!r} "
                               f"({type(run_dir).__name__})")
    path = Path(run_dir)
    try:
        if path.exists() and not path.is_dir():
            raise FreezeFrameError(f"run directory {str(path)!r} is a file, not a directory")
        if path.exists():
            _check_lock(path)
            settle_replaced(path)
        existing = read_manifest(path) if path.exists() else None
        if existing is not None and mode == "new":
            raise FreezeFrameError(f"{str(path)!r} already holds a run and mode='new' refuses it "
                                   "(use mode='append' to add stages or mode='overwrite' to replace it)")
        if existing is not None and mode == "overwrite":
            entries = _entries_of_run(path)
            _probe(path)
            _set_aside(path, entries)
            existing = None
        ours = {layout.LOCK, layout.REFERENCE, *layout.TABLES}  # a run that never got its manifest
        if existing is None and path.exists() and any(
                p.name not in ours and not p.name.startswith(".") for p in path.iterdir()):
            raise FreezeFrameError(f"{str(path)!r} is not empty and holds no freezeframe run: "
                                   "choose a new or empty directory")
        path.mkdir(parents=True, exist_ok=True)
        for table in layout.TABLES:
            (path / table).mkdir(exist_ok=True)
        _probe(path)
    except OSError as e:
        raise _cannot_write(path, e) from None
    return path, existing


def _probe(path: Path) -> None:
    """Writability decided by writing (permission bits do not stop root; a read-only mount does)."""
    probe = path / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    probe.unlink()


def _entries_of_run(path: Path) -> list[Path]:
    """Everything mode="overwrite" replaces: the run's files and freezeframe's own outputs kept
    with it. Anything else in the directory refuses the overwrite, before anything is touched."""
    entries, foreign = [], []
    for p in sorted(path.iterdir()):
        if p.name.startswith("."):
            continue  # temporaries of interrupted writes
        if p.name in layout.RUN_FILES or p.name in (layout.REPORT, layout.DEMO_MARKER):
            entries.append(p)
        elif p.name == layout.PNG_DIR and p.is_dir():
            strays = [q.name for q in p.iterdir() if not (q.name.endswith(".png") or q.name.startswith("."))]
            (foreign.extend(f"{layout.PNG_DIR}/{n}" for n in sorted(strays)) if strays else entries.append(p))
        else:
            foreign.append(p.name)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FreezeFrameError(f"{str(path)!r} holds files that are not part of its run ({shown}); "
                               "mode='overwrite' changed nothing: move them or use another run directory")
    # the manifest goes first: a directory with a manifest and a `.replaced` folder holds a new run
    entries.sort(key=lambda p: p.name != layout.MANIFEST)
    return entries


def _set_aside(path: Path, entries: list[Path]) -> None:
    stash = path / layout.REPLACED
    stash.mkdir()
    try:
        for p in entries:
            os.rename(p, stash / p.name)
    except OSError:
        settle_replaced(path)  # what was moved goes back: the old run stays as it was
        raise


def settle_replaced(path: Path) -> None:
    """Finish an overwrite that was interrupted: with a new manifest written, the old run (set
    aside in `.replaced`) is deleted; without one, the old run is put back."""
    stash = path / layout.REPLACED
    if not stash.is_dir():
        return
    if (path / layout.MANIFEST).exists():
        shutil.rmtree(stash, ignore_errors=True)
        return
    for p in sorted(stash.iterdir()):
        target = path / p.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # the new run's empty or partial tables
        elif target.exists() or target.is_symlink():
            target.unlink()  # its partial reference, its lock
        os.rename(p, target)
    stash.rmdir()


def _check_lock(path: Path) -> None:
    lock = path / layout.LOCK
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if info.get("host") != socket.gethostname():
        return
    if info.get("pid") != os.getpid() and pid_alive(info["pid"]):
        raise FreezeFrameError(
            f"{str(path)!r} is being written by another process (pid {info['pid']}); "
            "two processes cannot write one run: use another run directory")


class Lock:
    """This recorder's claim on a run directory (a file holding pid, host and a token)."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token

    def held(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, ValueError):
            return False

    def why_lost(self) -> str:
        """Why `held()` is false, in the user's words."""
        run = self.path.parent
        if not run.exists():
            return f"the run directory {str(run)!r} was deleted while recording"
        if not self.path.exists():
            return f"the lock file {self.path} was deleted while recording (was the run directory emptied?)"
        return f"another recorder took over {str(run)!r}"

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink(missing_ok=missing_ok)
                settle_replaced(self.path.parent)  # a recording that never wrote its manifest: the old run is back
        except (OSError, ValueError):
            pass


def acquire_lock(path: Path) -> Lock:
    """Claim the run directory for this recorder; a stale lock (its process gone) is taken over,
    a live one (another process, or another open recorder of this process) is refused."""
    lock = path / layout.LOCK
    token = uuid.uuid4().hex
    payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                          "token": token}).encode()
    try:
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                _check_lock(path)
                # stale (its process is gone), or an earlier recorder of this process (a re-run
                # notebook cell, a re-created Learner): taken over; that recorder stops writing
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            return Lock(lock, token)
    except OSError as e:
        raise _cannot_write(path, e) from None
    raise FreezeFrameError(f"cannot take the lock {lock}")
