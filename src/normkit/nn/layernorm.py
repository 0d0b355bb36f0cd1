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
    """Layer Normalization; drop-in for ``torch.nn.LayerNorm``."""

    def __prepare_scriptable__(self) -> nn.Module:
        return twin(self, nn.LayerNorm)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (bool, the input's shape before ``normalized_shape``, True = real position):
        padded positions get output 0 and gradient 0 (:mod:`normkit.masked`)."""
        return F.layer_norm_module(self, input, mask)


class RMSNorm(nn.RMSNorm):
    """RMS Normalization; drop-in for ``torch.nn.RMSNorm``."""

    def __prepare_scriptable__(self) -> nn.Module:
        return twin(self, nn.RMSNorm)

    def forward(self, x: Tensor) -> Tensor:  # (torch.nn.RMSNorm's parameter name)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
