"""Reads a run directory, complete or interrupted, into tables and the manifest."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import RunError
from . import indexspace, layout, validate
from .rundir import pid_alive

log = logging.getLogger("freezeframe")

_CHUNK = re.compile(r"^s(\d{3})-(\d{6}|compact)\.parquet$")


BATCH_ROWS = 1 << 20  # rows per batch of `StoredRun.tensor_batches` (about 24 MB of columns)


@dataclass
class StoredRun:
    """A run as read. The steps and scalars tables are loaded; the tensors table (tens of millions
    of rows in a long run) is read from its Parquet files only when asked: `scan_tensors()` and
    `tensor_batches()` stream it a batch at a time, `tensors` loads it whole (once). All are in
    reader order (docs/run-format.md, "Tensor indices").

    A chunk whose footer reads but whose data does not is found by the first whole read of the
    table (the summary's scan, `tensors`, or `check_tensors()`): it is then left out and named in
    `unreadable` and `warnings`, where a reader that loads every table names it
    (docs/run-format.md, "Reading a run"). `tensors_checked` says that read has happened."""
    path: Path
    manifest: dict
    steps: pa.Table
    scalars: pa.Table
    tensor_files: list[Path] = field(default_factory=list)  # the readable chunks of the tensors table
    warnings: list[str] = field(default_factory=list)
    live: bool = False                  # writer.lock held by a live process: training in progress
    steps_expected: int | None = None   # the manifest's steps_total
    unreadable: list[str] = field(default_factory=list)  # one line per chunk that could not be read
    stored_manifest: dict | None = None  # the manifest before `indexspace.to_reader` (for the tensor index)
    _tensors: pa.Table | None = None
    tensors_checked: bool = False       # every chunk of the tensors table has been read whole once
    # where the tensors table's lines go among `unreadable` (after the steps', before the scalars'),
    # and each listed tensors chunk's place in the listing (the lines keep the listing's order)
    _notes: tuple[list, dict, list] = field(default_factory=lambda: ([], {}, []))
    _chunk_rank: dict = field(default_factory=dict)

    @property
    def tensors(self) -> pa.Table:
        """The whole tensors table (loaded on first use and kept)."""
        if self._tensors is None:
            tables = []
            for f in list(self.tensor_files):
                try:
                    tables.append(self._to_reader(_read_chunk(f)))
                except Exception as e:  # noqa: BLE001 - a damaged chunk must not stop the reader
                    self._drop(f, e)
            self._tensors = pa.concat_tables(tables) if tables else layout.TENSORS_SCHEMA.empty_table()
            self.tensors_checked = True
        return self._tensors

    @property
    def tensor_rows(self) -> int:
        """The number of rows of the tensors table (from the files' footers when not loaded)."""
        if self._tensors is not None:
            return self._tensors.num_rows
        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.tensor_files)

    def scan_tensors(self, rows: int = BATCH_ROWS) -> Iterator[tuple[Path | None, pa.Table | None]]:
        """The whole tensors table, every column, at most `rows` rows at a time in stored row
        order, as (chunk file, table) pairs; the file is None once the table is in memory.
        A chunk found damaged part-way gives (file, None) after the batches it gave: what it
        gave is to be discarded (it is then out of `tensor_files` and named in `unreadable`).
        The next batch is decoded on a second thread while the caller works on this one."""
        if self._tensors is not None:
            for a in range(0, self._tensors.num_rows, rows):
                yield None, self._tensors.slice(a, rows)
            return
        for f in list(self.tensor_files):
            batches = self._chunk_batches(f, rows)
            try:
                for table in batches:
                    yield f, table
            except Exception as e:  # noqa: BLE001 - a damaged chunk must not stop the reader
                self._drop(f, e)
                yield f, None
            finally:
                batches.close()
        self.tensors_checked = True

    def check_tensors(self) -> None:
        """Read the tensors table whole once (if not yet), so that `unreadable` names every damaged chunk."""
        if not self.tensors_checked:
            for _ in self.scan_tensors():
                pass

    def tensor_batches(self, columns: list[str] | None = None, rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
        """The tensors table in stored row order, at most `rows` rows at a time, `columns` only
        (all when None), typed as docs/run-format.md says and in reader order: what `tensors`
        holds, without holding all of it. The chunks are checked first (`check_tensors`)."""
        names = list(columns) if columns is not None else layout.TENSORS_SCHEMA.names
        self.check_tensors()
        if self._tensors is not None:
            table = self._tensors.select(names)
            for a in range(0, table.num_rows, rows):
                yield table.slice(a, rows)
            return
        for f in self.tensor_files:
            try:
                yield from self._chunk_batches(f, rows, names)
            except OSError as e:  # read whole before: the file changed since
                raise RunError(f"{f}: cannot be read any more ({type(e).__name__}: {e})") from None

    def _chunk_batches(self, f: Path, rows: int, names: list[str] | None = None) -> Iterator[pa.Table]:
        """One chunk's row groups, the columns `names` (all by default: damage anywhere counts),
        decoded two at a time on worker threads while the caller works on the one before."""
        names = layout.TENSORS_SCHEMA.names if names is None else names
        schema = pa.schema([layout.TENSORS_SCHEMA.field(n) for n in names])

        def read(group: int) -> pa.Table:
            table = pq.ParquetFile(f).read_row_group(group, columns=names, use_threads=False)
            return self._to_reader(table.select(names).cast(schema))

        for table in _prefetch(read, range(pq.ParquetFile(f).metadata.num_row_groups)):
            for a in range(0, table.num_rows, rows):
                yield table.slice(a, rows)

    def _to_reader(self, table: pa.Table) -> pa.Table:
        return table if self.stored_manifest is None else indexspace.tensors_to_reader(self.stored_manifest, table)

    def _drop(self, f: Path, error: Exception) -> None:
        """A tensors chunk found damaged after load: out of the table, named where the loaded
        tables' damaged chunks are."""
        if f in self.tensor_files:
            self.tensor_files.remove(f)
        msg = _damage_line(f, layout.TENSORS_SCHEMA, error)
        log.info("freezeframe: %s", msg)
        before, tensor_notes, after = self._notes
        tensor_notes[self._chunk_rank.get(f, len(self._chunk_rank))] = msg
        lines = before + [tensor_notes[k] for k in sorted(tensor_notes)] + after
        n_old = len(self.unreadable)
        self.unreadable[:] = lines
        self.warnings[:] = lines + self.warnings[n_old:]

    def reference(self) -> dict:
        """W_ref by tensor name (CPU tensors): what reference.safetensors holds, i.e. the tensors
        whose W_ref was taken (manifest `reference_taken`; buffers, and parameters once they
        trained), {} when the run was recorded without one (docs/run-format.md)."""
        ref = self.path / layout.REFERENCE
        if not ref.exists():
            return {}
        from safetensors.torch import load_file

        try:
            return load_file(str(ref))
        except Exception as e:  # noqa: BLE001 - torn or overwritten: say which file, not a library error
            raise RunError(f"{str(ref)!r} is damaged: {e}") from None


def _chunk_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    by_session: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        m = _CHUNK.match(f.name)  # dot-prefixed temporary files never match
        if m:
            by_session.setdefault(m.group(1), []).append(f)
    files = []
    for session in sorted(by_session):
        chunks = by_session[session]
        compact = [f for f in chunks if f.name.endswith("-compact.parquet")]
        files.extend(compact or chunks)
    return files


class _Vanished(Exception):
    """A listed chunk was gone when read: merged into a `-compact` file meanwhile."""


def _read_chunk(f: Path, schema: pa.Schema = layout.TENSORS_SCHEMA) -> pa.Table:
    return pq.read_table(f).select(schema.names).cast(schema)


def _damage_line(f: Path, schema: pa.Schema, error: Exception, exact: bool = False) -> str:
    """The line that names a damaged chunk: with the error reading the whole chunk gives (the one
    a reader that loads the table whole reports), `error` when that read succeeds or `exact`."""
    if not exact:
        try:
            _read_chunk(f, schema)
        except Exception as e:  # noqa: BLE001 - only its text is wanted
            error = e
    return f"skipped damaged chunk {f} ({type(error).__name__}: {error})"


def _prefetch(read, items, ahead: int = 2) -> Iterator:
    """read(item) for each item, in order, up to `ahead` of them computed on worker threads while
    the caller works on the one before (Arrow and numpy release the GIL); an error reading is
    raised where that item is due."""
    from concurrent.futures import ThreadPoolExecutor

    pending: list = []
    items = iter(items)
    with ThreadPoolExecutor(ahead, thread_name_prefix="freezeframe-read") as pool:
        try:
            for item in items:
                pending.append(pool.submit(read, item))
                if len(pending) > ahead:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for job in pending:
                job.cancel()


def _read_once(folder: Path, schema: pa.Schema, unreadable: list[str]) -> pa.Table:
    tables = []
    for f in _chunk_files(folder):
        try:
            t = _read_chunk(f, schema)
        except FileNotFoundError:
            raise _Vanished(f) from None
        except Exception as e:  # noqa: BLE001 - a damaged chunk must not stop the reader
            unreadable.append(_damage_line(f, schema, e, exact=True))
            continue
        tables.append(t)
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def _read_table(folder: Path, schema: pa.Schema, unreadable: list[str], tries: int = 3) -> pa.Table:
    """Every readable chunk of one table. The writer's compaction at session close writes the
    merged file before it removes the chunks, so a chunk that vanished between listing and
    reading was compacted, not lost: the folder is listed again and read again."""
    for _ in range(tries):
        found: list[str] = []
        try:
            table = _read_once(folder, schema, found)
        except _Vanished as gone:
            last = gone
            continue
        unreadable.extend(found)
        return table
    unreadable.append(f"skipped chunk {last} (it vanished while being read, {tries} times)")
    return schema.empty_table()


def _lock_is_live(path: Path) -> bool:
    """writer.lock names a process of this host that is still alive (docs/run-format.md)."""
    try:
        info = json.loads((path / layout.LOCK).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return False  # a lock of another host cannot be probed: the manifest says what is known
    return pid_alive(info.get("pid"))


def _parse_manifest(path: Path, mpath: Path) -> dict:
    try:
        text = mpath.read_text()
    except OSError as e:
        raise RunError(f"{mpath}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise RunError(f"{mpath} is not text: the file is damaged") from None
    if not text.strip():
        raise RunError(f"{mpath} is empty: the run was never written (or its disk filled up)")
    try:
        manifest = json.loads(text)
    except RecursionError:
        raise RunError(f"{mpath} is damaged: it nests deeper than a manifest can "
                       f"(more than {validate.MAX_DEPTH} levels)") from None
    except ValueError as e:
        raise RunError(f"{mpath} is truncated or not JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema"), str) \
            or not manifest["schema"].startswith("freezeframe.run/"):
        raise RunError(f"{mpath} is not a freezeframe manifest")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RunError(f"{mpath} is damaged: schema_version must be a whole number >= 1, got "
                       f"{'nothing' if 'schema_version' not in manifest else ascii(version)[:40]}")
    if version > layout.SCHEMA_VERSION:
        raise RunError(f"{str(path)!r} was written with run schema version {version}, newer than this "
                       f"freezeframe understands ({layout.SCHEMA_VERSION}): upgrade freezeframe")
    validate.check_manifest(str(mpath), manifest)
    return manifest


def read_run(run_dir) -> StoredRun:
    if not isinstance(run_dir, (str, Path)) and not hasattr(run_dir, "__fspath__"):
        raise RunError(f"a run directory must be a path, got {type(run_dir).__name__}")
    path = Path(run_dir)
    if not path.exists():
        raise RunError(f"{str(path)!r} does not exist")
    if not path.is_dir():
        raise RunError(f"{str(path)!r} is not a run directory (it is a file)")
    mpath = path / layout.MANIFEST
    if not mpath.exists():
        raise RunError(f"{str(path)!r} is not a freezeframe run: it has no {layout.MANIFEST}")
    live = _lock_is_live(path)  # before the manifest: a run that finishes meanwhile reads as complete
    manifest = _parse_manifest(path, mpath)
    live = live and not manifest.get("complete")
    notes: dict[str, list[str]] = {name: [] for name in layout.SCHEMAS}
    tables, tensors, listed, files = {}, None, [], []
    for name, schema in layout.SCHEMAS.items():  # in this order: a live writer adds rows meanwhile
        if name != layout.TENSORS:
            tables[name] = _read_table(path / name, schema, notes[name])
        elif live:  # a live writer may compact its chunks under a lazy reader: read it now
            tensors = _read_table(path / name, schema, notes[name])
        else:       # read when used (StoredRun.scan_tensors): only the footers now
            listed = _chunk_files(path / name)
            files = _readable_files(listed, schema, notes[name])
    tensor_notes = notes[layout.TENSORS]
    unreadable = [line for name in layout.SCHEMAS for line in notes[name]]  # the tables' order
    for msg in unreadable:  # returned to every reader (summary header, check's refusal): logged at info
        log.info("freezeframe: %s", msg)
    stored_manifest = manifest
    manifest, _ = indexspace.to_reader(manifest, layout.TENSORS_SCHEMA.empty_table())  # docs/run-format.md
    if tensors is not None:
        tensors = indexspace.tensors_to_reader(stored_manifest, tensors)
    steps = tables[layout.STEPS].sort_by("step")
    rank = {f: k for k, f in enumerate(listed)}
    by_rank = {rank[f]: line for f, line in zip([f for f in listed if f not in files], tensor_notes)} if not live \
        else dict(enumerate(tensor_notes))
    return StoredRun(path=path, manifest=manifest, steps=steps, scalars=tables[layout.SCALARS],
                     tensor_files=files, warnings=list(unreadable), live=live,
                     steps_expected=manifest.get("steps_total"), unreadable=unreadable,
                     stored_manifest=stored_manifest, _tensors=tensors, tensors_checked=live,
                     _notes=(list(notes[layout.STEPS]), by_rank, list(notes[layout.SCALARS])), _chunk_rank=rank)


def _readable_files(listed: list[Path], schema: pa.Schema, unreadable: list[str]) -> list[Path]:
    """The chunks whose footer reads and whose columns are the schema's (a damaged chunk is
    named in `unreadable` and left out, as `_read_table` does)."""
    files = []
    for f in listed:
        try:
            have = pq.ParquetFile(f).schema_arrow
            missing = [n for n in schema.names if n not in have.names]
            if missing:
                raise ValueError(f"no column {missing[0]!r}")
        except Exception as e:  # noqa: BLE001 - a damaged chunk must not stop the reader
            unreadable.append(_damage_line(f, schema, e))
            continue
        files.append(f)
    return files
