"""Paired timing: the contenders of one benchmark run interleaved (A B C A B C ...).

Interleaving makes slow drifts of a shared machine (other processes, frequency, thermal) hit
every contender alike, so the *ratio of medians* is stable even when absolute times are not.
Each contender is a *step*: a zero-argument callable that does its own untimed set-up and
returns the seconds of the part being measured (so "bwd" can build its graph untimed).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

Step = Callable[[], float]


class Clock:
    """Wall time on the CPU; CUDA events (synchronised) on a GPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds ``fn()`` takes, device work included."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def paired(steps: dict[str, Step], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run each step ``warmup`` times (JIT compilation, caches), then ``rounds`` interleaved rounds."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(step())
    return times


def summary(ts: list[float]) -> dict[str, float]:
    """Median and spread (min, quartiles, max) in milliseconds."""
    ms = sorted(t * 1e3 for t in ts)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "p25_ms": q[0], "p75_ms": q[2],
            "max_ms": ms[-1]}
