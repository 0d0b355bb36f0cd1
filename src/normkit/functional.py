"""Stateless normalization functions with the signatures of ``torch.nn.functional``.

Each validates its input (clear errors, see :mod:`normkit._checks`), then takes one of two paths
(:mod:`normkit.route`): normkit's custom op (:mod:`normkit.ops`, the kernels) for plain eager
and compiled calls, or torch's own operators (:mod:`normkit.aten_path`) under ``torch.func``,
forward-mode AD, tracing and export. Every layer reaches the computation through these
functions. For batch and instance norm in training they update the running statistics in place
exactly as torch does::

    running_mean ← (1 − momentum)·running_mean + momentum·μ_B
    running_var  ← (1 − momentum)·running_var  + momentum·σ²_B·m/(m − 1)     (unbiased)

``momentum`` may also be a 0-d tensor (the modules pass ``1/num_batches_tracked`` for the
cumulative average without leaving the graph under ``torch.compile``).

Besides torch's arguments, ``batch_norm`` and ``group_norm`` take keyword-only ``residual``
and ``act`` (``"relu"``, ``"silu"``, ``"gelu"``) for the fused form
``y = act(norm(x) + residual)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks as C
from . import _fast, activations, aten_path, ops
from .reference import ACTIVATIONS
from .route import needs_grad, use_aten
from .running_stats import batch_moments

__all__ = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"]

_ACT_CODES = activations.codes()
_ANY_RANK = sum(1 << d for d in range(2, 9))  # (N, C, *) up to 8-D, as a bit mask of accepted ranks


def _check_act(where: str, act: str | None) -> str:
    act = act or ""
    if act not in ACTIVATIONS:
        raise C.fail(where, "act", f"one of {[a for a in ACTIVATIONS if a] + [None]}", repr(act))
    return act


def _check_channel_vectors(where: str, channels: int, **vectors: Tensor | None) -> None:
    """Each given per-channel vector is 1-D with ``channels`` elements."""
    for name, t in vectors.items():
        C.check_vector(where, name, t, channels)


# ----------------------------------------------------------------------------- batch norm
def check_batch_norm(
    where: str,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    residual: Tensor | None = None,
    act: str | None = None,
    eps: float = 1e-5,
) -> str:
    """All of batch_norm's input checks; returns the normalised ``act``."""
    C.check_tensor(where, "input", input)
    C.check_min_ndim(where, input, 2, "(N, C, *)")
    _check_channel_vectors(where, input.shape[1], running_mean=running_mean, running_var=running_var,
                           weight=weight, bias=bias)
    C.check_param_dtypes(where, input, running_mean=running_mean, running_var=running_var, weight=weight,
                         bias=bias)
    C.check_not_requiring_grad(where, running_mean=running_mean, running_var=running_var)
    C.check_same_shape(where, "residual", residual, input)
    C.check_eps(where, eps, training)
    if training:
        C.check_more_than_one_value(where, input)
    return _check_act(where, act)


def _update_running(running: Tensor, batch: Tensor, momentum: float | Tensor) -> None:
    running.mul_(1 - momentum).add_(batch.to(running.dtype) * momentum)


