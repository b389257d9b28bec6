"""The overhead benchmark's results files: which cases `--only` selects, the last saved run, and the
merge of freshly measured rows into it (a re-measure of some rows keeps the others, each with the
date it was measured)."""

from __future__ import annotations

import json
import re
from pathlib import Path


def key(r: dict) -> tuple[str, str]:
    return r["workload"], r["instrument"]


def selects(only: str, workload: str, instrument: str) -> bool:
    """`--only`: case-insensitive substrings of 'workload / instrument' separated by commas with no
    space after them (the names themselves hold ", "); a case is selected when any of them
    matches (an empty filter selects every case)."""
    parts = [p.strip().lower() for p in re.split(r",(?! )", only) if p.strip()]
    name = f"{workload} / {instrument}".lower()
    return not parts or any(p in name for p in parts)


def latest(results_dir: Path) -> Path | None:
    """The newest `overhead-<date>.json` of `results_dir` (ISO dates sort by name), or None."""
    files = sorted(results_dir.glob("overhead-*.json"))
    return files[-1] if files else None


def dated(results: list[dict], day: str) -> list[dict]:
    """The rows, each with its `measured` date (`day` where a row has none yet)."""
    return [{**r, "measured": r.get("measured") or day} for r in results]


def merge(previous: dict, results: list[dict], skipped: list[dict], only: str) -> tuple[list[dict], list[dict]]:
    """The rows and skipped cases of `previous` (a saved results file) with every case `only`
    selects replaced by this run's `results` and `skipped`, in the saved order (new cases last).
    A saved row without a `measured` date gets its file's date."""
    day = str(previous.get("meta", {}).get("date", ""))[:10] or None
    fresh = {key(r): r for r in results}
    out: list[dict] = []
    for r in dated(previous.get("results", []), day):
        if not selects(only, *key(r)):
            out.append(r)
        elif key(r) in fresh:
            out.append(fresh.pop(key(r)))
    out += [r for r in results if key(r) in fresh]
    kept_skips = [s for s in previous.get("meta", {}).get("skipped", [])
                  if not selects(only, s["workload"], s["instrument"])]
    return out, kept_skips + skipped


def load(path: Path) -> dict:
    return json.loads(path.read_text())
