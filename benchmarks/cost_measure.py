"""Measurements of the cost-at-scale benchmark: peak RSS, run-directory size, one run in a fresh
process (plain or watched), and freezeframe's content hashing rate.

Peak RSS, as this benchmark defines it: in the child process, after the model, optimizer and
batches are built, the kernel's high-water mark is reset to the current RSS (`/proc/self/clear_refs`
← "5") and that RSS is read (`start`); after the run (for a watched run: `import freezeframe`,
`watch()`, the steps and `close()`) the high-water mark `VmHWM` is read again. The run's peak is
`VmHWM − start`; the peak added by watching is the watched runs' median peak minus the plain
runs' median peak (the plain run's own peak is its activations, gradients and AdamW state).
Where the high-water mark cannot be reset, `start` is still read but the peak may include the
build's own transient peak (the result says `hwm_reset: false`).
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- memory
def memory_status() -> dict[str, int]:
    """{"rss": VmRSS, "hwm": VmHWM} of this process, in bytes (Linux /proc/self/status)."""
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M).group(1)) * 1024
            for key, name in (("rss", "VmRSS"), ("hwm", "VmHWM"))}


def reset_peak() -> bool:
    """Reset this process's high-water mark to its current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Collect garbage and hand free heap pages back (glibc malloc_trim), so `start` is not inflated."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- disk
def du_bytes(path: Path) -> dict[str, int]:
    """What coreutils `du` counts for a directory tree, directories included: {"allocated": the
    st_blocks × 512 sum (`du -sB1`), "apparent": the st_size sum (`du -sb`), "files": regular
    files}. A hard-linked file is counted once, as du does."""
    allocated = apparent = files = 0
    seen = set()
    for root, _dirs, names in os.walk(path):
        for entry in (root, *(os.path.join(root, n) for n in names)):
            st = os.lstat(entry)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            allocated += st.st_blocks * 512
            apparent += st.st_size
            files += entry != root
    return {"allocated": allocated, "apparent": apparent, "files": files}


def largest_files(path: Path, n: int = 3) -> list[tuple[str, int]]:
    """The n largest files under `path` (relative name, bytes), largest first."""
    sizes = [(str(p.relative_to(path)), p.stat().st_size) for p in Path(path).rglob("*") if p.is_file()]
    return sorted(sizes, key=lambda x: -x[1])[:n]


# --------------------------------------------------------------------------- one run, in this (child) process
def run_child(case, mode: str) -> dict:
    """Build `case` (a cost_workloads.Case), run its steps "plain" or "watched", return the figures.
    Called in a fresh process (the high-water mark is this process's own)."""
    import torch

    from cost_workloads import tensor_bytes, trainable_bytes

    if mode not in ("plain", "watched"):
        raise ValueError(f"mode must be 'plain' or 'watched', got {mode!r}")
    key = case.key
    built = case.build()
    model, opt = built.model, built.optimizer
    params, buffers, count = tensor_bytes(model)
    trainable = trainable_bytes(model)
    out = {"case": key, "label": case.label, "mode": mode, "shape": built.shape, "steps": case.steps, "param_bytes": params,
           "buffer_bytes": buffers, "param_count": count, "trainable_bytes": trainable,
           "torch_threads": torch.get_num_threads()}
    trim()
    out["hwm_reset"] = reset_peak()
    start = memory_status()
    out["rss_start"] = start["rss"]
    workdir = Path(tempfile.mkdtemp(prefix="ff-cost-"))
    run_dir = workdir / "run"
    t0, c0 = time.perf_counter(), time.process_time()
    rec = None
    if mode == "watched":
        import freezeframe

        out["freezeframe_file"] = freezeframe.__file__
        out["freezeframe_version"] = freezeframe.__version__
        from freezeframe.capture import recorder  # noqa: F401 - what watch() imports, measured apart

        out["rss_after_import"] = memory_status()["rss"]
        before = {name.partition(".")[0] for name in sys.modules}
        rec = freezeframe.watch(model, opt, run_dir)
        out["rss_after_watch"] = memory_status()["rss"]
        out["packages_imported_by_watch"] = sorted({name.partition(".")[0] for name in sys.modules} - before
                                                   - {"freezeframe"})
    t1, c1 = time.perf_counter(), time.process_time()
    for i in range(case.steps):
        loss = built.step(model, opt, built.batches[i % len(built.batches)])
    float(loss.detach())
    t2, c2 = time.perf_counter(), time.process_time()
    if rec is not None:
        rec.close()
    t3, c3 = time.perf_counter(), time.process_time()
    end = memory_status()
    out.update(start_s=t1 - t0, steps_s=t2 - t1, close_s=t3 - t2, total_s=t3 - t0,
               steps_cpu_s=c2 - c1, total_cpu_s=c3 - c0,
               rss_end=end["rss"], hwm=end["hwm"], peak=end["hwm"] - start["rss"])
    if rec is not None:
        out["run_dir"] = du_bytes(run_dir)
        out["largest_files"] = largest_files(run_dir)
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    return out


