"""Every input check of normkit's norms, in one place: the front doors of :mod:`normkit.functional`
call one function of this module per call, on whichever path the call takes (the ONE_CALL path's C++
only recognises what these checks accept, and hands everything else back to them).

Every check runs before any state changes, and every failure raises :class:`NormInputError`,
whose message names the argument, what was expected and what came. It subclasses both
``ValueError`` and ``RuntimeError`` because torch.nn raises one or the other for the same
mistakes (e.g. ``ValueError`` for a wrong number of dimensions, ``RuntimeError`` for a wrong
channel count): code written against either keeps working.

One function per norm (:func:`batch_norm`, :func:`instance_norm`, :func:`group_norm`,
:func:`row_norm`, :func:`layer_norm_2d`), each given the layer's own expectations when a layer calls
(``num_features``, the accepted ranks); each first asks a fast predicate (``*_ok``: the common case, a
few attribute reads) and runs the detailed checks only when it says no.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class NormInputError(ValueError, RuntimeError):
    """Bad input to a normkit layer or function."""


class NormDtypeError(NormInputError, NotImplementedError):
    """An input dtype no normalization is defined for (integer, bool, complex): torch raises
    ``NotImplementedError`` for these, so this error is one too (and still a NormInputError)."""


def fail(where: str, argument: str, expected: str, got: str) -> NormInputError:
    return NormInputError(f"{where}: {argument}: expected {expected}, got {got}")


def shape_str(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def check_tensor(where: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise fail(where, name, "a torch.Tensor", type(t).__name__)
    if not t.is_floating_point():
        raise NormDtypeError(f"{where}: {name}: expected a floating-point tensor (float16, bfloat16, float32, "
                             f"float64), got {t.dtype}")


_REDUCED = (torch.float16, torch.bfloat16)
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


# ----------------------------------------------------------------------------- fast paths
# Each ``*_ok`` answers, in a few attribute reads, whether the common case holds so that none of the
# detailed checks below can fail; when it answers False the caller runs the detailed checks, which
# raise with the full message (or pass, for a rare case the fast path does not cover). A call on a
# small tensor costs tens of microseconds of Python otherwise — more than the normalization.
def vectors_ok(input: torch.Tensor, size: int, vectors: Sequence[torch.Tensor | None]) -> bool:
    """Every given vector has shape ``(size,)``, no running statistic requires grad, one dtype that
    suits the input (check_param_dtypes)."""
    dtype = None
    for t in vectors:
        if t is None:
            continue
        if t.shape != (size,) or (dtype is not None and t.dtype != dtype):
            return False
        dtype = t.dtype
    return dtype is None or dtype == input.dtype or (dtype == torch.float32 and input.dtype in _REDUCED)


def batch_norm_ok(input, num_features: int, accepted_dims, weight, bias, running_mean, running_var,
                  batch_stats: bool, eps: float) -> bool:
    if not isinstance(input, torch.Tensor) or input.dtype not in _FLOATS or input.dim() not in accepted_dims:
        return False
    if input.shape[1] != num_features or not eps > 0:
        return False
    if running_mean is not None and (running_mean.requires_grad or running_var is None or running_var.requires_grad):
        return False
    if batch_stats and input.numel() == num_features:  # one value per channel (or zero channels)
        return False
    return vectors_ok(input, num_features, (weight, bias, running_mean, running_var))


def fused_args_ok(input: torch.Tensor, residual: torch.Tensor | None, act: str | None, names) -> bool:
    """The fused form's extra arguments pass their checks: ``act`` one of ``names`` (or None), and
    ``residual`` None or a floating tensor of the input's shape (check_same_shape)."""
    if (act or "") not in names:
        return False
    return residual is None or (isinstance(residual, torch.Tensor) and residual.dtype in _FLOATS
                                and residual.shape == input.shape)


def check_param_dtypes(where: str, input: torch.Tensor, **params: torch.Tensor | None) -> None:
    """The per-channel tensors share one dtype: the input's, or float32 for float16/bfloat16 input.

    torch.nn's rule on the CPU ("mixed dtype (CPU): all inputs must share same datatype"): a
    float64 input with float32 parameters, or float16 parameters beside float32 running
    statistics, is refused there, so it is refused here.
    """
    given = [(name, t) for name, t in params.items() if t is not None]
    if not given:
        return
    dtypes = {t.dtype for _, t in given}
    allowed = {input.dtype, torch.float32} if input.dtype in _REDUCED else {input.dtype}
    if len(dtypes) > 1 or not dtypes <= allowed:
        want = " or ".join(str(d) for d in sorted(allowed, key=str))
        names = ", ".join(name for name, _ in given)
        got = ", ".join(f"{name} {t.dtype}" for name, t in given)
        raise fail(where, names, f"one dtype, {want} for {input.dtype} input", got)


