"""GroupNorm: torch.nn's layer, computed by normkit's ops.

Statistics per (sample, group) over the group's ``C/G`` channels and all spatial positions,
then a per-channel affine: ``y = γ_c·(x − μ_{n,g})/sqrt(σ²_{n,g} + ε) + β_c``. Input
``(N, C, *)``. One group is LayerNorm over ``(C, *)`` (with per-channel affine); ``C`` groups
are InstanceNorm. Independent of the batch size, so it trains at batch 1.

Reference: Wu & He, "Group Normalization", ECCV 2018.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as F
from .scripting import twin

__all__ = ["GroupNorm"]


class GroupNorm(nn.GroupNorm):
    """Group Normalization; drop-in for ``torch.nn.GroupNorm(num_groups, num_channels, eps, affine)``."""

    def __prepare_scriptable__(self) -> nn.Module:
        return twin(self, nn.GroupNorm)

    def _normalize(self, input: Tensor, residual: Tensor | None = None, act: str = "") -> Tensor:
        return F.group_norm_module(self, input, residual, act)

    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm_module(self, input)
