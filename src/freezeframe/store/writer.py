"""Writes a run directory: opens it by mode, holds its lock, and writes chunks and the manifest off
the training thread (each file under a dot-prefixed temporary name, renamed when complete)."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import socket
import threading
import uuid
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FreezeFrameError
from . import layout

log = logging.getLogger("freezeframe")

MODES = ("append", "new", "overwrite")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
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


def prepare_run_dir(run_dir: str | os.PathLike, mode: str) -> tuple[Path, dict | None]:
    """Apply `mode` to the directory; returns (path, existing manifest to append to or None)."""
    if mode not in MODES:
        raise FreezeFrameError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if not isinstance(run_dir, (str, Path)) and not hasattr(run_dir, "__fspath__"):
        raise FreezeFrameError(f"run_dir must be a path (str or pathlib.Path), got {run_dir!r} "
                               f"({type(run_dir).__name__})")
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise FreezeFrameError(f"run directory {str(path)!r} is a file, not a directory")
    existing = read_manifest(path) if path.exists() else None
    if existing is not None and mode == "new":
        raise FreezeFrameError(f"{str(path)!r} already holds a run and mode='new' refuses it "
                               "(use mode='append' to add stages or mode='overwrite' to replace it)")
    if existing is not None and mode == "overwrite":
        _check_lock(path)
        for table in layout.TABLES:
            shutil.rmtree(path / table, ignore_errors=True)
        for name in (layout.MANIFEST, layout.REFERENCE):
            (path / name).unlink(missing_ok=True)
        existing = None
    ours = {layout.LOCK, layout.REFERENCE, *layout.TABLES}  # a run that never got its manifest
    if existing is None and path.exists() and any(
            p.name not in ours and not p.name.startswith(".") for p in path.iterdir()):
        raise FreezeFrameError(f"{str(path)!r} is not empty and holds no freezeframe run: "
                               "choose a new or empty directory")
    path.mkdir(parents=True, exist_ok=True)
    for table in layout.TABLES:
        (path / table).mkdir(exist_ok=True)
    return path, existing


def _check_lock(path: Path) -> None:
    lock = path / layout.LOCK
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if info.get("host") != socket.gethostname():
        return
    if info.get("pid") != os.getpid() and _pid_alive(info["pid"]):
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

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink(missing_ok=missing_ok)
        except (OSError, ValueError):
            pass


def acquire_lock(path: Path) -> Lock:
    """Claim the run directory for this recorder; a stale lock (its process gone) is taken over,
    a live one (another process, or another open recorder of this process) is refused."""
    lock = path / layout.LOCK
    token = uuid.uuid4().hex
    payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                          "token": token}).encode()
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
    raise FreezeFrameError(f"cannot take the lock {lock}")


class RunWriter:
    """A background thread that writes what the recorder hands it. The training thread only
    enqueues; `error` holds the first exception the thread met (the recorder turns it into
    one warning)."""

    def __init__(self, path: Path, session: int, *, pull=None, interval: float | None = None, lock: Lock | None = None):
        """`pull()`, when given, returns the tables buffered since the last hand-over; the
        thread calls it itself whenever `interval` seconds pass with nothing submitted, so a
        step waits at most that long in memory even if no further step comes (a long
        validation, a hang, a kill)."""
        self.path = path
        self.session = session
        self._pull = pull
        self._interval = interval
        self._lock = lock
        self.error: BaseException | None = None
        self.bytes_written = 0
        self._seq = {t: 0 for t in layout.TABLES}
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="freezeframe-writer", daemon=True)
        self._thread.start()

    # -- called on the training thread ------------------------------------------------------
    def submit(self, tables: dict[str, pa.Table], manifest: bytes | None) -> None:
        self._queue.put((tables, manifest))

    def drain(self) -> None:
        """Wait until everything submitted is on disk."""
        self._queue.join()

    def close(self, compact: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        if compact and self.error is None:
            try:
                self._compact()
            except Exception as e:  # noqa: BLE001 - compaction is an optimisation
                log.warning("freezeframe: could not compact %s: %s", self.path, e)

    # -- the writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=max(self._interval or 0.0, 0.05)) if self._pull else self._queue.get()
            except queue.Empty:
                try:
                    if self.error is None:
                        self._write(self._pull(), None)
                except BaseException as e:  # noqa: BLE001 - reported by the recorder
                    self.error = e
                continue
            try:
                if job is None:
                    return
                if self.error is None:
                    self._write(*job)
            except BaseException as e:  # noqa: BLE001 - reported by the recorder
                self.error = e
            finally:
                self._queue.task_done()

    def _write(self, tables: dict[str, pa.Table], manifest: bytes | None) -> None:
        if self._lock is not None and not self._lock.held():
            raise FreezeFrameError(f"another recorder took over {str(self.path)!r}; this one stops writing to it")
        for name, table in tables.items():
            if table.num_rows == 0:
                continue
            self._seq[name] += 1
            self._write_table(self.path / layout.chunk_name(name, self._seq[name], self.session), table)
        if manifest is not None:
            atomic_write_bytes(self.path / layout.MANIFEST, manifest)
            self.bytes_written += len(manifest)

    def _write_table(self, final: Path, table: pa.Table) -> None:
        tmp = final.with_name("." + final.name + ".tmp")
        pq.write_table(table, tmp, compression="zstd", use_dictionary=["name"] if "name" in
                       table.column_names else False)
        os.replace(tmp, final)
        self.bytes_written += final.stat().st_size

    def _compact(self) -> None:
        """Merge this session's chunks of each table into one file (smaller, faster to read).
        The merged file is complete before any chunk is removed; a reader that finds a session's
        `-compact` file ignores that session's other chunks, so a crash here loses nothing."""
        for name in layout.TABLES:
            files = sorted((self.path / name).glob(f"s{self.session:03d}-*.parquet"))
            if len(files) < 2:
                continue
            merged = pa.concat_tables([pq.read_table(f) for f in files])
            final = self.path / name / f"s{self.session:03d}-compact.parquet"
            self._write_table(final, merged)
            for f in files:
                f.unlink()