def check_not_requiring_grad(where: str, **buffers: torch.Tensor | None) -> None:
    """Running statistics are not differentiable: torch refuses ones that require grad, so do we."""
    if not torch.is_grad_enabled():
        return
    for name, t in buffers.items():
        if t is not None and t.requires_grad:
            raise fail(where, name, "a tensor that does not require grad (running statistics are not "
                       "differentiable)", "requires_grad=True")


def check_eps(where: str, eps: float, training: bool) -> None:
    """torch's rule for batch norm: ``eps > 0`` when normalizing with batch statistics, else ``eps >= 0``."""
    if training and not eps > 0:
        raise fail(where, "eps", "a positive number when training (the variance of a constant channel is 0)",
                   repr(eps))
    if not eps >= 0:
        raise fail(where, "eps", "a non-negative number", repr(eps))


def check_ndim(where: str, x: torch.Tensor, allowed: Sequence[int], layout: str) -> None:
    if x.dim() not in allowed:
        dims = " or ".join(f"{d}D" for d in allowed)
        raise fail(where, "input", f"{dims} input {layout}", f"{x.dim()}D input of {shape_str(x)}")


def check_min_ndim(where: str, x: torch.Tensor, min_dim: int, layout: str) -> None:
    if x.dim() < min_dim:
        raise fail(where, "input", f"at least {min_dim}D input {layout}", f"{x.dim()}D input of {shape_str(x)}")


def check_channels(where: str, x: torch.Tensor, num_features: int, dim: int = 1) -> None:
    if x.dim() <= dim or x.shape[dim] != num_features:
        got = x.shape[dim] if x.dim() > dim else "none"
        raise fail(where, "input", f"{num_features} channels in dim {dim} (num_features)",
                   f"{got} in {shape_str(x)}")


def check_vector(where: str, name: str, t: torch.Tensor | None, size: int) -> None:
    if t is None:
        return
    check_tensor(where, name, t)
    if t.dim() != 1 or t.numel() != size:
        raise fail(where, name, f"a 1-D tensor of {size} elements", shape_str(t))


def check_more_than_one_value(where: str, x: torch.Tensor) -> None:
    """Batch statistics of a single value per channel are meaningless (variance 0/0)."""
    per_channel = x.shape[0] * math.prod(x.shape[2:])
    if per_channel == 1:
        raise fail(
            where,
            "input",
            "more than 1 value per channel when training (batch statistics of one value are "
            "undefined; use eval(), GroupNorm, LayerNorm, or SyncBatchNorm across processes)",
            f"input of {shape_str(x)}",
        )