def batch_norm_unchecked(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    residual: Tensor | None,
    act: str,
    *,
    on_stats=None,
) -> Tensor:
    """:func:`batch_norm` after :func:`check_batch_norm` has passed (modules call this).

    ``on_stats(mean, var, count)``, when given, receives the batch statistics (biased variance)
    in place of the update of ``running_mean``/``running_var`` (the modules' running-statistics
    policy, :mod:`normkit.running_stats`); the modules then pass no running statistics.
    """
    if use_aten("batch_norm_train" if training else "batch_norm_infer", input, weight, bias, residual,
                fused=residual is not None or act != "",
                needs_grad=not training and needs_grad(input, weight, bias)):
        y = aten_path.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                 residual, act)
        if training and on_stats is not None:
            on_stats(*batch_moments(input))  # aten computed them too, but does not return them
        return y
    if not training:
        if running_mean is None or running_var is None:
            raise C.fail("batch_norm", "running_mean/running_var", "tensors when training=False", "None")
        return ops.current_ops().batch_norm_infer(input, running_mean, running_var, weight, bias, residual, eps,
                                                  act)
    y, mean, var = ops.current_ops().batch_norm_train(input, weight, bias, residual, eps, act)
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if on_stats is not None:
        on_stats(mean, var, count)
    elif count > 0 and running_mean is not None and running_var is not None:
        with torch.no_grad():
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, var * (count / max(count - 1, 1)), momentum)
    return y


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    act: str | None = None,
) -> Tensor:
    """Batch Normalization (Ioffe & Szegedy, 2015) over ``input`` of shape ``(N, C, *)``.

    ``y = act(γ·(x − μ)/sqrt(σ² + ε) + β + residual)`` with the batch statistics per channel
    (biased variance) when ``training``, else ``running_mean``/``running_var``.
    """
    code = _ACT_CODES.get(act or "")
    if code is not None and (not training or running_mean is None) and isinstance(input, Tensor) and input.dim() >= 2:
        # no running statistics to move: the common case in one C++ call (normkit._fast); a training call
        # with running statistics stays here (the aten route moves them by aten's formula, the kernel route
        # by this module's _update_running)
        served = _fast.batch_norm(input, weight, bias, running_mean, running_var, None, _ANY_RANK, input.shape[1],
                                  training, False, None, eps, residual, code, False)
        if served is not None:
            return served[0]
    if isinstance(input, Tensor) and input.dim() < 2 and input.numel() == 0:
        # torch accepts an empty 1-D input (and returns it): nothing to normalize
        return aten_path.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    residual, _check_act("batch_norm", act))
    act = check_batch_norm("batch_norm", input, running_mean, running_var, weight, bias, training, residual, act,
                           eps)
    return batch_norm_unchecked(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                residual, act)


# ----------------------------------------------------------------------------- instance norm
def check_instance_norm(where, input, running_mean, running_var, weight, bias, use_input_stats) -> None:
    C.check_tensor(where, "input", input)
    C.check_min_ndim(where, input, 3, "(N, C, *spatial)")
    _check_channel_vectors(where, input.shape[1], running_mean=running_mean, running_var=running_var,
                           weight=weight, bias=bias)
    C.check_param_dtypes(where, input, running_mean=running_mean, running_var=running_var, weight=weight,
                         bias=bias)
    C.check_not_requiring_grad(where, running_mean=running_mean, running_var=running_var)
    if use_input_stats and math.prod(input.shape[2:]) == 1:
        raise C.fail(where, "input", "more than 1 spatial element when training", f"input of {C.shape_str(input)}")


