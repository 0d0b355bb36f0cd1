"""Batch normalization with statistics computed *outside* the op: the building block of the layers
whose statistics are not simply "this batch on this process" (SyncBatchNorm, BatchRenorm).

Two pieces, both on the backend's channel entry points (:mod:`normkit.backends`, DESIGN.md §1):

``local_stats(x, for_merge) -> (count, mean, var)``
    the mergeable per-channel triple of ``x`` (``m2 = var·count``), through ``channel_stats``;
    an empty ``x`` gives ``(0, 0, 0)`` without calling a kernel (a rank with no samples still
    takes part in a cross-rank merge). For a merge, a large float32 mean is refined to float64.

``normalize_with_stats(x, weight, bias, residual, mean, rstd, count, act, group)``
    ``y = act(weight·(x − mean)·rstd + bias + residual)`` through ``channel_apply``, where
    ``mean``/``rstd`` are the batch statistics of a set of ``count`` values per channel that
    contains ``x`` (``x`` itself, or the union of every rank's ``x``). The backward treats
    ``mean``/``rstd`` as functions of that set, which gives BatchNorm's gradient

        dz = dy·act'(z)
        dx = weight·rstd·(dz − Σdz/count − x̂·Σ(dz·x̂)/count)
        dweight = Σ_local dz·x̂,   dbias = Σ_local dz,   dresidual = dz

    with the two sums over the whole set: computed locally by ``channel_backward_reduce`` and,
    when ``group`` is given, added over the ranks of ``group`` (:func:`normkit.distributed.
    all_reduce_sums`) before ``channel_backward_dx`` forms ``dx``. ``dweight``/``dbias`` stay
    local: summed over ranks (what DistributedDataParallel does) they are the gradients of the
    whole batch. ``weight``/``bias`` may be any differentiable tensors (BatchRenorm passes
    ``γ·r`` and ``β + γ·d``) and autograd carries their gradients on to the parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from ._layout import memory_format_of
from .backends import scale_shift
from .ops import _as_layout, _dense
from .reference import stat_dtype

__all__ = ["local_stats", "normalize_with_stats"]


def local_stats(x: Tensor, for_merge: bool = False) -> tuple[int, Tensor, Tensor]:
    """``(count, mean, var)`` per channel of ``x`` ``(N, C, *)``: biased variance, stat dtype.

    ``for_merge=True`` (statistics that will be merged across ranks): for float16/bfloat16/float32
    input whose mean is large against its spread (``|μ| > 16σ`` in some channel), the mean is
    refined to float64 by a second ``channel_stats`` pass over ``x − μ``: ``μ = μ₃₂ + mean(x − μ₃₂)``,
    ``σ² = var(x − μ₃₂)``. Why: a float32 mean is rounded by up to ``|μ|·2⁻²⁴``, and the merge's
    ``n_r·(μ_r − μ)²`` term turns that rounding into a variance error of order
    ``|μ|·2⁻²⁴·|μ_r − μ|/σ²`` (1e-5 relative at ``1e4 + randn``) that a single process never has.
    The returned mean is then float64; otherwise it is in stat dtype.
    """
    c = x.shape[1]
    count = x.numel() // c if c else 0
    if count == 0:
        zeros = x.new_zeros(c, dtype=stat_dtype(x.dtype))
        return 0, zeros, zeros.clone()
    x = _dense(x.detach())
    mean, var = backends.resolve("channel_stats", x).channel_stats(x)
    if for_merge and mean.dtype != torch.float64 and bool((mean.abs() > 16 * var.sqrt()).any()):
        shifted = x.to(mean.dtype) - mean.reshape((1, c) + (1,) * (x.dim() - 2))  # keeps x's layout
        residual_mean, var = backends.resolve("channel_stats", shifted).channel_stats(shifted)
        mean = mean.to(torch.float64) + residual_mean.to(torch.float64)
    return count, mean, var


class _NormalizeWithStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean, rstd, count, act, group, sync):
        x = _dense(x)
        residual = _as_layout(residual, x)
        scale, shift = scale_shift(weight, bias, mean, rstd)
        if x.numel() == 0:
            y = torch.empty_like(x, memory_format=memory_format_of(x))
        else:
            y = backends.resolve("channel_apply", x).channel_apply(x, scale, shift, residual, act)
        ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
        ctx.count, ctx.act, ctx.group, ctx.sync = count, act, group, sync
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, residual, mean, rstd = ctx.saved_tensors
        dy = _as_layout(dy, x)
        scale, shift = scale_shift(weight, bias, mean, rstd)
        if x.numel() == 0:
            sum_dz, sum_dz_xhat = torch.zeros_like(mean), torch.zeros_like(mean)
        else:
            sum_dz, sum_dz_xhat = backends.resolve("channel_backward_reduce", x).channel_backward_reduce(
                x, dy, mean, rstd, scale, shift, residual, ctx.act
            )
        total_dz, total_dz_xhat = sum_dz, sum_dz_xhat
        if ctx.sync:
            # Every rank must issue this collective, including a rank with an empty batch.
            from .distributed import all_reduce_sums

            total_dz, total_dz_xhat = all_reduce_sums(sum_dz, sum_dz_xhat, ctx.group)
        need = ctx.needs_input_grad
        need_res = residual is not None and need[3]
        dx = dres = None
        if x.numel() == 0:
            dx = torch.empty_like(x, memory_format=memory_format_of(x))
            dres = dx.clone() if need_res else None
        elif need[0] or need_res:
            count = max(ctx.count, 1)
            dx, dres = backends.resolve("channel_backward_dx", x).channel_backward_dx(
                x,
                dy,
                mean,
                rstd,
                scale,
                shift,
                residual,
                ctx.act,
                total_dz / count,
                total_dz_xhat / count,
                need_res,
            )
        dweight = sum_dz_xhat.to(weight.dtype) if weight is not None and need[1] else None
        dbias = sum_dz.to(bias.dtype) if bias is not None and need[2] else None
        return (dx if need[0] else None), dweight, dbias, dres, None, None, None, None, None, None


def normalize_with_stats(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    count: int,
    act: str = "",
    group=None,
    sync: bool = False,
) -> Tensor:
    """BatchNorm's apply with given batch statistics and BatchNorm's backward (module docstring).

    Args:
        x: ``(N, C, *)``, contiguous or channels_last (the output keeps the layout).
        weight, bias: ``(C,)`` or ``None``; differentiable.
        mean, rstd: ``(C,)`` batch statistics in stat dtype (no gradient flows into them: their
            dependence on ``x`` is built into the backward).
        count: values per channel the statistics were computed over (all ranks together).
        sync: all-reduce the backward sums over ``group`` (``None`` = the default group).
    """
    return _NormalizeWithStats.apply(x, weight, bias, residual, mean, rstd, count, act, group, sync)
