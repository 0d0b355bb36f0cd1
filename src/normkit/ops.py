"""normkit's custom ops (``torch.ops.normkit.*``), their fake kernels and their autograd.

Each op is registered with :func:`torch.library.custom_op`, so ``torch.compile`` and
``torch.export`` see one opaque op with a fake (meta) implementation instead of tracing into
kernel code, and ``torch.library.opcheck`` can test it. Forward ops save only the input and
the fp32 statistics (mean, rstd); backward is its own custom op, written from the formulas of
DESIGN.md §1 and computed by the selected backend (:mod:`normkit.backends`).

Layout: ``x`` may be contiguous, channels_last, or any strided view (which is made
contiguous first); ``dy`` and ``residual`` are brought to ``x``'s layout, so backends always
see one dense layout per call. Outputs keep ``x``'s memory format.

| op                         | returns                         | used by                        |
|----------------------------|---------------------------------|--------------------------------|
| batch_norm_train           | y, mean (C,), var (C,) biased   | BN training / batch statistics |
| batch_norm_infer           | y                               | BN with given (running) stats  |
| batch_norm_backward        | dx, dweight, dbias, dresidual   | both BN forwards               |
| group_norm                 | y, mean (N,G), var (N,G)        | GroupNorm, InstanceNorm        |
| group_norm_backward        | dx, dweight, dbias, dresidual   |                                |
| layer_norm                 | y, mean (M,), rstd (M,)         | LayerNorm                      |
| rms_norm                   | y, rstd (M,)                    | RMSNorm                        |
| row_norm_backward          | dx, dweight, dbias              | LayerNorm and RMSNorm          |

Gradients that an op does not produce (no weight, no residual) come back as empty tensors.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends
from ._layout import memory_format_of
from .backends import scale_shift
from .reference import ReferenceBackend, stat_dtype

backends.register_backend("reference", ReferenceBackend)
# The kernel backends load lazily, on first use: nothing compiles at import time.
backends.register_backend("cpu", lambda: importlib.import_module("normkit.cpu_backend").CpuBackend())
backends.register_backend("triton", lambda: importlib.import_module("normkit.triton_backend").TritonBackend())

_LIB = "normkit"


# ----------------------------------------------------------------------------- helpers
def _dense(x: Tensor) -> Tensor:
    """``x`` itself if contiguous or channels_last, else a contiguous copy."""
    fmt = memory_format_of(x)
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous()


def _as_layout(t: Tensor | None, x: Tensor) -> Tensor | None:
    if t is None:
        return None
    return t.contiguous(memory_format=memory_format_of(x))


def _fresh(t: Tensor, *inputs: Tensor | None) -> Tensor:
    """``t``, copied if it shares storage with an input (custom op outputs must not alias)."""
    ptr = t.untyped_storage().data_ptr()
    for inp in inputs:
        if inp is not None and inp.numel() > 0 and inp.untyped_storage().data_ptr() == ptr:
            return t.clone(memory_format=torch.preserve_format)
    return t


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; never a no-op ``Tensor.to`` (schema checks reject ops returning an input)."""
    return t if t.dtype == dtype else t.to(dtype)


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=stat_dtype(x.dtype))


def _channels(x: Tensor) -> int:
    return x.shape[1] if x.dim() > 1 else 1