def instance_norm_unchecked(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    if use_aten("group_norm", input, weight, bias):
        return aten_path.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
                                       eps)
    # torch returns a contiguous output for any input layout
    input = input.contiguous()
    if not use_input_stats:
        return ops.current_ops().batch_norm_infer(input, running_mean, running_var, weight, bias, None, eps, "")
    y, mean, var = ops.current_ops().group_norm(input, input.shape[1], weight, bias, None, eps, "")
    spatial = math.prod(input.shape[2:])
    if running_mean is not None and running_var is not None and input.shape[0] > 0:
        # torch averages the per-instance statistics over the batch (unbiased variance).
        with torch.no_grad():
            _update_running(running_mean, mean.mean(dim=0), momentum)
            _update_running(running_var, (var * (spatial / max(spatial - 1, 1))).mean(dim=0), momentum)
    return y


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance Normalization (Ulyanov et al., 2016): statistics per (sample, channel) over space."""
    check_instance_norm("instance_norm", input, running_mean, running_var, weight, bias, use_input_stats)
    return instance_norm_unchecked(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


# ----------------------------------------------------------------------------- group norm
def check_group_norm(where, input, num_groups, weight, bias, residual=None, act=None) -> str:
    C.check_tensor(where, "input", input)
    C.check_min_ndim(where, input, 2, "(N, C, *)")
    c = input.shape[1]
    if num_groups <= 0 or c % num_groups != 0:
        raise C.fail(where, "num_groups", f"a positive divisor of the {c} input channels", str(num_groups))
    C.check_vector(where, "weight", weight, c)
    C.check_vector(where, "bias", bias, c)
    C.check_param_dtypes(where, input, weight=weight, bias=bias)
    C.check_same_shape(where, "residual", residual, input)
    return _check_act(where, act)


def group_norm_unchecked(input, num_groups, weight, bias, eps, residual, act) -> Tensor:
    """:func:`group_norm` after :func:`check_group_norm` has passed (modules call this)."""
    if use_aten("group_norm", input, weight, bias, residual, fused=residual is not None or act != ""):
        return aten_path.group_norm(input, num_groups, weight, bias, eps, residual, act)
    return ops.current_ops().group_norm(input, num_groups, weight, bias, residual, eps, act)[0]


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    act: str | None = None,
) -> Tensor:
    """Group Normalization (Wu & He, 2018): statistics per (sample, group of C/G channels)."""
    code = _ACT_CODES.get(act or "")
    if code is not None and isinstance(input, Tensor) and input.dim() >= 2:
        y = _fast.group_norm(input, num_groups, input.shape[1], weight, bias, eps, residual, code)
        if y is not None:
            return y
    act = check_group_norm("group_norm", input, num_groups, weight, bias, residual, act)
    return group_norm_unchecked(input, num_groups, weight, bias, eps, residual, act)


# ----------------------------------------------------------------------------- layer / RMS norm
def check_row_norm(where, input, normalized_shape, weight, bias, allow_complex=False) -> list[int]:
    if not (allow_complex and isinstance(input, Tensor) and input.is_complex()):
        C.check_tensor(where, "input", input)
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or list(input.shape[input.dim() - k:]) != shape:
        raise C.fail(where, "input", f"trailing dimensions {tuple(shape)} (normalized_shape)",
                     f"input of {C.shape_str(input)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            if not (allow_complex and t.is_complex()):
                C.check_tensor(where, name, t)
            if list(t.shape) != shape:
                raise C.fail(where, name, f"shape {tuple(shape)} (normalized_shape)", C.shape_str(t))
    return shape


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer Normalization (Ba et al., 2016): per sample over the trailing ``normalized_shape``."""
    y = _fast.layer_norm(input, normalized_shape, weight, bias, eps)
    if y is not None:
        return y
    shape = _row_shape_ok(input, normalized_shape, weight, bias)
    if shape is None:
        shape = check_row_norm("layer_norm", input, normalized_shape, weight, bias)
        C.check_param_dtypes("layer_norm", input, weight=weight, bias=bias)
    return layer_norm_unchecked(input, shape, weight, bias, eps)


def _row_shape_ok(input, normalized_shape, weight, bias) -> list[int] | None:
    """``normalized_shape`` as a list when the common case of :func:`check_row_norm` holds (1-D
    affine, matching trailing dimension, suitable dtypes), else None (run the detailed checks)."""
    if not isinstance(input, Tensor) or input.dtype not in C._FLOATS:
        return None
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    if len(shape) != 1 or input.dim() < 1 or input.shape[-1] != shape[0]:
        return None
    return shape if C.vectors_ok(input, shape[0], (weight, bias)) else None


def layer_norm_unchecked(input, normalized_shape, weight, bias, eps) -> Tensor:
    """:func:`layer_norm` after its checks (``normalized_shape`` a list)."""
    if use_aten("layer_norm", input, weight, bias):
        return aten_path.layer_norm(input, normalized_shape, weight, bias, eps)
    return ops.current_ops().layer_norm(input, normalized_shape, weight, bias, eps)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMS Normalization (Zhang & Sennrich, 2019): ``y = γ·x/sqrt(mean(x²) + ε)``.

    ``eps=None`` uses ``torch.finfo(input.dtype).eps``, as torch does. Complex input (which torch
    accepts) and channels_last input (whose layout torch keeps) are computed by torch's own op.
    torch accepts any floating weight dtype here, and so does normkit.
    """
    y = _fast.rms_norm(input, normalized_shape, weight, eps)
    if y is not None:
        return y
    shape = check_row_norm("rms_norm", input, normalized_shape, weight, None, allow_complex=True)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    complex_ = input.is_complex() or (weight is not None and weight.is_complex())
    if complex_ or not input.is_contiguous() or use_aten("rms_norm", input, weight):
        return aten_path.rms_norm(input, shape, weight, eps)
    return ops.current_ops().rms_norm(input, shape, weight, eps)[0]
