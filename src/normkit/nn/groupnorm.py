"""GroupNorm: torch.nn's layer, computed by normkit's ops.

Statistics per (sample, group) over the group's ``C/G`` channels and all spatial positions,
then a per-channel affine: ``y = γ_c·(x − μ_{n,g})/sqrt(σ²_{n,g} + ε) + β_c``. Input
``(N, C, *)``. One group is LayerNorm over ``(C, *)`` (with per-channel affine); ``C`` groups
are InstanceNorm. Independent of the batch size, so it trains at batch 1.

Reference: Wu & He, "Group Normalization", ECCV 2018.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import _checks as C
from .. import _fast, activations
from .. import functional as F
from ..reference import ACTIVATIONS
from .scripting import twin

__all__ = ["GroupNorm"]

_ACT_CODES = activations.codes()


class GroupNorm(nn.GroupNorm):
    """Group Normalization; drop-in for ``torch.nn.GroupNorm(num_groups, num_channels, eps, affine)``."""

    def __prepare_scriptable__(self) -> nn.Module:
        return twin(self, nn.GroupNorm)

    def _normalize(self, input: Tensor, residual: Tensor | None = None, act: str = "") -> Tensor:
        p = self._parameters
        weight, bias = p.get("weight"), p.get("bias")
        code = _ACT_CODES.get(act or "")
        if code is not None:  # the common case in one C++ call (normkit._fast), else the Python path below
            y = _fast.group_norm(input, self.num_groups, self.num_channels, weight, bias, self.eps, residual, code)
            if y is not None:
                return y
        fast = isinstance(input, Tensor) and input.dtype in C._FLOATS and input.dim() >= 2 and \
            input.shape[1] == self.num_channels and C.vectors_ok(input, self.num_channels, (weight, bias)) and \
            (residual is None and not act or C.fused_args_ok(input, residual, act, ACTIVATIONS))
        if not fast:
            where = type(self).__name__
            C.check_tensor(where, "input", input)
            C.check_min_ndim(where, input, 2, "(N, C, *)")
            C.check_channels(where, input, self.num_channels)
            act = F.check_group_norm(where, input, self.num_groups, self.weight, self.bias, residual, act)
        return F.group_norm_unchecked(input, self.num_groups, weight, bias, self.eps, residual, act or "")

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input)
