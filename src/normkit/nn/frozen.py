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
from .fused import ActTail
from .scripting import ScriptableFrozenBatchNorm, twin

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]

class FrozenBatchNorm(ActTail, nn.Module):
    """Frozen BatchNorm over any ``(N, C, *)`` input (module docstring).

    ``act`` and ``drop`` as :class:`normkit.nn.fused.ActTail`'s (a fused activation's name — set by
    :func:`normkit.freeze` when it freezes a fused norm + activation layer —, ``None``, or modules).
    ``promote=True``: the output dtype is torch's promotion of the input's and the buffers' (a float32
    result for bfloat16 input beside float32 buffers), as torchvision's, timm's and the DETR models'
    FrozenBatchNorm2d compute ``x·scale + shift`` in type promotion; by default it is the input's.
    """

    _accepted_dims: tuple[int, ...] = (2, 3, 4, 5)
    promote = False

    def __init__(self, num_features: int, eps: float = 1e-5, *, act: str | nn.Module | None = None,
                 drop: nn.Module | None = None, promote: bool = False) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.promote = bool(promote)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self._init_tail(act, drop)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __prepare_scriptable__(self) -> nn.Module:
        if not isinstance(self.__dict__.get("act"), str) or "drop" in self._modules or self.promote:
            raise NotImplementedError(f"torch.jit.script: {type(self).__name__} with activation or drop modules or "
                                      "promote=True has no TorchScript twin; use torch.jit.trace or torch.export")
        return twin(self, ScriptableFrozenBatchNorm)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return self._norm_and_tail(self._frozen, input, residual)

    def _frozen(self, input: Tensor, residual: Tensor | None, act: str) -> Tensor:
        where = type(self).__name__
        F.check_input_dim(where, input, self._accepted_dims)
        if self.promote and isinstance(input, Tensor):
            input = input.to(torch.promote_types(input.dtype, self.running_var.dtype))
        # torchvision computes in the buffers' dtype and lets type promotion mix it with the input's;
        # here the buffers are brought to the input's parameter dtype (exact for float64 input)
        pd = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        mean, var, weight, bias = (t.to(pd) for t in (self.running_mean, self.running_var, self.weight, self.bias))
        act = F.check_batch_norm(where, input, mean, var, weight, bias, False, residual, act, self.eps,
                                 num_features=self.num_features, accepted_dims=self._accepted_dims)
        return F.batch_norm_checked(input, mean, var, weight, bias, False, self.eps, residual, act)

    def extra_repr(self) -> str:
        act = self.__dict__.get("act")
        return f"{self.num_features}, eps={self.eps}" + (f", act={act!r}" if isinstance(act, str) and act else "") + \
            (", promote=True" if self.promote else "")


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen BatchNorm over ``(N, C)`` or ``(N, C, L)`` input."""

    _accepted_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen BatchNorm over ``(N, C, H, W)``; as ``torchvision.ops.FrozenBatchNorm2d(num_features, eps)``."""

    _accepted_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen BatchNorm over ``(N, C, D, H, W)`` input."""

    _accepted_dims = (5,)