# ----------------------------------------------------------------------------- BatchNorm
@torch.library.custom_op(f"{_LIB}::batch_norm_train", mutates_args=())
def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float, act: str
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm with batch statistics: ``y = act(γ·(x − μ_B)/sqrt(σ²_B + ε) + β + residual)``."""
    x = _dense(x)
    residual = _as_layout(residual, x)
    y, mean, var = backends.resolve("channel_forward", x).channel_forward(x, weight, bias, eps, residual, act)
    return _fresh(y, x, residual), mean, var


@batch_norm_train.register_fake
def _(x, weight, bias, residual, eps, act):
    c, sd = _channels(x), stat_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=memory_format_of(x))
    return y, x.new_empty(c, dtype=sd), x.new_empty(c, dtype=sd)


@torch.library.custom_op(f"{_LIB}::batch_norm_infer", mutates_args=())
def batch_norm_infer(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    act: str,
) -> Tensor:
    """BatchNorm with given statistics (eval mode): ``y = act(x·scale + shift + residual)``."""
    x = _dense(x)
    residual = _as_layout(residual, x)
    sd = stat_dtype(x.dtype)
    rstd = torch.rsqrt(_cast(var, sd) + eps)
    scale, shift = scale_shift(weight, bias, _cast(mean, sd), rstd)
    y = backends.resolve("channel_apply", x).channel_apply(x, scale, shift, residual, act)
    return _fresh(y, x, residual)


@batch_norm_infer.register_fake
def _(x, mean, var, weight, bias, residual, eps, act):
    return torch.empty_like(x, memory_format=memory_format_of(x))


@torch.library.custom_op(f"{_LIB}::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    act: str,
    batch_stats: bool,
    need_dresidual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of both BatchNorm forwards.

    ``batch_stats=True`` (training): ``dx = γ·rstd·(dz − mean(dz) − x̂·mean(dz·x̂))``;
    ``False`` (statistics were constants): ``dx = γ·rstd·dz``. Always ``dγ = Σ dz·x̂``,
    ``dβ = Σ dz``; ``dresidual = dz``.
    """
    x = _dense(x)
    dy = _as_layout(dy, x)
    residual = _as_layout(residual, x)
    sd = stat_dtype(x.dtype)
    mean, rstd = _cast(mean, sd), _cast(rstd, sd)
    scale, shift = scale_shift(weight, bias, mean, rstd)
    dx, sum_dz, sum_dz_xhat, dz = backends.resolve("channel_backward", x).channel_backward(
        x, dy, mean, rstd, scale, shift, residual, act, batch_stats, need_dresidual
    )
    dresidual = _fresh(dz, dy, x) if need_dresidual else _empty(x)
    return _fresh(dx, dy, x), sum_dz_xhat, sum_dz, dresidual


@batch_norm_backward.register_fake
def _(dy, x, mean, rstd, weight, bias, residual, act, batch_stats, need_dresidual):
    c, sd = _channels(x), stat_dtype(x.dtype)
    fmt = memory_format_of(x)
    dres = torch.empty_like(x, memory_format=fmt) if need_dresidual else x.new_empty(0, dtype=sd)
    return torch.empty_like(x, memory_format=fmt), x.new_empty(c, dtype=sd), x.new_empty(c, dtype=sd), dres


def _param_grad(g: Tensor, param: Tensor | None, needed: bool) -> Tensor | None:
    if param is None or not needed:
        return None
    return _cast(g, param.dtype)


def _setup_bn_train(ctx, inputs, output):
    x, weight, bias, residual, eps, act = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.act, ctx.batch_stats, ctx.has_residual = act, True, residual is not None
    ctx.save_for_backward(x, weight, bias, residual, mean, torch.rsqrt(var + eps))


def _setup_bn_infer(ctx, inputs, output):
    x, mean, var, weight, bias, residual, eps, act = inputs
    ctx.act, ctx.batch_stats, ctx.has_residual = act, False, residual is not None
    sd = stat_dtype(x.dtype)
    ctx.save_for_backward(x, weight, bias, residual, _cast(mean, sd), torch.rsqrt(_cast(var, sd) + eps))


def _bn_grads(ctx, dy):
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    need_res = ctx.has_residual and ctx.needs_input_grad[_bn_residual_index(ctx)]
    dx, dw, db, dres = torch.ops.normkit.batch_norm_backward(
        dy, x, mean, rstd, weight, bias, residual, ctx.act, ctx.batch_stats, need_res
    )
    return dx, dw, db, (dres if need_res else None), weight, bias


def _bn_residual_index(ctx) -> int:
    return 3 if ctx.batch_stats else 5


def _bn_train_backward(ctx, dy, _dmean, _dvar):
    dx, dw, db, dres, weight, bias = _bn_grads(ctx, dy)
    need = ctx.needs_input_grad
    return dx, _param_grad(dw, weight, need[1]), _param_grad(db, bias, need[2]), dres, None, None


