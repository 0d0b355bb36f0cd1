"""LayerNorm2d: LayerNorm over the channels of an image, for NCHW and channels_last input alike.

For ``x`` of shape ``(N, C, H, W)``, each pixel's ``C`` values are normalized::

    μ = 1/C Σ_c x[n, c, h, w],   σ² = 1/C Σ_c (x[n, c, h, w] − μ)²
    y[n, c, h, w] = γ_c · (x[n, c, h, w] − μ)/sqrt(σ² + ε) + β_c

— the LayerNorm of ConvNeXt (Liu et al., "A ConvNet for the 2020s", CVPR 2022) that timm and
torchvision write as ``permute(0, 2, 3, 1) → LayerNorm(C) → permute(0, 3, 1, 2)`` (pytorch#71465).
Here the statistics are taken across the strided channels where the data lie, by the
``torch.ops.normkit.layer_norm_2d`` op and its own backward (:mod:`normkit.ops_channels`): no
permuted copies, and the output keeps the input's layout (the permute form returns channels_last
for NCHW input).

Arguments and state are ``torch.nn.LayerNorm(num_channels)``'s (``weight``/``bias`` of shape
``(C,)``; a state_dict moves between the two and timm's ``LayerNorm2d``); ``eps`` defaults to
1e-6 like timm's LayerNorm2d and ConvNeXt (torch.nn.LayerNorm's default is 1e-5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from ..functional import layer_norm_2d

__all__ = ["LayerNorm2d", "RMSNorm2d", "layer_norm_2d", "ScriptableLayerNorm2d"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``(N, C, H, W)`` input, NCHW or channels_last.

    Args: ``num_channels`` (C), ``eps=1e-6``, ``elementwise_affine=True``, ``bias=True``,
    ``device``, ``dtype`` — torch.nn.LayerNorm's, with ``normalized_shape = (C,)``; keyword-only
    ``casting`` (``"torch"``, ``"fp32"``, ``"llama"``: :func:`normkit.functional.layer_norm`) and
    ``layout``: ``"input"`` (default) keeps the input's memory format, ``"channels_last"`` returns
    channels_last as ``permute → LayerNorm → permute`` does (timm's, torchvision's and Hugging Face's
    LayerNorm2d, whose next convolution then runs channels_last).
    Output: ``(N, C, H, W)`` in the input's dtype.
    """

    casting = "torch"
    layout = "input"

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, casting: str = "torch", layout: str = "input") -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        self.casting = F.check_casting(type(self).__name__, casting, "layer_norm")
        self.layout = F.check_layout(type(self).__name__, layout)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm_2d_module(self, input)

    def extra_repr(self) -> str:
        return super().extra_repr() + F.options_repr(self)

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles instead: the permute form, sharing this layer's tensors."""
        out = ScriptableLayerNorm2d.__new__(ScriptableLayerNorm2d)
        out.__dict__.update(self.__dict__)
        return out


class RMSNorm2d(nn.Module):
    """RMSNorm over the channels of ``(N, C, H, W)`` input, NCHW or channels_last (timm's ``RmsNorm2d``):
    ``y = γ_c·x/sqrt(mean_c(x²) + ε)`` at every pixel.

    Args: ``num_channels`` (C), ``eps=1e-6``, ``elementwise_affine=True``, ``device``, ``dtype``;
    keyword-only ``layout`` as :class:`LayerNorm2d`'s. State: ``weight`` ``(C,)`` when affine (the
    ``normalized_shape``, ``eps``, ``elementwise_affine`` attributes of torch's RMSNorm). Statistics in
    float32 (timm's ``RmsNorm2d`` computes in the input's dtype: bfloat16 results differ by its rounding).
    """

    layout = "input"

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True, device=None,
                 dtype=None, *, layout: str = "input") -> None:
        super().__init__()
        self.normalized_shape = (num_channels,)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        self.layout = F.check_layout(type(self).__name__, layout)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm_2d(input, self.weight, self.eps, layout=self.layout)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, elementwise_affine={self.elementwise_affine}" + \
            F.options_repr(self)


class ScriptableLayerNorm2d(nn.LayerNorm):
    """LayerNorm2d in TorchScript (``permute → layer_norm → permute``): the twin ``torch.jit.script`` uses."""

    def forward(self, input: Tensor) -> Tensor:
        y = nn.functional.layer_norm(input.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                     self.eps)
        return y.permute(0, 3, 1, 2)
