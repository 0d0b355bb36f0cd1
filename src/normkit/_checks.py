"""Input validation shared by the functional API and the modules.

Every check runs before any state changes, and every failure raises :class:`NormInputError`,
whose message names the argument, what was expected and what came. It subclasses both
``ValueError`` and ``RuntimeError`` because torch.nn raises one or the other for the same
mistakes (e.g. ``ValueError`` for a wrong number of dimensions, ``RuntimeError`` for a wrong
channel count): code written against either keeps working.
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
