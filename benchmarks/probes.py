"""Memory and disk probes of the overhead benchmark: process RSS, malloc heap, peak RSS over a
window, and the bytes of a closed run directory."""

from __future__ import annotations

import gc
from pathlib import Path

def rss_bytes() -> int:
    """Resident set size of this process (psutil when installed, else /proc/self/status)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return _status_kib("VmRSS") * 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


class Heap:
    """Memory probes that do not depend on what the allocator keeps cached: `trim()` hands free heap
    pages back to the kernel (glibc malloc_trim), `in_use()` is the bytes malloc has handed out and
    not got back (glibc mallinfo2: uordblks + hblkhd), and the peak RSS over a window comes from
    the kernel's high-water mark, reset with `echo 5 > /proc/self/clear_refs`. Each probe is None
    where the platform lacks it."""

    def __init__(self):
        import ctypes

        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.malloc_trim(0)
        except (OSError, AttributeError):
            self._libc = None
        try:
            class _Mallinfo2(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                           "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
            self._mallinfo2 = self._libc.mallinfo2
            self._mallinfo2.restype = _Mallinfo2
        except AttributeError:
            self._mallinfo2 = None
        try:
            self.reset_peak()
            _status_kib("VmHWM")
            self.peak_ok = True
        except (OSError, RuntimeError):
            self.peak_ok = False

    def trim(self) -> None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)

    def in_use(self) -> int | None:
        if self._mallinfo2 is None:
            return None
        m = self._mallinfo2()
        return int(m.uordblks + m.hblkhd)

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def window_peak(self, fn) -> int | None:
        """Peak RSS above the (trimmed) starting RSS while `fn()` runs."""
        if not self.peak_ok:
            fn()
            return None
        self.trim()
        base = rss_bytes()
        self.reset_peak()
        fn()
        return _status_kib("VmHWM") * 1024 - base


def run_dir_bytes(run_dir: Path) -> dict:
    """Sizes of a closed run directory and its tensor-row count."""
    import pyarrow.parquet as pq

    sizes = {"reference": 0, "manifest": 0, "steps": 0, "tensors": 0, "scalars": 0, "other": 0}
    rows = 0
    recorded_steps = set()
    for f in run_dir.rglob("*"):
        if not f.is_file():
            continue
        key = f.parent.name if f.parent != run_dir else {"reference.safetensors": "reference",
                                                         "manifest.json": "manifest"}.get(f.name, "other")
        sizes[key if key in sizes else "other"] += f.stat().st_size
        if f.parent.name == "tensors" and f.suffix == ".parquet" and not f.name.startswith("."):
            t = pq.read_table(f, columns=["step"])
            rows += t.num_rows
            recorded_steps.update(t.column("step").to_pylist())
    log_bytes = sizes["steps"] + sizes["tensors"] + sizes["scalars"] + sizes["manifest"]
    return {
        "sizes": sizes, "tensor_rows": rows, "recorded_steps": len(recorded_steps),
        "tensors_per_recorded_step": rows / max(len(recorded_steps), 1),
        "bytes_per_tensor_step": sizes["tensors"] / rows if rows else None,
        "log_bytes_per_tensor_step": log_bytes / rows if rows else None,
    }

