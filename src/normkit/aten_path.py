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

While tracing or exporting (``torch.jit.trace``, ``torch.export``, ``torch.onnx.export``), the
functions that compute statistics are written out in elementary ops instead — the two-pass
formulas of :mod:`normkit.reference` — because exporters translate aten's norms into ONNX's
``BatchNormalization(training_mode=1)``, ``GroupNormalization`` and ``InstanceNormalization``,
which onnxruntime computes with up to 25x the float32 error of eager torch on non-centred input
(measured: 2.0e-4 against 7.9e-6 on ``3 + 0.5·randn`` through a dozen norms). Eval-mode batch
norm (no statistics) keeps aten's op.

Running statistics move exactly as torch.nn moves them (aten updates them in place). A
cumulative average (``momentum=None``: ``momentum`` is the 0-d tensor ``1/num_batches_tracked``)
is passed to aten as a float in eager mode; while tracing or exporting, where a float would be
baked into the graph, training-mode batch norm is written in tensor ops instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

from . import activations
from .reference import ReferenceBackend, shifted_mean, stat_dtype

__all__ = ["batch_norm", "batch_norm_with_stats", "instance_norm", "group_norm", "layer_norm", "rms_norm",
           "layer_norm_2d", "activation", "exporting"]

_REF = ReferenceBackend()
_ACTIVATIONS = activations.REGISTRY


def activation(y: Tensor, act: str) -> Tensor:
    """``act(y)`` by torch's own activation function (:mod:`normkit.activations`; exact erf GELU)."""
    return _ACTIVATIONS[act].torch_fn(y) if act else y


def finish(y: Tensor, residual: Tensor | None, act: str) -> Tensor:
    """``act(y + residual)`` in torch's ops, out of place: the tail of torch.nn's BN → add → activation."""
    if residual is not None:
        y = y + residual
    return activation(y, act)


# torch.compiler.is_exporting appeared in torch 2.5; before it, treat every compile as an export
_is_exporting = getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)


def exporting() -> bool:
    """``torch.export`` / ``torch.onnx.export`` is capturing the program (not a plain ``torch.compile``)."""
    return torch.compiler.is_compiling() and _is_exporting()


def _tracing() -> bool:
    """A program is being captured for an exporter (``torch.jit.trace``, ``torch.export``), where the
    statistics are written out (module docstring); under a plain ``torch.compile`` torch's own norms
    stay, so Inductor decomposes and fuses them exactly as it does torch.nn's."""
    return torch.jit.is_tracing() or exporting()


def batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act) -> Tensor:
    """BatchNorm (+ residual, activation) by ``torch.nn.functional.batch_norm``.

    While tracing or exporting in training mode, the batch statistics are written out instead
    (:func:`_batch_norm_written_out`, module docstring).
    """
    if training and _tracing():
        return finish(_batch_norm_written_out(input, running_mean, running_var, weight, bias, momentum, eps),
                       residual, act)
    if isinstance(momentum, Tensor):
        momentum = float(momentum) if training and running_mean is not None else 0.0
    # torch.batch_norm is what F.batch_norm calls after its Python-side checks, which ours replace
    y = torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
                         torch.backends.cudnn.enabled)
    return y if residual is None and not act else finish(y, residual, act)


def batch_norm_with_stats(input, weight, bias, eps, residual, act) -> tuple[Tensor, Tensor, Tensor]:
    """Training BatchNorm (+ residual, activation) and its batch statistics ``(y, mean, biased var)``,
    from one ``torch.batch_norm`` call: what ``torch.compile`` sees for a normkit layer, so Inductor
    computes the output and the statistics in the reduction it generates for torch.nn's BatchNorm.

    aten moves scratch statistics with momentum 1, which leaves exactly the batch mean and the
    unbiased variance in them; the layer's own rules then move its running statistics
    (:mod:`normkit.running_stats`).
    """
    c = input.shape[1]
    sd = stat_dtype(input.dtype)
    mean = torch.zeros(c, dtype=sd, device=input.device)
    var = torch.ones(c, dtype=sd, device=input.device)
    y = torch.batch_norm(input, weight, bias, mean, var, True, 1.0, eps, torch.backends.cudnn.enabled)
    count = input.numel() // c if c else 0
    biased = var * ((count - 1) / count) if count > 1 else var * 0
    return finish(y, residual, act), mean, biased


