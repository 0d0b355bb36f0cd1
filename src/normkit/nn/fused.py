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

from torch import Tensor, nn

from .. import functional as F
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .groupnorm import GroupNorm
from .layernorm import LayerNorm, RMSNorm
from .layernorm2d import LayerNorm2d, RMSNorm2d
from .scripting import (
    ScriptableBatchNormAct1d,
    ScriptableBatchNormAct2d,
    ScriptableBatchNormAct3d,
    ScriptableGroupNormAct,
    twin,
)

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "GroupNormAct", "LayerNormAct", "LayerNormAct2d",
           "RMSNormAct", "RMSNormAct2d", "ActTail", "fused_act"]


def fused_act(layer: nn.Module) -> str:
    """The activation ``layer``'s kernel computes (``""`` for none): its ``act`` name, or the name of an
    activation module it fuses — none after a drop path, or for a norm without a fusing kernel."""
    if "drop" in layer._modules or not getattr(layer, "_fuses", True):
        return ""
    act = layer.__dict__.get("act", layer._modules.get("act"))
    return act if isinstance(act, str) else layer.__dict__.get("_fused_act", "")


class ActTail:
    """``act(drop(norm(x) + residual))``: the activation — and, as timm's norm + activation layers have
    it, a drop path before it — after a norm, mixed in before a normkit norm class.

    ``act`` is a fused activation's name (``"relu"``, ``"silu"``, ``"gelu"``, … :data:`F.ACTIVATIONS`),
    ``None``, or an ``nn.Module``. A module a kernel computes exactly (``nn.ReLU``, ``nn.SiLU``,
    exact ``nn.GELU``, … :func:`normkit.functional.activation_name`) is fused into the norm's kernel when
    there is no ``drop``; any other module, or any activation after a ``drop`` module (DropBlock,
    dropout), runs unchanged after the norm. Given modules are children named ``act`` and ``drop``, so
    the state_dict is that of a layer holding them (timm's ``BatchNormAct2d``, a PReLU's ``act.weight``).
    Norms without a fused kernel (LayerNorm, RMSNorm) apply the activation with torch's own function.
    """

    _fuses = True  # whether the norm's kernel can fuse the activation (BatchNorm, GroupNorm)

    def _init_tail(self, act, drop) -> None:
        where = type(self).__name__
        if drop is not None and not isinstance(drop, nn.Module):
            raise F.fail(where, "drop", "an nn.Module or None", type(drop).__name__)
        if drop is not None and not isinstance(drop, nn.Identity):
            self.drop = drop
        if isinstance(act, nn.Module):
            self.act = act
            name = F.activation_name(act) if "drop" not in self._modules else None
            self._fused_act = name if name is not None and self._fuses else ""
        else:
            self.act = F.check_activation(where, act)

    def _norm_and_tail(self, norm, input: Tensor, residual: Tensor | None) -> Tensor:
        """``norm(input, residual, fused_act)`` and what the kernel does not compute."""
        act = self.__dict__.get("act")
        drop = self._modules.get("drop")
        if isinstance(act, str) and self._fuses and drop is None:  # a name, fused (the common case)
            return norm(input, residual, act)
        fused = fused_act(self)
        y = norm(input, residual, fused)
        if drop is not None:
            y = drop(y)
        if fused:
            return y
        module = self._modules.get("act")
        if module is not None:
            return module(y)
        return F.activation(y, act or "")

    def extra_repr(self) -> str:
        act = self.__dict__.get("act")  # (a module shows as a child instead)
        return super().extra_repr() + (f", act={act or None!r}" if isinstance(act, str) else "")

    def __prepare_scriptable__(self) -> nn.Module:
        if not isinstance(self.__dict__.get("act"), str) or "drop" in self._modules:
            raise NotImplementedError(
                f"torch.jit.script: {type(self).__name__} with an activation or drop module has no TorchScript "
                "twin; use torch.jit.trace, torch.export or torch.compile"
            )
        return super().__prepare_scriptable__()