def _bn_infer_backward(ctx, dy):
    dx, dw, db, dres, weight, bias = _bn_grads(ctx, dy)
    need = ctx.needs_input_grad
    return dx, None, None, _param_grad(dw, weight, need[3]), _param_grad(db, bias, need[4]), dres, None, None


torch.library.register_autograd(f"{_LIB}::batch_norm_train", _bn_train_backward, setup_context=_setup_bn_train)
torch.library.register_autograd(f"{_LIB}::batch_norm_infer", _bn_infer_backward, setup_context=_setup_bn_infer)


# ----------------------------------------------------------------------------- GroupNorm
@torch.library.custom_op(f"{_LIB}::group_norm", mutates_args=())
def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    act: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm: statistics per (sample, group) over ``C/G × spatial``; per-channel affine."""
    x = _dense(x)
    residual = _as_layout(residual, x)
    y, mean, var = backends.resolve("group_forward", x).group_forward(
        x, num_groups, weight, bias, eps, residual, act
    )
    return _fresh(y, x, residual), mean, var


@group_norm.register_fake
def _(x, num_groups, weight, bias, residual, eps, act):
    sd = stat_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=memory_format_of(x))
    return y, x.new_empty(x.shape[0], num_groups, dtype=sd), x.new_empty(x.shape[0], num_groups, dtype=sd)


@torch.library.custom_op(f"{_LIB}::group_norm_backward", mutates_args=())
def group_norm_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    act: str,
    need_dweight: bool,
    need_dresidual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GroupNorm backward: per group ``dx = rstd·(g − mean(g) − x̂·mean(g·x̂))``, ``g = γ·dz``."""
    x = _dense(x)
    dy = _as_layout(dy, x)
    residual = _as_layout(residual, x)
    dx, dw, db, dz = backends.resolve("group_backward", x).group_backward(
        x, dy, mean, rstd, num_groups, weight, bias, residual, act, need_dweight, need_dresidual
    )
    dw = dw if dw is not None else _empty(x)
    db = db if db is not None else _empty(x)
    dz = _fresh(dz, dy, x) if dz is not None else _empty(x)
    return _fresh(dx, dy, x), dw, db, dz


@group_norm_backward.register_fake
def _(dy, x, mean, rstd, num_groups, weight, bias, residual, act, need_dweight, need_dresidual):
    sd = stat_dtype(x.dtype)
    fmt = memory_format_of(x)
    c = x.shape[1]
    dw = x.new_empty(c if need_dweight else 0, dtype=sd)
    db = x.new_empty(c if need_dweight else 0, dtype=sd)
    dz = torch.empty_like(x, memory_format=fmt) if need_dresidual else x.new_empty(0, dtype=sd)
    return torch.empty_like(x, memory_format=fmt), dw, db, dz


def _setup_gn(ctx, inputs, output):
    x, num_groups, weight, bias, residual, eps, act = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.num_groups, ctx.act, ctx.has_residual = num_groups, act, residual is not None
    ctx.save_for_backward(x, weight, bias, residual, mean, torch.rsqrt(var + eps))


def _gn_backward(ctx, dy, _dmean, _dvar):
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dw = (weight is not None and need[2]) or (bias is not None and need[3])
    need_res = ctx.has_residual and need[4]
    dx, dw, db, dres = torch.ops.normkit.group_norm_backward(
        dy, x, mean, rstd, ctx.num_groups, weight, bias, residual, ctx.act, need_dw, need_res
    )
    return (
        dx,
        None,
        _param_grad(dw, weight, need[2]),
        _param_grad(db, bias, need[3]),
        dres if need_res else None,
        None,
        None,
    )


torch.library.register_autograd(f"{_LIB}::group_norm", _gn_backward, setup_context=_setup_gn)


