"""Checkpoints from anywhere (a PyTorch state_dict, a fastai `learn.save` file, a Lightning `.ckpt`,
safetensors), read without executing pickled code, as {name: tensor}."""

from __future__ import annotations

import codecs
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import FreezeFrameError


class CheckpointError(FreezeFrameError):
    """A checkpoint that cannot be read: the message names the file and why."""


# --------------------------------------------------------------------------- inert stand-ins
# The harmless types such files really hold are rebuilt by these functions of ours, under the
# names the pickle uses; nothing the pickle names is imported or called.
def _np_scalar(dtype, data=None):
    dtype = np.dtype(dtype.spec if isinstance(dtype, _DtypeBox) else dtype)
    if data is None:
        return dtype.type(0)
    if isinstance(data, str):  # pickles written by Python 2 era numpy
        data = data.encode("latin1")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


class _NpDtype:
    """`numpy.dtype(spec, align, copy)` followed by BUILD with the dtype's state."""

    def __new__(cls, spec="f8", align=False, copy=False):
        if not isinstance(spec, str) or len(spec) > 8:
            raise CheckpointError(f"unexpected numpy dtype spec {spec!r}")
        return _DtypeBox(spec)


class _DtypeBox:
    def __init__(self, spec: str):
        self.spec = spec

    def __setstate__(self, state):
        # state[1] is the byte order ('<', '>', '|' or '=')
        if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>|=":
            self.spec = state[1] + self.spec.lstrip("<>|=") if state[1] != "|" else self.spec

    def __repr__(self):
        return f"dtype({self.spec!r})"


class _InertList(list):
    """fastcore's `L` and similar list-like containers, as a plain list."""

    def __setstate__(self, state):
        items = state.get("items") if isinstance(state, dict) else None
        if items is not None:
            self[:] = list(items)


class _InertDict(dict):
    """Lightning's `AttributeDict` and other dict subclasses, as a plain dict."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


def _inert_path(*parts):
    return "/".join(str(p) for p in parts)


_STAND_INS = [
    (_np_scalar, "numpy.core.multiarray.scalar"),
    (_np_scalar, "numpy._core.multiarray.scalar"),
    (_NpDtype, "numpy.dtype"),
    _DtypeBox,
    (_InertList, "fastcore.foundation.L"),
    (_InertDict, "lightning.fabric.utilities.data.AttributeDict"),
    (_InertDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (_InertDict, "lightning_fabric.utilities.data.AttributeDict"),
    (_inert_path, "pathlib.PosixPath"),
    (_inert_path, "pathlib.WindowsPath"),
    (_inert_path, "pathlib.Path"),
]
for _name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType", "Float16DType"):
    _STAND_INS.append((_NpDtype, f"numpy.dtypes.{_name}"))


# --------------------------------------------------------------------------- loading
def _torch_load(path: Path):
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "GLOBAL" in msg:
            culprit = msg.split("GLOBAL", 1)[1].split()[0]
            raise CheckpointError(
                f"{path}: refused — the file names {culprit}, which would run code when unpickled; "
                "freezeframe only loads tensors and plain data (save a state_dict or safetensors instead)") from None
        detail = next((ln for ln in msg.splitlines() if "WeightsUnpickler" not in ln and ln.strip()
                       and "weights_only" not in ln and "Please file" not in ln), msg)
        if "Unsupported operand" in detail:  # an opcode no saved checkpoint holds: damage, not objects
            raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt "
                                  f"(the pickle stream is broken: {_first_line(detail)})") from None
        raise CheckpointError(f"{path}: refused — it holds objects other than tensors and plain data "
                              f"({_first_line(detail)})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {_first_line(str(e))})") from None


def _first_line(s: str) -> str:
    return s.strip().splitlines()[0][:200] if s.strip() else "no detail"


# Formats that are not checkpoints but are often passed by mistake, by their first bytes.
_MAGIC = [(b"\x93NUMPY", "a NumPy .npy array file"), (b"\x89HDF\r\n\x1a\n", "an HDF5 file (e.g. Keras .h5)"),
          (b"\x1f\x8b", "a gzip-compressed file"), (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"%PDF", "a PDF document")]
_SNIFF = 1 << 16
_JSON_MAX = 64 << 20


def _not_a_torch_file(path: Path) -> str | None:
    """What the file is, when it is clearly not a PyTorch save (a zip archive, or a pickle stream
    of protocol 2 to 5); None when torch should try it. Never executes anything."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    if head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(head, final=len(head) < _SNIFF)
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\n\r\f\ufeff" for c in text):
        if text.lstrip("\ufeff \t\r\n")[:1] in ("{", "[") and path.stat().st_size <= _JSON_MAX:
            try:
                json.loads(path.read_text(encoding="utf-8-sig"))
                return "a JSON file"
            except (ValueError, RecursionError, UnicodeDecodeError):
                pass
        return "a text file"
    return f"an unknown binary format (first bytes {head[:8].hex(' ')})"


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _tensors_of(obj) -> dict | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj) and \
            any(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return None


def _strip_prefixes(sd: dict) -> dict:
    """`module.` (DDP) when every key has it; `_orig_mod.` (torch.compile) anywhere."""
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {".".join(p for p in k.split(".") if p != "_orig_mod"): v for k, v in sd.items()}


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    """{normalised name: CPU tensor} from any supported checkpoint file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(str(e))})") from None
    else:
        what = _not_a_torch_file(path)
        if what is not None:
            raise CheckpointError(f"{path}: not a checkpoint, it is {what} (expected a PyTorch state_dict, "
                                  "a fastai or Lightning checkpoint, or a safetensors file)")
        obj = _torch_load(path)
        sd = None
        if isinstance(obj, dict):
            for key in ("model", "state_dict", "model_state_dict", "module"):  # fastai, Lightning, common
                sd = _tensors_of(obj.get(key))
                if sd:
                    break
        sd = sd or _tensors_of(obj)
        if sd is None and isinstance(obj, torch.nn.Module):  # cannot happen with weights_only, kept explicit
            sd = obj.state_dict()
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors (expected a state_dict, a fastai or Lightning "
                              "checkpoint, or a safetensors file)")
    return _strip_prefixes(sd)
