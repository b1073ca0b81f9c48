"""Shared helpers: interleaved timing (so background load hits both sides alike) and BENCH lines."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(candidates: dict[str, Callable[[], None]], repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, run round-robin ``repeat`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(name: str, value: float, goal: str = "") -> None:
    print(f"BENCH {name} {value:.3f}" + (f"    (goal {goal})" if goal else ""), flush=True)
