"""Roofline: the bytes an op must move ÷ the memory bandwidth a plain copy reaches in the same run.

The bandwidth is measured, not looked up: ``dst.copy_(src)`` of a tensor of the case's own size,
counting read + write, timed *inside* each case's paired rounds (so load changes on a shared
machine hit the copy and the contenders alike), with the thread count the ops get. A run-wide
256 MB copy is reported too, for the record.

Minimal bytes, in units of one activation tensor (``numel × element size``). BatchNorm's
statistics need every sample before the first output, so a kernel either reads ``x`` twice or
keeps what it read in cache until it writes. That is possible when one channel's values are
contiguous runs — NCHW with spatial size > 1: a channel of the 64×64×56×56 reference tensor is
800 KB, and normkit's NCHW kernels go channel by channel, rereading it from cache. In
channels_last (and BatchNorm1d's ``(N, C)``) a channel is strided across the whole tensor, and
keeping blocks of 16–64 channels in cache ran 1.3–3.5x slower than reading twice (tried:
strided short rows), so there the second read counts:

| op                            | NCHW fwd | NCHW bwd | CL fwd | CL bwd | eval |
|-------------------------------|----------|----------|--------|--------|------|
| BatchNorm (and BN+ReLU)       | 2        | 3        | 3      | 5      | 2    |
| BN+add+ReLU (residual)        | 3        | 5        | 4      | 8      | 3    |
| GroupNorm, InstanceNorm, LN, RMS | 2     | 3        | 2      | 3      | 2    |

BatchNorm fwd: x (twice in CL), y written; bwd: x and dy (twice in CL), dx written. The residual
adds its read to each pass, and bwd writes dresidual. A GroupNorm group or a LayerNorm row fits
in cache: x once, y once; bwd x, dy, dx.

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


def tensor_units(family: str, mode: str, residual: bool, channel_runs: bool = False) -> int:
    """How many activation-sized tensors ``mode`` must move at least (see the module table).

    ``channel_runs``: each channel is stored as contiguous runs (NCHW with spatial size > 1), so a
    BatchNorm kernel can keep a channel in cache between its two passes.
    """
    if family == "bn":
        if channel_runs:
            fwd, bwd, ev = (3, 5, 3) if residual else (2, 3, 2)
        else:
            fwd, bwd, ev = (4, 8, 3) if residual else (3, 5, 2)
    else:
        fwd, bwd, ev = 2, 3, 2
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd, "eval": ev}[mode]
