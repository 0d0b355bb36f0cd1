"""Roofline: the bytes an op must move ÷ the memory bandwidth a plain copy reaches in the same run.

The bandwidth is measured, not looked up: ``dst.copy_(src)`` of a tensor of the case's own size,
counting read + write, timed *inside* each case's paired rounds (so load changes on a shared
machine hit the copy and the contenders alike), with the thread count the ops get. A run-wide
256 MB copy is reported too, for the record.

Minimal bytes, in units of one activation tensor (``numel × element size``), and what is
counted (a kernel cannot do less without keeping a whole tensor in cache, which at the
reference shapes — 51 MB for BatchNorm2d — it cannot):

| op                            | fwd | bwd | eval |
|-------------------------------|-----|-----|------|
| BatchNorm (and BN+ReLU)       | 3   | 5   | 2    |
| BN+add+ReLU (residual)        | 4   | 8   | 3    |
| GroupNorm, InstanceNorm, LN, RMS | 2 | 3   | 2    |

BatchNorm fwd: x for the statistics, x again for y, y written; bwd: x and dy for the two
sums, x and dy again for dx, dx written. The residual adds its read to each pass, and bwd
writes dresidual. A GroupNorm group or a LayerNorm row fits in cache: x once, y once; bwd x,
dy, dx.

``fwd+bwd`` is the sum of the two. Parameters and statistics (O(C)) are not counted.
"""

from __future__ import annotations

import statistics

import torch

from .timing import Clock


def copy_bandwidth(device: str, nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) on ``device``."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    clock = Clock(device)
    dst.copy_(src)
    times = [clock.time(lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * n * 4 / statistics.median(times)


def copy_step(shape, dtype: str, device: str, clock: Clock):
    """A paired-timing step copying one activation-sized tensor: the per-case roofline reference."""
    from .cases import DTYPES

    src = torch.rand(shape, device=device).to(DTYPES[dtype])
    dst = torch.empty_like(src)
    return lambda: clock.time(lambda: dst.copy_(src))


def tensor_units(family: str, mode: str, residual: bool) -> int:
    """How many activation-sized tensors ``mode`` must move at least (see the module table)."""
    if family == "bn":
        fwd, bwd, ev = (4, 8, 3) if residual else (3, 5, 2)
    else:
        fwd, bwd, ev = 2, 3, 2
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd, "eval": ev}[mode]
