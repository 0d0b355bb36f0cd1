"""Frozen Batch Normalization: BatchNorm with fixed statistics and affine, as in torchvision.

    y = act(weight·(x − running_mean)/sqrt(running_var + ε) + bias + residual)

in training and eval alike, computed by the ``batch_norm_infer`` op (one ``channel_apply`` with
``scale = weight/sqrt(running_var + ε)``, ``shift = bias − running_mean·scale``); the input
still gets its gradient, ``dx = scale·dy``. ``weight``, ``bias``, ``running_mean`` and
``running_var`` are *buffers*, not parameters (nothing to train, nothing for an optimizer to
decay), with torchvision's names, so ``torchvision.ops.FrozenBatchNorm2d`` state_dicts load
here and back; a ``num_batches_tracked`` key (from a BatchNorm checkpoint) is dropped on load,
as torchvision does.

Used to fine-tune detection/segmentation backbones with batches too small for batch
statistics. :func:`normkit.freeze` / :func:`normkit.unfreeze` swap whole models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from .scripting import ScriptableFrozenBatchNorm, twin

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]

class FrozenBatchNorm(nn.Module):
    """Frozen BatchNorm over any ``(N, C, *)`` input (module docstring).

    ``act`` (``""``, ``"relu"``, ``"silu"``, ``"gelu"``) is fused into the apply; it is set by
    :func:`normkit.freeze` when it freezes a fused norm + activation layer.
    """

    _accepted_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.act = ""
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __prepare_scriptable__(self) -> nn.Module:
        return twin(self, ScriptableFrozenBatchNorm)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        where = type(self).__name__
        F.check_input_dim(where, input, self._accepted_dims)
        # torchvision computes in the buffers' dtype and lets type promotion mix it with the input's;
        # here the buffers are brought to the input's parameter dtype (exact for float64 input)
        pd = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        mean, var, weight, bias = (t.to(pd) for t in (self.running_mean, self.running_var, self.weight, self.bias))
        act = F.check_batch_norm(where, input, mean, var, weight, bias, False, residual, self.act, self.eps,
                                 num_features=self.num_features, accepted_dims=self._accepted_dims)
        return F.batch_norm_checked(input, mean, var, weight, bias, False, self.eps, residual, act)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + (f", act={self.act!r}" if self.act else "")


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen BatchNorm over ``(N, C)`` or ``(N, C, L)`` input."""

    _accepted_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen BatchNorm over ``(N, C, H, W)``; as ``torchvision.ops.FrozenBatchNorm2d(num_features, eps)``."""

    _accepted_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen BatchNorm over ``(N, C, D, H, W)`` input."""

    _accepted_dims = (5,)
