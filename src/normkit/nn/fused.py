"""Fused normalization + activation layers: ``y = act(norm(x) + residual)`` in one pass.

``BatchNormAct1d/2d/3d`` are :class:`normkit.BatchNorm1d/2d/3d` and ``GroupNormAct`` a
:class:`normkit.GroupNorm` whose forward also adds an optional ``residual`` and applies
``act`` (``"relu"``, ``"silu"``, ``"gelu"`` — exact erf GELU — or ``None``) inside the same
kernel pass that normalizes, with a backward that recomputes the pre-activation
``z = γ·x̂ + β + residual`` from the saved ``x`` and statistics (no extra activation tensor is
stored):

    dz = dy·act'(z),   dresidual = dz,   dx = γ·rstd·(dz − mean(dz) − x̂·mean(dz·x̂))

ReLU after a residual keeps the output ``y`` instead of the residual: ``dz = dy·[y > 0]`` is
torch's own ReLU backward (a NaN output passes ``dy`` on, as torch's), and ``y`` is what the next
layer keeps anyway (a convolution's input), where the residual may be a tensor nothing else
keeps (a downsampling shortcut's BatchNorm output). So a fused model saves no more for backward
than torch's ``norm → add → ReLU``: x and the output, as torch's norm and ReLU do. (Not less:
with an exact ReLU the backward needs x̂ at the clipped positions too, so x stays; InPlace-ABN's
"output only" needs an invertible activation such as leaky ReLU.)

Parameters, buffers and ``state_dict`` are exactly BatchNorm2d's / GroupNorm's (``act`` is a
constructor argument, not state), so a checkpoint of the unfused model loads unchanged.
``normkit.convert(model, fuse=True)`` builds them from ``norm → activation`` pairs.

References: Ioffe & Szegedy, 2015 (BatchNorm); Wu & He, 2018 (GroupNorm); He et al., "Deep
Residual Learning", 2016 (the ``act(bn(x) + residual)`` block tail).
"""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .groupnorm import GroupNorm
from .scripting import (
    ScriptableBatchNormAct1d,
    ScriptableBatchNormAct2d,
    ScriptableBatchNormAct3d,
    ScriptableGroupNormAct,
    twin,
)

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "GroupNormAct"]


class _BatchNormAct:
    """``act(BatchNorm(x) + residual)``: the constructor's ``act`` and the fused forward, mixed in before a
    normkit BatchNorm class (whose state and checks stay exactly its own)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, act: str | None = "relu",
                 device=None, dtype=None) -> None:
        self.act = F.check_activation(type(self).__name__, act)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return self._normalize(input, residual, self.act)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act or None!r}"


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """``act(BatchNorm1d(x) + residual)`` over ``(N, C)`` or ``(N, C, L)``, fused; state as
    ``torch.nn.BatchNorm1d`` (an MLP's ``Linear → BatchNorm1d → ReLU``).

    Args: those of ``torch.nn.BatchNorm1d`` plus ``act`` (``"relu"`` default, ``"silu"``,
    ``"gelu"``, ``None``). ``forward(x, residual=None)``: ``residual`` has ``x``'s shape.
    """

    _script_twin = ScriptableBatchNormAct1d


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """``act(BatchNorm2d(x) + residual)`` over ``(N, C, H, W)``, fused; state as ``torch.nn.BatchNorm2d``.

    Args: those of ``torch.nn.BatchNorm2d`` plus ``act`` (``"relu"`` default, ``"silu"``,
    ``"gelu"``, ``None``). ``forward(x, residual=None)``: ``residual`` has ``x``'s shape.
    """

    _script_twin = ScriptableBatchNormAct2d


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    """``act(BatchNorm3d(x) + residual)`` over ``(N, C, D, H, W)``, fused; state as
    ``torch.nn.BatchNorm3d``. Arguments as :class:`BatchNormAct2d`."""

    _script_twin = ScriptableBatchNormAct3d


class GroupNormAct(GroupNorm):
    """``act(GroupNorm(x) + residual)``, fused; state as ``torch.nn.GroupNorm``.

    Args: those of ``torch.nn.GroupNorm`` plus ``act`` (``"relu"`` default, ``"silu"``,
    ``"gelu"``, ``None``). ``forward(x, residual=None)``: ``residual`` has ``x``'s shape.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: str | None = "relu", device=None, dtype=None) -> None:
        self.act = F.check_activation(type(self).__name__, act)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)

    def __prepare_scriptable__(self):
        return twin(self, ScriptableGroupNormAct)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return self._normalize(input, residual, self.act)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act or None!r}"