def check_same_shape(where: str, name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    if t is None:
        return
    check_tensor(where, name, t)
    if t.shape != x.shape:
        raise fail(where, name, f"the input's shape {tuple(x.shape)}", shape_str(t))


# ----------------------------------------------------------------------------- per norm
_LAYOUTS = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def act_name(where: str, act: str | None, names) -> str:
    """``act`` as a fused activation's name (``None`` → ``""``), one of ``names``."""
    act = act or ""
    if not isinstance(act, str) or act not in names:
        raise fail(where, "act", f"one of {[a for a in names if a] + [None]}", repr(act))
    return act


def channel_vectors(where: str, channels: int, **vectors: torch.Tensor | None) -> None:
    """Each given per-channel vector is 1-D with ``channels`` elements."""
    for name, t in vectors.items():
        check_vector(where, name, t, channels)


def layer_input(where: str, input, accepted_dims: Sequence[int] | None, num_features: int | None,
                min_dim: int = 2, layout: str = "(N, C, *)") -> None:
    """A layer's own expectations: a floating tensor of an accepted rank with ``num_features`` channels."""
    check_tensor(where, "input", input)
    if accepted_dims is None:
        check_min_ndim(where, input, min_dim, layout)
    else:
        check_ndim(where, input, accepted_dims, " or ".join(_LAYOUTS.get(d, f"{d}-D") for d in accepted_dims))
    if num_features is not None:
        check_channels(where, input, num_features)


def batch_norm(where: str, input, running_mean, running_var, weight, bias, training: bool, eps: float,
               residual=None, act: str | None = None, names=("",), *, num_features: int | None = None,
               accepted_dims: Sequence[int] | None = None, count_rule: bool = True) -> str:
    """Every check of a BatchNorm call (``training``: batch statistics); returns the normalised ``act``.

    A layer passes its ``num_features`` and accepted ranks; the functional form checks ``(N, C, *)``.
    ``count_rule=False`` leaves out "more than one value per channel" for the layers whose statistics
    are not this batch's (SyncBatchNorm counts over every rank, GhostBatchNorm per virtual batch).
    """
    if (batch_norm_ok(input, input.shape[1] if num_features is None and _rank_ok(input) else num_features,
                      accepted_dims or range(2, 9), weight, bias, running_mean, running_var,
                      training and count_rule, eps)
            and (residual is None and not act or fused_args_ok(input, residual, act, names))):
        if not training and running_mean is None:
            raise fail(where, "running_mean/running_var", "tensors when training=False", "None")
        return act or ""
    layer_input(where, input, accepted_dims, num_features)
    channel_vectors(where, input.shape[1], running_mean=running_mean, running_var=running_var, weight=weight,
                    bias=bias)
    check_param_dtypes(where, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_not_requiring_grad(where, running_mean=running_mean, running_var=running_var)
    check_same_shape(where, "residual", residual, input)
    check_eps(where, eps, training)
    if training and count_rule:
        check_more_than_one_value(where, input)
    elif running_mean is None or running_var is None:
        raise fail(where, "running_mean/running_var", "tensors when training=False", "None")
    return act_name(where, act, names)


def _rank_ok(input) -> bool:
    return isinstance(input, torch.Tensor) and input.dim() >= 2


def instance_norm(where: str, input, running_mean, running_var, weight, bias, use_input_stats: bool) -> None:
    check_tensor(where, "input", input)
    check_min_ndim(where, input, 3, "(N, C, *spatial)")
    channel_vectors(where, input.shape[1], running_mean=running_mean, running_var=running_var, weight=weight,
                    bias=bias)
    check_param_dtypes(where, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_not_requiring_grad(where, running_mean=running_mean, running_var=running_var)
    if use_input_stats and math.prod(input.shape[2:]) == 1:
        raise fail(where, "input", "more than 1 spatial element when training", f"input of {shape_str(input)}")


def group_norm(where: str, input, num_groups: int, weight, bias, residual=None, act: str | None = None,
               names=("",), *, num_channels: int | None = None) -> str:
    """Every check of a GroupNorm call; returns the normalised ``act``."""
    if (isinstance(input, torch.Tensor) and input.dtype in _FLOATS and input.dim() >= 2
            and (num_channels is None or input.shape[1] == num_channels)
            and isinstance(num_groups, int) and 0 < num_groups and input.shape[1] % num_groups == 0
            and vectors_ok(input, input.shape[1], (weight, bias))
            and (residual is None and not act or fused_args_ok(input, residual, act, names))):
        return act or ""
    layer_input(where, input, None, num_channels)
    c = input.shape[1]
    if num_groups <= 0 or c % num_groups != 0:
        raise fail(where, "num_groups", f"a positive divisor of the {c} input channels", str(num_groups))
    check_vector(where, "weight", weight, c)
    check_vector(where, "bias", bias, c)
    check_param_dtypes(where, input, weight=weight, bias=bias)
    check_same_shape(where, "residual", residual, input)
    return act_name(where, act, names)


def row_norm(where: str, input, normalized_shape, weight, bias, allow_complex: bool = False,
             param_dtypes: bool = True) -> list[int]:
    """LayerNorm's and RMSNorm's checks; returns ``normalized_shape`` as a list."""
    if isinstance(input, torch.Tensor) and input.dtype in _FLOATS:  # the common case: one trailing dimension
        shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
        if len(shape) == 1 and input.dim() >= 1 and input.shape[-1] == shape[0] and \
                (vectors_ok(input, shape[0], (weight, bias)) if param_dtypes else
                 all(t is None or (t.shape == (shape[0],) and t.dtype in _FLOATS) for t in (weight, bias))):
            return shape
    if not (allow_complex and isinstance(input, torch.Tensor) and input.is_complex()):
        check_tensor(where, "input", input)
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or list(input.shape[input.dim() - k:]) != shape:
        raise fail(where, "input", f"trailing dimensions {tuple(shape)} (normalized_shape)",
                   f"input of {shape_str(input)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            if not (allow_complex and t.is_complex()):
                check_tensor(where, name, t)
            if list(t.shape) != shape:
                raise fail(where, name, f"shape {tuple(shape)} (normalized_shape)", shape_str(t))
    if param_dtypes:
        check_param_dtypes(where, input, weight=weight, bias=bias)
    return shape


def layer_norm_2d(where: str, input, weight, bias, num_channels: int | None = None) -> None:
    """LayerNorm2d's checks: ``(N, C, H, W)`` input, per-channel affine."""
    check_tensor(where, "input", input)
    check_ndim(where, input, (4,), "(N, C, H, W)")
    if num_channels is not None:
        check_channels(where, input, num_channels)
    check_vector(where, "weight", weight, input.shape[1])
    check_vector(where, "bias", bias, input.shape[1])
