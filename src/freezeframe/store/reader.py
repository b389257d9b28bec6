"""Reads a run directory, complete or interrupted, into tables and the manifest."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import RunError
from . import layout

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

    def reference(self) -> dict:
        """W_ref by tensor name (CPU tensors), {} when the run was recorded without one."""
        ref = self.path / layout.REFERENCE
        if not ref.exists():
            return {}
        from safetensors.torch import load_file

        return load_file(str(ref))


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


def _read_table(folder: Path, schema: pa.Schema, warnings: list[str]) -> pa.Table:
    tables = []
    for f in _chunk_files(folder):
        try:
            t = pq.read_table(f)
            t = t.select(schema.names).cast(schema)
        except Exception as e:  # noqa: BLE001 - a damaged chunk must not stop the reader
            msg = f"skipped damaged chunk {f} ({type(e).__name__}: {e})"
            log.warning("freezeframe: %s", msg)
            warnings.append(msg)
            continue
        tables.append(t)
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def _check_manifest(mpath: Path, m: dict) -> None:
    """The keys every reader relies on, with their types: a damaged manifest is named, not a KeyError."""
    model = m.get("model")
    problems = []
    if not isinstance(model, dict):
        problems.append("model")
    else:
        for key in ("params", "buffers", "modules"):
            if not isinstance(model.get(key), list):
                problems.append(f"model.{key}")
        for i, p in enumerate(model.get("params") or []):
            if not isinstance(p, dict) or not {"name", "numel", "shape", "module"} <= set(p):
                problems.append(f"model.params[{i}]")
                break
    for key in ("stages", "sessions"):
        if not isinstance(m.get(key, []), list):
            problems.append(key)
    for i, s in enumerate(m.get("stages") or []):
        if not isinstance(s, dict) or "index" not in s or "name" not in s:
            problems.append(f"stages[{i}]")
            break
    if problems:
        raise RunError(f"{mpath} is damaged: missing or malformed {', '.join(problems)}")


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
    except ValueError as e:
        raise RunError(f"{mpath} is truncated or not JSON ({e})") from None
    if not isinstance(manifest, dict) or not str(manifest.get("schema", "")).startswith("freezeframe.run/"):
        raise RunError(f"{mpath} is not a freezeframe manifest")
    version = manifest.get("schema_version", 0)
    if not isinstance(version, int) or version > layout.SCHEMA_VERSION:
        raise RunError(f"{str(path)!r} was written with run schema version {version}, newer than this "
                       f"freezeframe understands ({layout.SCHEMA_VERSION}): upgrade freezeframe")
    _check_manifest(mpath, manifest)
    warnings: list[str] = []
    tables = {name: _read_table(path / name, schema, warnings) for name, schema in layout.SCHEMAS.items()}
    steps = tables[layout.STEPS].sort_by("step")
    return StoredRun(path=path, manifest=manifest, steps=steps, tensors=tables[layout.TENSORS],
                     scalars=tables[layout.SCALARS], warnings=warnings)
