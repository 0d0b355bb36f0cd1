"""LayerNorm and RMSNorm: torch.nn's layers, computed by normkit's ops.

Both normalize each sample over the trailing ``normalized_shape``:

* LayerNorm: ``y = γ·(x − μ)/sqrt(σ² + ε) + β`` (Ba, Kiros & Hinton, "Layer Normalization", 2016);
  ``elementwise_affine`` and ``bias`` as in torch.
* RMSNorm: ``y = γ·x/sqrt(mean(x²) + ε)`` (Zhang & Sennrich, "Root Mean Square Layer
  Normalization", NeurIPS 2019); ``eps=None`` means the epsilon of the statistics' dtype (float32's
  for half input), as torch computes it.

Neither depends on the batch, so both work for recurrent networks and batch size 1.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as F
from .scripting import twin

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(nn.LayerNorm):
    """Layer Normalization; drop-in for ``torch.nn.LayerNorm``.

    torch.nn.LayerNorm's arguments, and keyword-only ``casting`` (where the result is rounded:
    ``"torch"``, ``"fp32"``, ``"llama"``) and ``offset`` (``γ + offset`` is the scale), for the model
    families that compute LayerNorm differently (:func:`normkit.functional.layer_norm`).
    """

    casting = "torch"  # class defaults: a torch.nn.LayerNorm retyped by normkit.convert keeps torch's numerics
    offset = 0.0

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, casting: str = "torch", offset: float = 0.0) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.casting, self.offset = F.check_casting(type(self).__name__, casting, "layer_norm"), float(offset)

    def __prepare_scriptable__(self) -> nn.Module:
        return twin(self, nn.LayerNorm)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (bool, the input's shape before ``normalized_shape``, True = real position):
        padded positions get output 0 and gradient 0 (:mod:`normkit.masked`)."""
        return F.layer_norm_module(self, input, mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + F.options_repr(self)


class RMSNorm(nn.RMSNorm):
    """RMS Normalization; drop-in for ``torch.nn.RMSNorm``.

    torch.nn.RMSNorm's arguments, and keyword-only ``casting`` (``"torch"``, ``"llama"``, ``"t5"``) and
    ``offset`` (Gemma's ``1 + γ``), for the model families that compute RMSNorm differently
    (:func:`normkit.functional.rms_norm`).
    """

    casting = "torch"
    offset = 0.0

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, casting: str = "torch", offset: float = 0.0) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.casting, self.offset = F.check_casting(type(self).__name__, casting, "rms_norm"), float(offset)

    def __prepare_scriptable__(self) -> nn.Module:
        return twin(self, nn.RMSNorm)

    def forward(self, x: Tensor) -> Tensor:  # (torch.nn.RMSNorm's parameter name)
        return F.rms_norm_module(self, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + F.options_repr(self)
