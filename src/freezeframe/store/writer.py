"""Writes a run directory: opens it by mode, holds its lock, and writes chunks and the manifest off
the training thread (each file under a dot-prefixed temporary name, renamed when complete)."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FreezeFrameError
from . import layout
from .rundir import MODES, Lock, acquire_lock, prepare_run_dir, read_manifest  # noqa: F401 - the writer's API

log = logging.getLogger("freezeframe")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_reference(path: Path, tensors: dict) -> None:
    """Add `tensors` (name -> W_ref) to the run's reference.safetensors, replacing entries of the
    same name, atomically (a temporary file, then os.replace: a reader sees the old file or the
    new one). The file's other entries are read back from it (the caller keeps no copy of them);
    CPU tensors are written from their own memory (docs/run-format.md, "reference.safetensors")."""
    from safetensors.torch import load_file, save_file

    ref = path / layout.REFERENCE
    merged = {}
    if ref.exists():
        try:
            merged = {n: t for n, t in load_file(str(ref)).items() if n not in tensors}
        except Exception as e:  # noqa: BLE001 - a damaged file (e.g. torn by a power loss) is replaced
            log.warning("freezeframe: %s could not be read (%s); it is rewritten with the refs taken now", ref, e)
    for n, t in tensors.items():
        t = t.detach()
        merged[n] = t if t.device.type == "cpu" and t.is_contiguous() else t.to("cpu").contiguous()
    tmp = ref.with_name(f".{ref.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        save_file(merged, str(tmp))
        with open(tmp, "rb") as f:  # on disk before the rename, as every file of the run
            os.fsync(f.fileno())
        os.replace(tmp, ref)
    finally:
        tmp.unlink(missing_ok=True)


class RunWriter:
    """A background thread that writes what the recorder hands it. The training thread only
    enqueues; `error` holds the first exception the thread met (the recorder turns it into
    one warning)."""

    def __init__(self, path: Path, session: int, *, pull=None, interval: float | None = None, lock: Lock | None = None):
        """`pull()`, when given, returns the tables buffered since the last hand-over; the
        thread calls it itself whenever half of `interval` passes since the last hand-over
        (a submit or a pull), so a step is on disk at most about `interval` seconds after it
        was recorded even if no further step comes (a long validation, a hang, a kill):
        half the interval waiting, the rest for the write (docs/run-format.md, "Crash window")."""
        self.path = path
        self.session = session
        self._pull = pull
        self._period = max((interval or 0.0) / 2, 0.02)
        self._lock = lock
        self.error: BaseException | None = None
        self.bytes_written = 0
        self._seq = {t: 0 for t in layout.TABLES}
        self._replaced_settled = False
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="freezeframe-writer", daemon=True)
        self._thread.start()

    # -- called on the training thread ------------------------------------------------------
    @property
    def failure(self) -> BaseException | None:
        """The first write's error, told as it is known now: a file of the run that vanished
        under a write means the run directory is being removed, and by the time the error is
        reported (`rm -rf` done) the lock says so; told at the write, the lock may still have
        been there."""
        e = self.error
        if isinstance(e, FileNotFoundError) and self._lock is not None and not self._lock.held():
            return FreezeFrameError(f"{self._lock.why_lost()}; this recorder stops writing to it")
        return e

    def submit(self, tables: dict[str, pa.Table], manifest: bytes | None, reference: dict | None = None) -> None:
        """`reference`: W_ref taken since the last hand-over, added to reference.safetensors
        before the manifest that names them is written."""
        self._queue.put((tables, manifest, time.monotonic(), reference))

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
        handed_over = time.monotonic()  # when the buffered rows were last taken
        while True:
            if self._pull is None:
                job = self._queue.get()
            else:
                try:
                    job = self._queue.get(timeout=max(self._period - (time.monotonic() - handed_over), 0.001))
                except queue.Empty:
                    handed_over = time.monotonic()
                    try:
                        if self.error is None:
                            self._write(self._pull(), None)
                    except BaseException as e:  # noqa: BLE001 - reported by the recorder
                        self.error = e
                    continue
            try:
                if job is None:
                    return
                tables, manifest, handed_over, reference = job
                if self.error is None:
                    self._write(tables, manifest, reference)
            except BaseException as e:  # noqa: BLE001 - reported by the recorder
                self.error = e
            finally:
                self._queue.task_done()

    def _write(self, tables: dict[str, pa.Table], manifest: bytes | None, reference: dict | None = None) -> None:
        if self._lock is not None and not self._lock.held():
            raise FreezeFrameError(f"{self._lock.why_lost()}; this recorder stops writing to it")
        if reference:
            write_reference(self.path, reference)
        self._write_all(tables, manifest)

    def _write_all(self, tables: dict[str, pa.Table], manifest: bytes | None) -> None:
        for name, table in tables.items():
            if table.num_rows == 0:
                continue
            self._seq[name] += 1
            self._write_table(self.path / layout.chunk_name(name, self._seq[name], self.session), table)
        if manifest is not None:
            atomic_write_bytes(self.path / layout.MANIFEST, manifest)
            self.bytes_written += len(manifest)
            if not self._replaced_settled:  # the new run has its manifest: a run it replaced goes now
                shutil.rmtree(self.path / layout.REPLACED, ignore_errors=True)
                self._replaced_settled = True

    def _write_table(self, final: Path, table: pa.Table) -> None:
        tmp = final.with_name("." + final.name + ".tmp")
        # floats byte-stream-split (docs/run-format.md, "Files:"): the tensors table's norms then
        # take about 16 % less time to read and to write, for about 4 % more bytes
        floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
        pq.write_table(table, tmp, compression="zstd", use_dictionary=["name"] if "name" in
                       table.column_names else False, use_byte_stream_split=floats or False)
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
