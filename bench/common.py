"""Shared helpers for the benchmarks: timing, percentiles and the side-by-side table."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Iterator


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t: ...` then `t[0]` is the elapsed seconds."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "n/a"
    if unit == "ms":
        return f"{value * 1000:.1f} ms"
    if unit == "MB/s":
        return f"{value:.1f} MB/s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:.3g} {unit}"


def print_table(title: str, rows: list[tuple[str, float, float, str]], ours: str, baseline: str,
                higher_is_better: set[str] | None = None) -> None:
    """Prints `figure | ours | baseline | ratio` rows; ratio = ours / baseline."""
    higher_is_better = higher_is_better or set()
    print(f"\n== {title} ==")
    head = f"{'figure':<44} {ours:>16} {baseline:>16} {'ratio':>8}"
    print(head)
    print("-" * len(head))
    for name, a, b, unit in rows:
        ratio = a / b if b and b == b and a == a else float("nan")
        r = "n/a" if ratio != ratio else f"{ratio:.2f}x"
        print(f"{name:<44} {fmt(a, unit):>16} {fmt(b, unit):>16} {r:>8}")
