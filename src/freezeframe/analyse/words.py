"""How numbers read in the answers, findings and panels: counts with thousands separators,
plurals, percentages."""

from __future__ import annotations


def number(x: int) -> str:
    return f"{x:,}"


def plural(n: int, word: str) -> str:
    """`1 epoch`, `3 epochs`, `2 training forward passes`, `4 training batches`."""
    return f"{number(n)} {word}{'' if n == 1 else 'es' if word.endswith(('s', 'batch')) else 's'}"


def counted(n: int, word: str) -> str:
    """`1 tensor`, `1,024 tensors` (the word takes an s)."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def pct(x: float) -> str:
    return f"{100 * x:.3g} %"