# ----------------------------------------------------------------------------- LayerNorm / RMSNorm
def _rows(x: Tensor, normalized_shape: Sequence[int]) -> tuple[int, int]:
    k = math.prod(normalized_shape)
    return (x.numel() // k if k else 0), k


@torch.library.custom_op(f"{_LIB}::layer_norm", mutates_args=())
def layer_norm(
    x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the trailing ``normalized_shape``: per row ``y = γ·(x − μ)·rstd + β``."""
    m, k = _rows(x, normalized_shape)
    x2d = x.contiguous().view(m, k)
    w = weight.reshape(k) if weight is not None else None
    b = bias.reshape(k) if bias is not None else None
    y, mean, rstd = backends.resolve("row_forward", x2d).row_forward(x2d, w, b, eps, False)
    return _fresh(y.view(x.shape), x), mean, rstd


@layer_norm.register_fake
def _(x, normalized_shape, weight, bias, eps):
    m, _ = _rows(x, normalized_shape)
    sd = stat_dtype(x.dtype)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(m, dtype=sd), x.new_empty(m, dtype=sd)


@torch.library.custom_op(f"{_LIB}::rms_norm", mutates_args=())
def rms_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm over the trailing ``normalized_shape``: ``y = γ·x / sqrt(mean(x²) + ε)``."""
    m, k = _rows(x, normalized_shape)
    x2d = x.contiguous().view(m, k)
    w = weight.reshape(k) if weight is not None else None
    y, _, rstd = backends.resolve("row_forward", x2d).row_forward(x2d, w, None, eps, True)
    return _fresh(y.view(x.shape), x), rstd


@rms_norm.register_fake
def _(x, normalized_shape, weight, eps):
    m, _ = _rows(x, normalized_shape)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(m, dtype=stat_dtype(x.dtype))


@torch.library.custom_op(f"{_LIB}::row_norm_backward", mutates_args=())
def row_norm_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor | None,
    rstd: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    need_dweight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm (``mean`` given) or RMSNorm (``mean=None``) backward over rows."""
    m, k = _rows(x, normalized_shape)
    x2d = x.contiguous().view(m, k)
    dy2d = dy.contiguous().view(m, k)
    w = weight.reshape(k) if weight is not None else None
    dx, dw, db = backends.resolve("row_backward", x2d).row_backward(
        x2d, dy2d, mean, rstd, w, mean is None, need_dweight
    )
    dw = dw.view(normalized_shape) if dw is not None else _empty(x)
    db = db.view(normalized_shape) if db is not None else _empty(x)
    return _fresh(dx.view(x.shape), dy, x), dw, db


@row_norm_backward.register_fake
def _(dy, x, mean, rstd, normalized_shape, weight, need_dweight):
    sd = stat_dtype(x.dtype)
    shape = list(normalized_shape) if need_dweight else [0]
    bias_shape = shape if mean is not None else [0]  # RMSNorm has no bias
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return dx, x.new_empty(shape, dtype=sd), x.new_empty(bias_shape, dtype=sd)


def _setup_ln(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.normalized_shape = list(normalized_shape)
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dw = (weight is not None and need[2]) or (bias is not None and need[3])
    dx, dw, db = torch.ops.normkit.row_norm_backward(dy, x, mean, rstd, ctx.normalized_shape, weight, need_dw)
    return dx, None, _param_grad(dw, weight, need[2]), _param_grad(db, bias, need[3]), None


def _setup_rms(ctx, inputs, output):
    x, normalized_shape, weight, eps = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.normalized_shape = list(normalized_shape)
    ctx.save_for_backward(x, weight, rstd)


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[2]
    dx, dw, _ = torch.ops.normkit.row_norm_backward(dy, x, None, rstd, ctx.normalized_shape, weight, need_dw)
    return dx, None, _param_grad(dw, weight, ctx.needs_input_grad[2]), None


torch.library.register_autograd(f"{_LIB}::layer_norm", _ln_backward, setup_context=_setup_ln)
torch.library.register_autograd(f"{_LIB}::rms_norm", _rms_backward, setup_context=_setup_rms)

from . import ops_channels  # noqa: E402,F401  (torch.ops.normkit.layer_norm_2d*)
