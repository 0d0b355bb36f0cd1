"""Cross-rank statistics for SyncBatchNorm, on torch.distributed (gloo on CPU, NCCL on CUDA).

Forward: every rank holds the per-channel triple ``(n_r, μ_r, M2_r = n_r·σ²_r)`` of its own
batch. :func:`merge_stats` all-gathers the triples and merges them with the pairwise-exact
formula of Chan, Golub & LeVeque (1979), in its many-way form::

    N  = Σ_r n_r
    μ  = Σ_r n_r·μ_r / N
    M2 = Σ_r (M2_r + n_r·(μ_r − μ)²)            σ² = M2 / N   (biased)

This is an identity (not an approximation) for the sum of squared deviations from the global
mean, and it never forms E[x²] − E[x]²: the terms are deviations from the mean, so a large mean
(``1e4 + randn``) costs no precision.

Why all_gather and not all_reduce
    The payload is tiny (``1 + 2C`` numbers per rank). Gathering it in **float64** and merging
    in float64, in rank order, on every rank gives (a) counts exact up to 2**53, (b) the merge
    above without the cancellation an all-reduced Σx² would suffer, and (c) bit-identical
    statistics on every rank whatever order the backend reduces in — so every rank makes the
    same decision (e.g. "global count is 1: refuse") and normalizes with the same numbers. The
    backward sums are gathered and added the same way (:func:`all_reduce_sums`).

The merge is only as exact as each rank's mean: a float32 mean far from zero is rounded, so
SyncBatchNorm sends a float64-refined mean for such channels (:func:`normkit.channel.local_stats`).

An empty rank contributes ``n_r = 0`` (and zeros, never NaN); it issues the same collectives
as the others, so nothing hangs. Every rank of ``group`` must call these functions in the same
order (as every rank runs the same model).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_active", "world_size", "merge_stats", "all_reduce_sums"]


def is_active(group=None) -> bool:
    """True when torch.distributed is initialised and ``group`` has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _gather_rows(row: Tensor, group) -> Tensor:
    """``(world_size, len(row))``: every rank's ``row``, in rank order."""
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row.contiguous(), group=group)
    return torch.stack(rows)


def merge_stats(count: int, mean: Tensor, var: Tensor, group=None) -> tuple[int, Tensor, Tensor]:
    """Merge each rank's ``(count, mean (C,), biased var (C,))`` into the statistics of all ranks.

    Returns ``(N, μ, σ²)`` with ``N`` the total count (a Python int, the same on every rank) and
    ``μ``, ``σ²`` in ``mean``'s dtype (computed in float64).
    """
    c = mean.numel()
    row = torch.empty(1 + 2 * c, dtype=torch.float64, device=mean.device)
    row[0] = float(count)
    row[1 : 1 + c] = mean.to(torch.float64) if count else 0.0
    row[1 + c :] = var.to(torch.float64) * count if count else 0.0
    table = _gather_rows(row, group)
    counts, means, m2s = table[:, :1], table[:, 1 : 1 + c], table[:, 1 + c :]
    total = int(counts.sum().item())
    if total == 0:
        return 0, torch.zeros_like(mean), torch.zeros_like(var)
    mu = (counts * means).sum(dim=0) / total
    m2 = (m2s + counts * (means - mu).square()).sum(dim=0)
    return total, mu.to(mean.dtype), (m2 / total).to(var.dtype)


def all_reduce_sums(sum_dz: Tensor, sum_dz_xhat: Tensor, group=None) -> tuple[Tensor, Tensor]:
    """``(Σ_ranks sum_dz, Σ_ranks sum_dz_xhat)``: the backward's two per-channel sums over all ranks.

    Gathered in float64 and added in rank order, so every rank gets the same bits.
    """
    c = sum_dz.numel()
    row = torch.cat([sum_dz.to(torch.float64), sum_dz_xhat.to(torch.float64)])
    total = _gather_rows(row, group).sum(dim=0)
    return total[:c].to(sum_dz.dtype), total[c:].to(sum_dz_xhat.dtype)
