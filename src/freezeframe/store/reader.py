"""Reads a run directory, complete or interrupted, into tables and the manifest."""

from __future__ import annotations

import json
import logging
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


@dataclass
class StoredRun:
    path: Path
    manifest: dict
    steps: pa.Table
    tensors: pa.Table
    scalars: pa.Table
    warnings: list[str] = field(default_factory=list)
    live: bool = False                  # writer.lock held by a live process: training in progress
    steps_expected: int | None = None   # the manifest's steps_total
    unreadable: list[str] = field(default_factory=list)  # one line per chunk that could not be read

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


def _read_once(folder: Path, schema: pa.Schema, unreadable: list[str]) -> pa.Table:
    tables = []
    for f in _chunk_files(folder):
        try:
            t = pq.read_table(f)
            t = t.select(schema.names).cast(schema)
        except FileNotFoundError:
            raise _Vanished(f) from None
        except Exception as e:  # noqa: BLE001 - a damaged chunk must not stop the reader
            unreadable.append(f"skipped damaged chunk {f} ({type(e).__name__}: {e})")
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
    unreadable: list[str] = []
    tables = {name: _read_table(path / name, schema, unreadable) for name, schema in layout.SCHEMAS.items()}
    for msg in unreadable:  # returned to every reader (summary header, check's refusal): logged at info
        log.info("freezeframe: %s", msg)
    manifest, tables[layout.TENSORS] = indexspace.to_reader(manifest, tables[layout.TENSORS])  # docs/run-format.md
    steps = tables[layout.STEPS].sort_by("step")
    live = live and not manifest.get("complete")
    return StoredRun(path=path, manifest=manifest, steps=steps, tensors=tables[layout.TENSORS],
                     scalars=tables[layout.SCALARS], warnings=list(unreadable), live=live,
                     steps_expected=manifest.get("steps_total"), unreadable=unreadable)
