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

import warnings

from torch import Tensor, nn

from .. import _checks as C
from .. import _fast, running_stats
from .. import functional as F
from .scripting import twin

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNormForward:
    _spatial_dims: int = 0
    _script_twin: type = nn.Module  # the torch.nn class, set per class below

    def __prepare_scriptable__(self) -> nn.Module:
        return twin(self, self._script_twin)

    def forward(self, input: Tensor) -> Tensor:
        if not self.track_running_stats and isinstance(input, Tensor) and input.dim() == self._spatial_dims + 2 \
                and input.numel() > input.shape[0] * input.shape[1]:  # batched, more than one value per instance
            # the common case in one C++ call (normkit._fast): GroupNorm with a group per channel on the
            # contiguous input, as the Python path below computes it
            p = self._parameters
            y = _fast.group_norm(input.contiguous(), self.num_features, self.num_features, p.get("weight"),
                                 p.get("bias"), self.eps, None, 0)
            if y is not None:
                return y
        where = type(self).__name__
        C.check_tensor(where, "input", input)
        batched = self._spatial_dims + 2
        names = {1: "L", 2: "H, W", 3: "D, H, W"}[self._spatial_dims]
        C.check_ndim(where, input, (batched - 1, batched), f"(N, C, {names}) or unbatched (C, {names})")
        if input.dim() == batched - 1:
            return self.forward(input.unsqueeze(0)).squeeze(0)
        if input.shape[1] != self.num_features:
            if self.affine or self.track_running_stats:
                C.check_channels(where, input, self.num_features)
            warnings.warn(
                f"{where}: input has {input.shape[1]} channels but num_features={self.num_features}; "
                "without affine parameters or running statistics, num_features is not used",
                stacklevel=2,
            )
        use_input_stats = self.training or not self.track_running_stats
        F.check_instance_norm(where, input, self.running_mean, self.running_var, self.weight, self.bias,
                              use_input_stats)
        update = self.training and self.track_running_stats
        running_mean, running_var = self.running_mean, self.running_var
        if update and running_mean is not None and running_stats.in_recomputation():
            # activation checkpointing recomputes this forward: the same computation (checkpointing
            # compares what it saves), but its update lands on copies (normkit.running_stats)
            running_mean, running_var = running_mean.clone(), running_var.clone()
        return F.instance_norm_unchecked(
            input,
            running_mean if update or not use_input_stats else None,
            running_var if update or not use_input_stats else None,
            self.weight,
            self.bias,
            use_input_stats,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )


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
