"""The aten path: normkit's functions computed by torch's own differentiable, traceable operators.

:mod:`normkit.route` sends a call here whenever something beyond plain first-order eager
autograd is active (``torch.func`` transforms, forward-mode AD, tracing, export, ONNX). Each
function takes exactly what the matching ``*_unchecked`` function of :mod:`normkit.functional`
takes — the checks have already passed — and computes

    y = act(norm(x) + residual)

with ``torch.nn.functional.batch_norm`` / ``instance_norm`` / ``group_norm`` / ``layer_norm`` /
``rms_norm`` (aten's ``native_*`` kernels, which have reverse, forward and batching rules of any
order), then the residual add and the activation as separate ops. Numbers are torch.nn's; the
fused forms differ from normkit's kernels only by rounding (the kernels round once, after the
activation).

Running statistics move exactly as torch.nn moves them (aten updates them in place). A
cumulative average (``momentum=None``: ``momentum`` is the 0-d tensor ``1/num_batches_tracked``)
is passed to aten as a float in eager mode; while tracing or exporting, where a float would be
baked into the graph, the update is written in tensor ops instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

from .reference import stat_dtype

__all__ = ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm", "activation"]

_ACTIVATIONS = {"": None, "relu": torch.relu, "silu": TF.silu, "gelu": TF.gelu}


def activation(y: Tensor, act: str) -> Tensor:
    """``act(y)`` by torch's own activation functions (GELU is the exact erf form)."""
    fn = _ACTIVATIONS[act]
    return y if fn is None else fn(y)


def _finish(y: Tensor, residual: Tensor | None, act: str) -> Tensor:
    if residual is not None:
        y = y + residual
    return activation(y, act)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act) -> Tensor:
    """BatchNorm (+ residual, activation) by ``torch.nn.functional.batch_norm``."""
    if isinstance(momentum, Tensor):
        if training and running_mean is not None and not _tracing():
            momentum = float(momentum)  # what torch.nn passes for momentum=None
        elif training and running_mean is not None:
            y = TF.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
            _update_running_in_tensor_ops(input, running_mean, running_var, momentum)
            return _finish(y, residual, act)
        else:
            momentum = 0.0
    y = TF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _finish(y, residual, act)


def _update_running_in_tensor_ops(input: Tensor, running_mean: Tensor, running_var: Tensor, momentum: Tensor):
    dims = [0] + list(range(2, input.dim()))
    count = input.numel() // input.shape[1]
    with torch.no_grad():
        var, mean = torch.var_mean(input.detach().to(stat_dtype(input.dtype)), dim=dims, correction=0)
        unbiased = var * (count / max(count - 1, 1))
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype) * momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype) * momentum)


def instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps) -> Tensor:
    """InstanceNorm by ``torch.nn.functional.instance_norm``."""
    return TF.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def group_norm(input, num_groups, weight, bias, eps, residual, act) -> Tensor:
    """GroupNorm (+ residual, activation) by ``torch.nn.functional.group_norm``."""
    return _finish(TF.group_norm(input, num_groups, weight, bias, eps), residual, act)


def layer_norm(input, normalized_shape, weight, bias, eps) -> Tensor:
    """LayerNorm by ``torch.nn.functional.layer_norm``."""
    return TF.layer_norm(input, normalized_shape, weight, bias, eps)


def rms_norm(input, normalized_shape, weight, eps) -> Tensor:
    """RMSNorm by ``torch.nn.functional.rms_norm``."""
    return TF.rms_norm(input, normalized_shape, weight, eps)
