"""The run directory's layout and the schemas of its files (one place for every name)."""

from __future__ import annotations

import pyarrow as pa

SCHEMA = "freezeframe.run/1"
SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
REFERENCE = "reference.safetensors"
LOCK = "writer.lock"
STEPS = "steps"        # one row per applied optimizer step
TENSORS = "tensors"    # one row per recorded tensor per recorded step
SCALARS = "scalars"    # one row per value given to Recorder.log()
TABLES = (STEPS, TENSORS, SCALARS)
RUN_FILES = (MANIFEST, REFERENCE, LOCK, *TABLES)  # the run itself

# freezeframe's own outputs kept in a run directory: part of the run (mode="overwrite" replaces
# them with it), and the only things `freezeframe report` and the demo write inside a run
REPORT = "report.html"
PNG_DIR = "png"
DEMO_MARKER = "demo.json"  # written by `freezeframe demo`: this run is the demo's
OWN_OUTPUTS = (REPORT, PNG_DIR, DEMO_MARKER)

# mode="overwrite" renames the old run into this folder first and deletes it only once the new
# run's manifest is written (docs/run-format.md, "Replacing a run")
REPLACED = ".replaced"

# Columns of the per-step table. `lr`, `momentum`, `weight_decay` hold one value per param
# group (global group index, in the stage's group order); `grads` is a bitmask over parameter
# indices (numpy.packbits order) of tensors into which a gradient was accumulated this step.
STEPS_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("stage", pa.int32()),
    ("session", pa.int32()),
    ("optimizer", pa.int16()),
    ("time", pa.float64()),
    ("recorded", pa.bool_()),
    ("lr", pa.list_(pa.float64())),
    ("momentum", pa.list_(pa.float64())),
    ("weight_decay", pa.list_(pa.float64())),
    ("grads", pa.binary()),
])

# Tensor metrics on recorded steps. `tensor` indexes the model map's parameters, then its
# floating-point buffers (offset by the number of parameters). `param_norm` is ||W_before||,
# `update_norm` is ||W_after - W_before||, `drift` is ||W_after - W_ref||; null where not measured.
TENSORS_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("tensor", pa.int32()),
    ("grad_norm", pa.float32()),
    ("update_norm", pa.float32()),
    ("param_norm", pa.float32()),
    ("drift", pa.float32()),
])

SCALARS_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("name", pa.string()),
    ("value", pa.float64()),
])

SCHEMAS = {STEPS: STEPS_SCHEMA, TENSORS: TENSORS_SCHEMA, SCALARS: SCALARS_SCHEMA}


def chunk_name(table: str, seq: int, session: int) -> str:
    return f"{table}/s{session:03d}-{seq:06d}.parquet"
