"""InstanceNorm1d/2d/3d: torch.nn's layers, computed by normkit's ops.

Statistics per (sample, channel) over the spatial dimensions:
``y = γ·(x − μ_{n,c})/sqrt(σ²_{n,c} + ε) + β``. Defaults as torch: ``affine=False``,
``track_running_stats=False``. With ``track_running_stats=True`` the running statistics are the
batch averages of the per-instance statistics and are used in eval mode; ``momentum=None``
leaves them unchanged, as in torch. Unbatched input (``(C, *spatial)``) is accepted.

Computed as GroupNorm with one channel per group (the same kernels).

Reference: Ulyanov, Vedaldi & Lempitsky, "Instance Normalization: The Missing Ingredient for
Fast Stylization", 2016.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as F
from .scripting import twin

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNormForward:
    _spatial_dims: int = 0
    _script_twin: type = nn.Module  # the torch.nn class, set per class below

    def __prepare_scriptable__(self) -> nn.Module:
        return twin(self, self._script_twin)

    def forward(self, input: Tensor) -> Tensor:
        return F.instance_norm_module(self, input)


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """Instance Normalization over ``(N, C, L)``; drop-in for ``torch.nn.InstanceNorm1d``."""

    _spatial_dims = 1
    _script_twin = nn.InstanceNorm1d


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    """Instance Normalization over ``(N, C, H, W)``; drop-in for ``torch.nn.InstanceNorm2d``."""

    _spatial_dims = 2
    _script_twin = nn.InstanceNorm2d


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """Instance Normalization over ``(N, C, D, H, W)``; drop-in for ``torch.nn.InstanceNorm3d``."""

    _spatial_dims = 3
    _script_twin = nn.InstanceNorm3d