class _BatchNormAct(ActTail):
    """``act(BatchNorm(x) + residual)``: the constructor's ``act`` and the fused forward, mixed in before a
    normkit BatchNorm class (whose state and checks stay exactly its own)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, act: str | nn.Module | None = "relu",
                 device=None, dtype=None, *, drop: nn.Module | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_tail(act, drop)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return self._norm_and_tail(self._normalize, input, residual)


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """``act(BatchNorm1d(x) + residual)`` over ``(N, C)`` or ``(N, C, L)``, fused; state as
    ``torch.nn.BatchNorm1d`` (an MLP's ``Linear → BatchNorm1d → ReLU``).

    Args: those of ``torch.nn.BatchNorm1d`` plus ``act`` (``"relu"`` default, ``"silu"``,
    ``"gelu"``, …, ``None``, or an activation module) and keyword-only ``drop`` (:class:`ActTail`).
    ``forward(x, residual=None)``: ``residual`` has ``x``'s shape.
    """

    _script_twin = ScriptableBatchNormAct1d


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """``act(BatchNorm2d(x) + residual)`` over ``(N, C, H, W)``, fused; state as ``torch.nn.BatchNorm2d``
    (timm's ``BatchNormAct2d`` with its ``act`` and ``drop`` modules too).

    Args: those of ``torch.nn.BatchNorm2d`` plus ``act`` (``"relu"`` default, ``"silu"``,
    ``"gelu"``, …, ``None``, or an activation module) and keyword-only ``drop`` (:class:`ActTail`).
    ``forward(x, residual=None)``: ``residual`` has ``x``'s shape.
    """

    _script_twin = ScriptableBatchNormAct2d


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    """``act(BatchNorm3d(x) + residual)`` over ``(N, C, D, H, W)``, fused; state as
    ``torch.nn.BatchNorm3d``. Arguments as :class:`BatchNormAct2d`."""

    _script_twin = ScriptableBatchNormAct3d


class GroupNormAct(ActTail, GroupNorm):
    """``act(GroupNorm(x) + residual)``, fused; state as ``torch.nn.GroupNorm``.

    Args: those of ``torch.nn.GroupNorm`` plus ``act`` (``"relu"`` default, ``"silu"``,
    ``"gelu"``, …, ``None``, or an activation module) and keyword-only ``drop`` (:class:`ActTail`).
    ``forward(x, residual=None)``: ``residual`` has ``x``'s shape.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: str | nn.Module | None = "relu", device=None, dtype=None, *,
                 drop: nn.Module | None = None) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self._init_tail(act, drop)

    def __prepare_scriptable__(self):
        ActTail.__prepare_scriptable__(self)  # (refuses module tails)
        return twin(self, ScriptableGroupNormAct)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return self._norm_and_tail(self._normalize, input, residual)


class _UnfusedTail(ActTail):
    """A norm without a fused activation kernel: the norm, then ``drop``, then ``act`` (torch's function)."""

    _fuses = False

    def _norm_with(self, input: Tensor, residual: Tensor | None, act: str) -> Tensor:
        y = super().forward(input)
        return y if residual is None else y + residual

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return self._norm_and_tail(self._norm_with, input, residual)

    def __prepare_scriptable__(self) -> nn.Module:
        raise NotImplementedError(f"torch.jit.script: {type(self).__name__} has no TorchScript twin; use "
                                  "torch.jit.trace, torch.export or torch.compile")


class LayerNormAct(_UnfusedTail, LayerNorm):
    """``act(drop(LayerNorm(x) + residual))`` (timm's ``LayerNormAct``); state as ``torch.nn.LayerNorm``.
    Args: :class:`normkit.LayerNorm`'s, then keyword-only ``act`` and ``drop`` (:class:`ActTail`)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, act: str | nn.Module | None = "relu", drop: nn.Module | None = None,
                 casting: str = "torch", offset: float = 0.0) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, casting=casting,
                         offset=offset)
        self._init_tail(act, drop)


class LayerNormAct2d(_UnfusedTail, LayerNorm2d):
    """``act(drop(LayerNorm2d(x) + residual))`` (timm's ``LayerNormAct2d``); arguments :class:`LayerNorm2d`'s,
    then keyword-only ``act`` and ``drop``."""

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, act: str | nn.Module | None = "relu", drop: nn.Module | None = None,
                 casting: str = "torch", layout: str = "input") -> None:
        super().__init__(num_channels, eps, elementwise_affine, bias, device, dtype, casting=casting,
                         layout=layout)
        self._init_tail(act, drop)


class RMSNormAct(_UnfusedTail, RMSNorm):
    """``act(drop(RMSNorm(x) + residual))`` (timm's ``RmsNormAct``); arguments :class:`normkit.RMSNorm`'s,
    then keyword-only ``act`` and ``drop``."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, act: str | nn.Module | None = "relu", drop: nn.Module | None = None,
                 casting: str = "torch", offset: float = 0.0) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype, casting=casting, offset=offset)
        self._init_tail(act, drop)


class RMSNormAct2d(_UnfusedTail, RMSNorm2d):
    """``act(drop(RMSNorm2d(x) + residual))`` (timm's ``RmsNormAct2d``); arguments :class:`RMSNorm2d`'s,
    then keyword-only ``act`` and ``drop``."""

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True, device=None,
                 dtype=None, *, act: str | nn.Module | None = "relu", drop: nn.Module | None = None,
                 layout: str = "input") -> None:
        super().__init__(num_channels, eps, elementwise_affine, device, dtype, layout=layout)
        self._init_tail(act, drop)
