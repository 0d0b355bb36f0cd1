"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, "Train longer, generalize better: closing
the generalization gap in large batch training of neural networks", NeurIPS 2017).

In training, the batch is cut along dim 0 into *virtual batches* of ``virtual_batch_size``
samples (the last one may be smaller) and each is normalized with its own statistics:

    x = [x_1; x_2; …; x_k],   y_j = γ·(x_j − μ_{B_j})/sqrt(σ²_{B_j} + ε) + β

which keeps the regularising noise of small-batch statistics while the optimizer sees a large
batch. Each virtual batch is one BatchNorm training step on the usual kernels (one
``batch_norm_train`` op per virtual batch): the running statistics move once per virtual
batch, in order, and ``num_batches_tracked`` counts virtual batches (so ``momentum=None`` is
the cumulative average over virtual batches). Eval mode is BatchNorm (running statistics).

A virtual batch with a single value per channel (e.g. ``(N, C)`` input with
``N % virtual_batch_size == 1``) has no statistics: the batch is refused before any state
changes. Parameters, buffers and ``state_dict`` are BatchNorm's; the default
``virtual_batch_size=128`` is the ghost batch size of the paper's experiments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from .batchnorm import _BatchNormForward

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d"]


class _GhostBatchNorm(_BatchNormForward, _BatchNorm):
    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 128,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size <= 0
        ):
            raise F.fail(
                type(self).__name__, "virtual_batch_size", "a positive int", repr(virtual_batch_size)
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, virtual_batch_size={self.virtual_batch_size}, "
            + super().extra_repr().split(", ", 1)[1]
        )

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return self._normalize(input)
        where = type(self).__name__
        # the one-value rule is checked below, per virtual batch
        F.check_batch_norm(where, input, self.running_mean, self.running_var, self.weight, self.bias, True,
                           eps=self.eps, num_features=self.num_features, accepted_dims=self._accepted_dims,
                           count_rule=False)
        n, vbs = input.shape[0], self.virtual_batch_size
        last = n - (math.ceil(n / vbs) - 1) * vbs if n else 0
        if last * math.prod(input.shape[2:]) == 1:
            raise F.fail(
                where,
                "input",
                f"more than 1 value per channel in every virtual batch (virtual_batch_size={vbs}; the last "
                f"virtual batch has {last} sample of 1 value)",
                f"input of shape {tuple(input.shape)}",
            )
        update = self.track_running_stats
        outs = []
        for chunk in input.split(vbs, dim=0) if n else (input,):
            outs.append(
                F.batch_norm_checked(chunk, None, None, self.weight, self.bias, True, self.eps,
                                     on_stats=self._update_running_stats if update else None)
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost Batch Normalization over ``(N, C)`` or ``(N, C, L)`` input (module docstring)."""

    _accepted_dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost Batch Normalization over ``(N, C, H, W)`` input (module docstring)."""

    _accepted_dims = (4,)
