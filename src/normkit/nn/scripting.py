"""What ``torch.jit.script`` compiles in place of a normkit layer.

TorchScript compiles a module's ``forward`` from its Python source, and normkit's forwards (input
checks with Python f-strings, the route to custom ops) are not TorchScript. ``torch.jit.script``
first calls ``__prepare_scriptable__()`` on every module, and normkit's layers answer with a
*twin* written in TorchScript: the same class of ``torch.nn`` (or, for the fused and frozen
layers, a small scriptable class below) sharing the very same parameter and buffer tensors, so
the scripted model has normkit's ``state_dict`` keys, trains the same parameters, and computes
torch.nn's numbers with aten's kernels.

    scripted = torch.jit.script(model)        # works with normkit layers inside
"""


from typing import Optional

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

__all__ = ["twin", "ScriptableBatchNormAct1d", "ScriptableBatchNormAct2d", "ScriptableBatchNormAct3d",
           "ScriptableGroupNormAct", "ScriptableFrozenBatchNorm"]


def twin(module: nn.Module, cls: type) -> nn.Module:
    """An instance of ``cls`` with ``module``'s state: the same ``__dict__`` contents, so the same
    parameter and buffer dictionaries (tensors are shared, not copied)."""
    out = cls.__new__(cls)
    out.__dict__.update(module.__dict__)
    return out


def _act(y: Tensor, act: str) -> Tensor:
    """The fused layers' activation by torch's functions (normkit.activations; "leaky_relu:0.2" carries its
    parameter after the colon, the bare name the default)."""
    colon = act.find(":")
    name = act if colon < 0 else act[:colon]
    if name == "relu":
        return torch.relu(y)
    if name == "silu":
        return TF.silu(y)
    if name == "gelu":
        return TF.gelu(y)
    if name == "gelu_tanh":
        return TF.gelu(y, approximate="tanh")
    if name == "hardswish":
        return TF.hardswish(y)
    if name == "leaky_relu":
        return TF.leaky_relu(y, 0.01 if colon < 0 else float(act[colon + 1:]))
    if name == "relu6":
        return TF.hardtanh(y, 0.0, 6.0)
    if name == "hardsigmoid":
        return TF.hardsigmoid(y)
    if name == "mish":
        return TF.mish(y)
    if name == "elu":
        return TF.elu(y, 1.0 if colon < 0 else float(act[colon + 1:]))
    if name == "tanh":
        return torch.tanh(y)
    if name == "sigmoid":
        return torch.sigmoid(y)
    return y


class ScriptableBatchNormAct2d(nn.BatchNorm2d):
    """``act(BatchNorm2d(x) + residual)`` in TorchScript (twin of :class:`normkit.BatchNormAct2d`)."""

    act: str

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # noqa: UP045 (TorchScript)
        self._check_input_dim(input)
        factor = 0.0
        if self.momentum is not None:
            factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        y = TF.batch_norm(input, self.running_mean if keep else None, self.running_var if keep else None,
                          self.weight, self.bias, batch_stats, factor, self.eps)
        if residual is not None:
            y = y + residual
        return _act(y, self.act)


class ScriptableBatchNormAct1d(nn.BatchNorm1d):
    """Twin of :class:`normkit.BatchNormAct1d` (BatchNormAct2d's forward; ``_check_input_dim`` is 1d's)."""

    act: str
    forward = ScriptableBatchNormAct2d.forward


class ScriptableBatchNormAct3d(nn.BatchNorm3d):
    """Twin of :class:`normkit.BatchNormAct3d`."""

    act: str
    forward = ScriptableBatchNormAct2d.forward


class ScriptableGroupNormAct(nn.GroupNorm):
    """``act(GroupNorm(x) + residual)`` in TorchScript (twin of :class:`normkit.GroupNormAct`)."""

    act: str

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # noqa: UP045 (TorchScript)
        y = TF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        if residual is not None:
            y = y + residual
        return _act(y, self.act)


class ScriptableFrozenBatchNorm(nn.Module):
    """Frozen BatchNorm in TorchScript (twin of :class:`normkit.nn.frozen.FrozenBatchNorm`)."""

    act: str
    eps: float

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # noqa: UP045 (TorchScript)
        y = TF.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if residual is not None:
            y = y + residual
        return _act(y, self.act)
