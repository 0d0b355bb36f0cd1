"""Masked statistics for padded sequences: ``BatchNorm1d(input, mask)`` and ``LayerNorm(input, mask)``.

``mask`` is a bool tensor, True = real position, False = padding:

* BatchNorm1d: input ``(N, C, L)``, mask ``(N, L)``. Per channel, the statistics are those of the
  real positions only, ``count_c = Σ mask`` (= M)::

      μ = 1/M Σ_{mask} x,   σ² = 1/M Σ_{mask} (x − μ)²,   y = γ·(x − μ)/sqrt(σ² + ε) + β

  and the running statistics move with them (unbiased ``σ²·M/(M−1)``), once per call. Eval
  normalizes the real positions with the running statistics.
* LayerNorm: input ``(*batch, *normalized_shape)``, mask ``batch``-shaped (e.g. ``(N, L)`` for
  ``(N, L, D)``). LayerNorm's statistics are per position, so padding never entered another
  position's statistics; the mask decides which positions are computed at all.

Padded positions get **output 0** and **gradient 0** (for the input; they add nothing to the
weight and bias gradients). Zero output is chosen over passing the input through so that padding
carries no signal onward (a following masked sum / mean / attention sees exact zeros).

How: the real positions are gathered into a dense ``(M, C)`` (BatchNorm) or ``(M, *shape)``
(LayerNorm) tensor, normalized by the usual layer on the usual kernels (``channel_stats`` is
two-pass, so the statistics stay exact for large means; the backward is BatchNorm's with count
M), and scattered back into zeros. The gather and scatter are plain indexing, so autograd routes
the gradient of each real position back to it and none to padding. Cost: one copy of the real
positions each way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as C

__all__ = ["check_mask", "masked_batch_norm1d", "masked_layer_norm"]


def check_mask(where: str, mask: Tensor, shape: tuple[int, ...], device: torch.device, layout: str) -> None:
    """``mask`` must be a bool tensor of ``shape`` on ``device`` (else NormInputError naming it)."""
    if not isinstance(mask, torch.Tensor):
        raise C.fail(where, "mask", "a torch.Tensor of dtype torch.bool", type(mask).__name__)
    if mask.dtype != torch.bool:
        raise C.fail(
            where, "mask", "dtype torch.bool (True = real position, False = padding)", str(mask.dtype)
        )
    if tuple(mask.shape) != tuple(shape):
        raise C.fail(where, "mask", f"shape {tuple(shape)} {layout}", C.shape_str(mask))
    if mask.device != device:
        raise C.fail(where, "mask", f"a tensor on the input's device {device}", str(mask.device))


def masked_batch_norm1d(layer, input: Tensor, mask: Tensor, forward) -> Tensor:
    """``forward(layer, rows)`` (the BatchNorm layer's forward) over the real positions of ``input`` ``(N, C, L)``."""
    where = type(layer).__name__
    C.check_tensor(where, "input", input)
    if input.dim() != 3:
        raise C.fail(
            where,
            "input",
            "3D input (N, C, L) when a mask is given",
            f"{input.dim()}D input of {C.shape_str(input)}",
        )
    C.check_channels(where, input, layer.num_features)
    n, c, length = input.shape
    check_mask(where, mask, (n, length), input.device, "(N, L) for input (N, C, L)")
    picked = input.transpose(1, 2)[mask]  # (M, C): the real positions, in (n, l) order
    if layer._use_batch_stats() and picked.shape[0] == 1:
        raise C.fail(
            where,
            "mask",
            "more than 1 real position when training (batch statistics of one value are "
            "undefined; use eval(), GroupNorm, LayerNorm)",
            "a mask with 1 True",
        )
    y = forward(layer, picked)  # checks again, then the one state change (running statistics)
    out = input.new_zeros(n, length, c).index_put((mask,), y)
    return out.transpose(1, 2).contiguous()


def masked_layer_norm(layer, input: Tensor, mask: Tensor, forward) -> Tensor:
    """``forward(rows)`` (the LayerNorm) over the positions of ``input`` where ``mask`` is True."""
    where = type(layer).__name__
    C.check_tensor(where, "input", input)
    k = len(layer.normalized_shape)
    if input.dim() <= k or tuple(input.shape[input.dim() - k :]) != tuple(layer.normalized_shape):
        raise C.fail(
            where,
            "input",
            f"(*batch, {', '.join(map(str, layer.normalized_shape))}) with at least one "
            "batch dimension when a mask is given",
            f"input of {C.shape_str(input)}",
        )
    lead = tuple(input.shape[: input.dim() - k])
    check_mask(where, mask, lead, input.device, "(the input's dimensions before normalized_shape)")
    y = forward(input[mask])
    return input.new_zeros(input.shape).index_put((mask,), y)