def layer_norm_2d(input, weight, bias, eps) -> Tensor:
    """LayerNorm over dim 1 (LayerNorm2d) as ``permute → layer_norm → permute`` in torch's operators."""
    perm = (0, *range(2, input.dim()), 1)
    inverse = (0, input.dim() - 1, *range(1, input.dim() - 1))
    y = layer_norm(input.permute(perm), (input.shape[1],), weight, bias, eps)
    return y.permute(inverse)


def _batch_norm_written_out(input, running_mean, running_var, weight, bias, momentum, eps) -> Tensor:
    """Training BatchNorm in elementary ops: two-pass statistics in stat dtype, then the affine."""
    sd = stat_dtype(input.dtype)
    dims = [0] + list(range(2, input.dim()))
    shape = (1, -1) + (1,) * (input.dim() - 2)
    xs = input.to(sd)
    mean = shifted_mean(xs, dims)
    var = (xs - mean).square().mean(dim=dims, keepdim=True)
    y = (xs - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(sd).reshape(shape)
    if bias is not None:
        y = y + bias.to(sd).reshape(shape)
    if running_mean is not None and running_var is not None:
        # detached values, not torch.no_grad(): a grad-mode switch inside an exported program does not load
        count = input.numel() // input.shape[1]
        unbiased = var.detach().reshape(-1) * (count / max(count - 1, 1))
        running_mean.mul_(1 - momentum).add_(mean.detach().reshape(-1).to(running_mean.dtype) * momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype) * momentum)
    return y.to(input.dtype)


def instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps) -> Tensor:
    """InstanceNorm by ``torch.nn.functional.instance_norm`` (written out while tracing/exporting)."""
    if use_input_stats and _tracing():
        y, mean, var = _REF.group_forward(input, input.shape[1], weight, bias, eps, None, "")
        if running_mean is not None and running_var is not None:
            spatial = input.numel() // max(input.shape[0] * input.shape[1], 1)
            unbiased = var.detach() * (spatial / max(spatial - 1, 1))
            running_mean.mul_(1 - momentum).add_(mean.detach().mean(dim=0).to(running_mean.dtype) * momentum)
            running_var.mul_(1 - momentum).add_(unbiased.mean(dim=0).to(running_var.dtype) * momentum)
        return y.contiguous()
    return TF.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def group_norm(input, num_groups, weight, bias, eps, residual, act) -> Tensor:
    """GroupNorm (+ residual, activation) by ``torch.nn.functional.group_norm`` (written out while
    tracing/exporting)."""
    if _tracing():
        return _REF.group_forward(input, num_groups, weight, bias, eps, residual, act)[0]
    return finish(TF.group_norm(input, num_groups, weight, bias, eps), residual, act)


def _rows(input: Tensor, normalized_shape) -> tuple[Tensor, int]:
    k = 1
    for d in normalized_shape:
        k *= d
    return input.reshape(-1, k), k


def layer_norm(input, normalized_shape, weight, bias, eps) -> Tensor:
    """LayerNorm by ``torch.nn.functional.layer_norm`` (written out while tracing/exporting)."""
    if _tracing():
        x2d, k = _rows(input, normalized_shape)
        w = weight.reshape(k) if weight is not None else None
        b = bias.reshape(k) if bias is not None else None
        return _REF.row_forward(x2d, w, b, eps, False)[0].reshape(input.shape)
    return torch.layer_norm(input, normalized_shape, weight, bias, eps, torch.backends.cudnn.enabled)


def rms_norm(input, normalized_shape, weight, eps) -> Tensor:
    """RMSNorm by ``torch.nn.functional.rms_norm`` (written out while tracing/exporting)."""
    if _tracing() and not input.is_complex():
        x2d, k = _rows(input, normalized_shape)
        w = weight.reshape(k) if weight is not None else None
        return _REF.row_forward(x2d, w, None, eps, True)[0].reshape(input.shape)
    return TF.rms_norm(input, normalized_shape, weight, eps)