def spawn(args: list[str], timeout: float = 600) -> dict:
    """Run `cost_scale.py --_child ...` in a fresh interpreter; its last stdout line is the JSON."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(HERE / "cost_scale.py"), "--_child", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_case(key: str, reps: int, progress=None) -> dict:
    """`reps` plain and `reps` watched runs of a case, each in a fresh process, alternating
    (plain first on even repetitions, watched first on odd ones); medians of each figure."""
    runs: dict[str, list[dict]] = {"plain": [], "watched": []}
    for rep in range(reps):
        order = ("plain", "watched") if rep % 2 == 0 else ("watched", "plain")
        for mode in order:
            r = spawn([key, mode])
            runs[mode].append(r)
            if progress:
                progress(f"  {key} {mode} #{rep + 1}: peak +{r['peak'] / MiB:.0f} MiB, {r['total_s']:.1f} s")
    return summarise(runs)


def _med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def summarise(runs: dict[str, list[dict]]) -> dict:
    plain, watched = runs["plain"], runs["watched"]
    first = watched[0]
    trainable = first["trainable_bytes"]
    peak_plain, peak_watched = _med(plain, "peak"), _med(watched, "peak")
    disk = statistics.median(r["run_dir"]["allocated"] for r in watched)
    plain_s = _med(plain, "steps_s")
    res = {
        "case": first["case"], "label": first["label"], "shape": first["shape"], "steps": first["steps"], "reps": len(watched),
        "param_bytes": first["param_bytes"], "buffer_bytes": first["buffer_bytes"],
        "param_count": first["param_count"], "trainable_bytes": trainable,
        "hwm_reset": all(r["hwm_reset"] for r in plain + watched),
        "peak_plain": peak_plain, "peak_watched": peak_watched, "peak_added": peak_watched - peak_plain,
        "peak_added_each": [w["peak"] - p["peak"] for p, w in zip(plain, watched)],
        "import_rss": _med(watched, "rss_after_import") - _med(watched, "rss_start"),
        "watch_rss": _med(watched, "rss_after_watch") - _med(watched, "rss_after_import"),
        "disk_allocated": disk,
        "disk_apparent": statistics.median(r["run_dir"]["apparent"] for r in watched),
        "disk_files": first["run_dir"]["files"], "largest_files": first["largest_files"],
        "plain_steps_s": plain_s, "watched_steps_s": _med(watched, "steps_s"),
        "watch_start_s": _med(watched, "start_s"), "close_s": _med(watched, "close_s"),
        "watched_total_s": _med(watched, "total_s"),
        "time_ratio": _med(watched, "total_s") / plain_s,
        "steps_ratio": _med(watched, "steps_s") / plain_s,
        "cpu_ratio": _med(watched, "total_cpu_s") / _med(plain, "steps_cpu_s"),
        "rss_budget": 96 * MiB + 4 * trainable, "disk_budget": 8 * MiB + 2 * trainable,
        "packages_imported_by_watch": first.get("packages_imported_by_watch", []),
        "freezeframe_file": first.get("freezeframe_file"), "freezeframe_version": first.get("freezeframe_version"),
        "runs": runs,
    }
    res["rss_met"] = res["peak_added"] <= res["rss_budget"]
    res["disk_met"] = disk <= res["disk_budget"]
    return res


# --------------------------------------------------------------------------- hashing
def hash_child(total_mib: int, tensor_mib: int, dtype: str, reps: int) -> dict:
    """Time `freezeframe.hashing.content_hashes` over `total_mib` MiB of `tensor_mib`-MiB tensors,
    with 1 thread and with the recorder's default `hash_threads` (capture/session.py), `reps`
    times each (called in a fresh process)."""
    import torch

    from freezeframe.capture.session import Options
    from freezeframe.hashing import content_hashes

    dt = getattr(torch, dtype)
    per = tensor_mib * MiB // torch.empty(0, dtype=dt).element_size()
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(per, generator=g).to(dt) for _ in range(total_mib // tensor_mib)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    default_threads = Options().hash_threads
    out = {"bytes": nbytes, "tensors": len(tensors), "dtype": dtype, "default_threads": default_threads,
           "by_threads": {}}
    for threads in sorted({1, default_threads}):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            content_hashes(tensors, threads=threads)
            times.append(time.perf_counter() - t)
        best = min(times)
        out["by_threads"][str(threads)] = {"times_s": times, "best_s": best, "median_s": statistics.median(times),
                                           "mb_per_s": nbytes / 1e6 / best, "s_per_gb": best / (nbytes / 1e9)}
    return out


def measure_hashing(total_mib: int, reps: int) -> dict:
    """Hashing rate in a fresh process (~`total_mib` MiB of fp16 tensors of 16 MiB each); the
    boundary cost it implies for a 7B-parameter model in fp16 (14 GB)."""
    r = spawn(["hash", str(total_mib), "16", "float16", str(reps)])
    default = r["by_threads"][str(r["default_threads"])]
    r["boundary_7b_fp16_s"] = 14e9 / 1e6 / default["mb_per_s"]
    return r
