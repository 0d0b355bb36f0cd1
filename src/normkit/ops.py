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

Every op checks the shapes and dtypes of everything it will read before any kernel runs,
whoever calls it (a module, a traced graph, a direct ``torch.ops.normkit.*`` call), and raises
:class:`normkit.NormInputError` on a mismatch: no kernel reads out of bounds.

The autograd formulas are first-order. When a backward runs with grad mode on (``create_graph=True``:
double backward, gradient penalties, Hessian-vector products), it does not call the backward op:
it recomputes the forward in torch's own operators from the saved inputs and differentiates that
(:func:`_differentiable_vjp`), so the gradient is itself differentiable (:mod:`normkit.route`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks as C
from . import activations, aten_path, backends
from ._layout import memory_format_of, own_tensor
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


dense = _dense  # (the name other modules use)


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


def _rows(x: Tensor, normalized_shape: Sequence[int]) -> tuple[int, int]:
    k = math.prod(normalized_shape)
    return (x.numel() // k if k else 0), k


# ----------------------------------------------------------------------------- checks at the op
def _op_fail(op: str, argument: str, expected: str, got: str) -> C.NormInputError:
    return C.fail(f"torch.ops.normkit.{op}", argument, expected, got)


def _check_x(op: str, x: Tensor, min_dim: int) -> None:
    if not x.is_floating_point():
        raise _op_fail(op, "x", "a floating-point tensor", str(x.dtype))
    if x.dim() < min_dim:
        raise _op_fail(op, "x", f"at least {min_dim} dimensions", C.shape_str(x))


def _check_sized(op: str, numel: int, what: str, **tensors: Tensor | None) -> None:
    """Each given tensor is floating point with exactly ``numel`` elements (``what`` says why)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_floating_point():
            raise _op_fail(op, name, "a floating-point tensor", str(t.dtype))
        if t.numel() != numel:
            raise _op_fail(op, name, f"{numel} elements ({what})", C.shape_str(t))


def _check_like_x(op: str, x: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape != x.shape:
            raise _op_fail(op, name, f"x's shape {tuple(x.shape)}", C.shape_str(t))
        if t is not None and not t.is_floating_point():
            raise _op_fail(op, name, "a floating-point tensor", str(t.dtype))


def _check_channel_op(op: str, x: Tensor, like_x: dict, per_channel: dict) -> None:
    _check_x(op, x, 2)
    _check_like_x(op, x, **like_x)
    _check_sized(op, _channels(x), "one per channel, x.shape[1]", **per_channel)


def _check_group_op(op: str, x: Tensor, num_groups: int, like_x: dict, per_channel: dict,
                    per_group: dict | None = None) -> None:
    _check_x(op, x, 2)
    c = x.shape[1]
    if num_groups <= 0 or c % num_groups != 0:
        raise _op_fail(op, "num_groups", f"a positive divisor of x.shape[1] = {c}", str(num_groups))
    _check_like_x(op, x, **like_x)
    _check_sized(op, c, "one per channel, x.shape[1]", **per_channel)
    _check_sized(op, x.shape[0] * num_groups, "one per (sample, group)", **(per_group or {}))


def _check_row_op(op: str, x: Tensor, normalized_shape: Sequence[int], like_x: dict, per_feature: dict,
                  per_row: dict | None = None) -> None:
    k = len(normalized_shape)
    if not x.is_floating_point():
        raise _op_fail(op, "x", "a floating-point tensor", str(x.dtype))
    if k == 0 or x.dim() < k or list(x.shape[x.dim() - k:]) != list(normalized_shape):
        raise _op_fail(op, "x", f"trailing dimensions {tuple(normalized_shape)} (normalized_shape)",
                       C.shape_str(x))
    _check_like_x(op, x, **like_x)
    m, n = _rows(x, normalized_shape)
    _check_sized(op, n, "one per normalized element", **per_feature)
    _check_sized(op, m, "one per row", **(per_row or {}))


# ----------------------------------------------------------------------------- higher order
_is_functorch_tensor = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def composite_backward(dy: Tensor) -> bool:
    """Whether a backward computes in torch's differentiable, batchable operators (:func:`_differentiable_vjp`)
    instead of the kernels: with grad mode on (``create_graph=True``: the gradient must be differentiable
    again) and for gradients the kernels cannot read — functorch's batched gradients
    (``torch.autograd.grad(..., is_grads_batched=True)``, ``torch.func.vmap`` over a backward)."""
    return torch.is_grad_enabled() or _is_functorch_tensor(dy)


def _differentiable_vjp(forward, inputs: tuple, needs: Sequence[bool], dy: Tensor) -> list[Tensor | None]:
    """The vector-Jacobian product of ``forward(*inputs)`` with ``dy``, as a differentiable graph.

    Called by a backward formula when grad mode is on (``create_graph=True``): ``forward`` is the
    op's forward in torch's own operators (:mod:`normkit.aten_path`), recomputed from the saved
    inputs — which still carry their autograd history — so the returned gradients can be
    differentiated again. One gradient per input, ``None`` where not needed.
    """
    pairs = enumerate(zip(inputs, needs, strict=True))
    wanted = [i for i, (t, need) in pairs if need and t is not None and t.requires_grad]
    out: list[Tensor | None] = [None] * len(inputs)
    if not wanted:
        return out
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        y = forward(*inputs)
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], dy, create_graph=create_graph,
                                    allow_unused=True)
    for i, g in zip(wanted, grads, strict=True):
        out[i] = g if g is not None else torch.zeros_like(inputs[i])
    return out


# ----------------------------------------------------------------------------- BatchNorm
@torch.library.custom_op(f"{_LIB}::batch_norm_train", mutates_args=())
def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float, act: str
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm with batch statistics: ``y = act(γ·(x − μ_B)/sqrt(σ²_B + ε) + β + residual)``."""
    _check_channel_op("batch_norm_train", x, {"residual": residual}, {"weight": weight, "bias": bias})
    y, mean, var = _bn_train_impl(x, weight, bias, residual, eps, act)
    return _fresh(y, x, residual), mean, var


def _bn_train_impl(x, weight, bias, residual, eps, act):
    x = _dense(x)
    residual = _as_layout(residual, x)
    return backends.resolve("channel_forward", x).channel_forward(x, weight, bias, eps, residual, act)


@batch_norm_train.register_fake
def _(x, weight, bias, residual, eps, act):
    _check_channel_op("batch_norm_train", x, {"residual": residual}, {"weight": weight, "bias": bias})
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
    _check_channel_op("batch_norm_infer", x, {"residual": residual},
                      {"mean": mean, "var": var, "weight": weight, "bias": bias})
    return _fresh(_bn_infer_impl(x, mean, var, weight, bias, residual, eps, act), x, residual)


def _bn_infer_impl(x, mean, var, weight, bias, residual, eps, act):
    x = _dense(x)
    if _native_for(x) is not None:
        # on the cpu backend torch.nn's own sequence, aten's eval BatchNorm → + residual → activation, as the
        # C++ eager op computes it: eval outputs are torch.nn's to the bit on every route (csrc/autograd.h)
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        return aten_path.finish(y, residual, act)
    residual = _as_layout(residual, x)
    sd = stat_dtype(x.dtype)
    rstd = torch.rsqrt(_cast(var, sd) + eps)
    scale, shift = scale_shift(weight, bias, _cast(mean, sd), rstd)
    return backends.resolve("channel_apply", x).channel_apply(x, scale, shift, residual, act)


@batch_norm_infer.register_fake
def _(x, mean, var, weight, bias, residual, eps, act):
    _check_channel_op("batch_norm_infer", x, {"residual": residual},
                      {"mean": mean, "var": var, "weight": weight, "bias": bias})
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
    _check_bn_backward(dy, x, mean, rstd, weight, bias, residual)
    dx, dw, db, dres = _bn_backward_impl(dy, x, mean, rstd, weight, bias, residual, act, batch_stats, need_dresidual)
    return _fresh(dx, dy, x), dw, db, (_fresh(dres, dy, x) if need_dresidual else dres)


def _bn_backward_impl(dy, x, mean, rstd, weight, bias, residual, act, batch_stats, need_dresidual):
    x = _dense(x)
    dy = _as_layout(dy, x)
    residual = _as_layout(residual, x)
    sd = stat_dtype(x.dtype)
    mean, rstd = _cast(mean, sd), _cast(rstd, sd)
    scale, shift = scale_shift(weight, bias, mean, rstd)
    if not batch_stats:
        # constant statistics: dx = γ·rstd·dz exactly, so a NaN or Inf in x reaches dγ (Σ dz·x̂) but
        # not dx, as in torch (the reference's and Triton's γ·rstd·(dz − x̂·0) would carry it; the cpu
        # kernels' constant-statistics loops give the same dx)
        if act == "":
            sum_dz, sum_dz_xhat = backends.resolve("channel_backward_reduce", x).channel_backward_reduce(
                x, dy, mean, rstd, scale, shift, residual, act
            )
            dz = dy
        else:
            _, sum_dz, sum_dz_xhat, dz = backends.resolve("channel_backward", x).channel_backward(
                x, dy, mean, rstd, scale, shift, residual, act, batch_stats, True
            )
        dx = (dz.to(sd) * scale.reshape((1, -1) + (1,) * (x.dim() - 2))).to(x.dtype)
        dx = _as_layout(dx, x)
        dz = dz if need_dresidual else None
    else:
        dx, sum_dz, sum_dz_xhat, dz = backends.resolve("channel_backward", x).channel_backward(
            x, dy, mean, rstd, scale, shift, residual, act, batch_stats, need_dresidual
        )
    return dx, sum_dz_xhat, sum_dz, (dz if need_dresidual else _empty(x))


def _check_bn_backward(dy, x, mean, rstd, weight, bias, residual):
    _check_channel_op("batch_norm_backward", x, {"dy": dy, "residual": residual},
                      {"mean": mean, "rstd": rstd, "weight": weight, "bias": bias})


@batch_norm_backward.register_fake
def _(dy, x, mean, rstd, weight, bias, residual, act, batch_stats, need_dresidual):
    _check_bn_backward(dy, x, mean, rstd, weight, bias, residual)
    c, sd = _channels(x), stat_dtype(x.dtype)
    fmt = memory_format_of(x)
    dres = torch.empty_like(x, memory_format=fmt) if need_dresidual else x.new_empty(0, dtype=sd)
    return torch.empty_like(x, memory_format=fmt), x.new_empty(c, dtype=sd), x.new_empty(c, dtype=sd), dres


def _param_grad(g: Tensor, param: Tensor | None, needed: bool) -> Tensor | None:
    if param is None or not needed:
        return None
    return _cast(g, param.dtype)


def _keeps_output(residual: Tensor | None, act: str) -> bool:
    """Whether ``act(norm(x) + residual)`` keeps its output for backward instead of the residual: with ReLU,
    ``dz = dy·[y > 0]`` is torch's own ReLU backward (``threshold_backward(dy, y, 0)``) and the residual's
    gradient, and the output is what the next layer keeps anyway (a convolution's input), where the
    residual may be a tensor nothing else keeps (a downsampling shortcut's BatchNorm output)."""
    return residual is not None and act == "relu"


def _kept(ctx, residual: Tensor | None, y: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(residual, output) to save: one of them (the other ``None``), as ``_keeps_output`` decides."""
    ctx.has_residual = residual is not None
    ctx.keeps_output = _keeps_output(residual, ctx.act)
    return (None, y) if ctx.keeps_output else (residual, None)


def _below_activation(ctx, dy: Tensor, y: Tensor | None) -> tuple[Tensor, str]:
    """(dy, act) for the rest of the backward: below a kept output's ReLU, ``(dz, "")``."""
    return (torch.ops.aten.threshold_backward(dy, y, 0), "") if ctx.keeps_output else (dy, ctx.act)


def _setup_bn_train(ctx, inputs, output):
    x, weight, bias, residual, eps, act = inputs
    y, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.act, ctx.eps, ctx.batch_stats = act, eps, True
    ctx.save_for_backward(x, weight, bias, *_kept(ctx, residual, y), mean, torch.rsqrt(var + eps), None)


def _setup_bn_infer(ctx, inputs, output):
    x, mean, var, weight, bias, residual, eps, act = inputs
    ctx.act, ctx.eps, ctx.batch_stats = act, eps, False
    sd = stat_dtype(x.dtype)
    ctx.save_for_backward(x, weight, bias, *_kept(ctx, residual, output), _cast(mean, sd),
                          torch.rsqrt(_cast(var, sd) + eps), var)


def _bn_grads(ctx, dy):
    """``(dx, dweight, dbias, dresidual)`` of either BatchNorm forward, each ``None`` where not needed."""
    x, weight, bias, residual, y, mean, rstd, var = ctx.saved_tensors
    need = ctx.needs_input_grad
    i = 1 if ctx.batch_stats else 3  # index of weight among the op's inputs
    need_x, need_w, need_b, need_res = need[0], need[i], need[i + 1], ctx.has_residual and need[i + 2]
    dz, act = _below_activation(ctx, dy, y)
    if composite_backward(dy):  # create_graph=True or batched gradients (module docstring)
        running = (None, None) if ctx.batch_stats else (mean, var)

        def forward(x, weight, bias, residual):
            return aten_path.batch_norm(x, *running, weight, bias, ctx.batch_stats, 0.0, ctx.eps, residual, act)

        dx, dw, db, dres = _differentiable_vjp(forward, (x, weight, bias, residual),
                                               (need_x, need_w, need_b, need_res and not ctx.keeps_output), dz)
    else:
        backward = _bn_backward_impl if _is_eager(ctx) else torch.ops.normkit.batch_norm_backward
        dx, dw, db, dres = backward(dz, x, mean, rstd, weight, bias, residual, act, ctx.batch_stats,
                                    need_res and not ctx.keeps_output)
        dx, dw, db = (dx if need_x else None), _param_grad(dw, weight, need_w), _param_grad(db, bias, need_b)
    if ctx.keeps_output:
        dres = dz
    return dx, dw, db, (dres if need_res else None)


def _bn_train_backward(ctx, dy, _dmean, _dvar):
    dx, dw, db, dres = _bn_grads(ctx, dy)
    return dx, dw, db, dres, None, None


def _bn_infer_backward(ctx, dy):
    dx, dw, db, dres = _bn_grads(ctx, dy)
    return dx, None, None, dw, db, dres, None, None


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
    _check_group_op("group_norm", x, num_groups, {"residual": residual}, {"weight": weight, "bias": bias})
    y, mean, var = _gn_impl(x, num_groups, weight, bias, residual, eps, act)
    return _fresh(y, x, residual), mean, var


def _gn_impl(x, num_groups, weight, bias, residual, eps, act):
    x = _dense(x)
    residual = _as_layout(residual, x)
    return backends.resolve("group_forward", x).group_forward(x, num_groups, weight, bias, eps, residual, act)


@group_norm.register_fake
def _(x, num_groups, weight, bias, residual, eps, act):
    _check_group_op("group_norm", x, num_groups, {"residual": residual}, {"weight": weight, "bias": bias})
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
    _check_gn_backward(dy, x, mean, rstd, num_groups, weight, bias, residual)
    dx, dw, db, dz = _gn_backward_impl(dy, x, mean, rstd, num_groups, weight, bias, residual, act, need_dweight,
                                       need_dresidual)
    return _fresh(dx, dy, x), dw, db, (_fresh(dz, dy, x) if need_dresidual else dz)


def _gn_backward_impl(dy, x, mean, rstd, num_groups, weight, bias, residual, act, need_dweight, need_dresidual):
    x = _dense(x)
    dy = _as_layout(dy, x)
    residual = _as_layout(residual, x)
    dx, dw, db, dz = backends.resolve("group_backward", x).group_backward(
        x, dy, mean, rstd, num_groups, weight, bias, residual, act, need_dweight, need_dresidual
    )
    dw = dw if dw is not None else _empty(x)
    db = db if db is not None else _empty(x)
    return dx, dw, db, (dz if dz is not None else _empty(x))


def _check_gn_backward(dy, x, mean, rstd, num_groups, weight, bias, residual):
    _check_group_op("group_norm_backward", x, num_groups, {"dy": dy, "residual": residual},
                    {"weight": weight, "bias": bias}, {"mean": mean, "rstd": rstd})


@group_norm_backward.register_fake
def _(dy, x, mean, rstd, num_groups, weight, bias, residual, act, need_dweight, need_dresidual):
    _check_gn_backward(dy, x, mean, rstd, num_groups, weight, bias, residual)
    sd = stat_dtype(x.dtype)
    fmt = memory_format_of(x)
    c = x.shape[1]
    dw = x.new_empty(c if need_dweight else 0, dtype=sd)
    db = x.new_empty(c if need_dweight else 0, dtype=sd)
    dz = torch.empty_like(x, memory_format=fmt) if need_dresidual else x.new_empty(0, dtype=sd)
    return torch.empty_like(x, memory_format=fmt), dw, db, dz


def _setup_gn(ctx, inputs, output):
    x, num_groups, weight, bias, residual, eps, act = inputs
    y, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.num_groups, ctx.eps, ctx.act = num_groups, eps, act
    ctx.save_for_backward(x, weight, bias, *_kept(ctx, residual, y), mean, torch.rsqrt(var + eps))


def _gn_backward(ctx, dy, _dmean, _dvar):
    x, weight, bias, residual, y, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_res = ctx.has_residual and need[4]
    dz, act = _below_activation(ctx, dy, y)
    if composite_backward(dy):  # create_graph=True or batched gradients (module docstring)
        def forward(x, weight, bias, residual):
            return aten_path.group_norm(x, ctx.num_groups, weight, bias, ctx.eps, residual, act)

        dx, dw, db, dres = _differentiable_vjp(forward, (x, weight, bias, residual),
                                               (need[0], need[2], need[3], need_res and not ctx.keeps_output), dz)
    else:
        need_dw = (weight is not None and need[2]) or (bias is not None and need[3])
        backward = _gn_backward_impl if _is_eager(ctx) else torch.ops.normkit.group_norm_backward
        dx, dw, db, dres = backward(dz, x, mean, rstd, ctx.num_groups, weight, bias, residual, act, need_dw,
                                    need_res and not ctx.keeps_output)
        dx, dw, db = (dx if need[0] else None), _param_grad(dw, weight, need[2]), _param_grad(db, bias, need[3])
    if ctx.keeps_output:
        dres = dz
    return dx, None, dw, db, (dres if need_res else None), None, None


torch.library.register_autograd(f"{_LIB}::group_norm", _gn_backward, setup_context=_setup_gn)


# ----------------------------------------------------------------------------- LayerNorm / RMSNorm

@torch.library.custom_op(f"{_LIB}::layer_norm", mutates_args=())
def layer_norm(
    x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the trailing ``normalized_shape``: per row ``y = γ·(x − μ)·rstd + β``."""
    _check_row_op("layer_norm", x, normalized_shape, {}, {"weight": weight, "bias": bias})
    y, mean, rstd = _ln_impl(x, normalized_shape, weight, bias, eps)
    return _fresh(y, x), mean, rstd


def _ln_impl(x, normalized_shape, weight, bias, eps):
    m, k = _rows(x, normalized_shape)
    x2d = x.contiguous().view(m, k)
    w = weight.reshape(k) if weight is not None else None
    b = bias.reshape(k) if bias is not None else None
    y, mean, rstd = backends.resolve("row_forward", x2d).row_forward(x2d, w, b, eps, False)
    return y.view(x.shape), mean, rstd


@layer_norm.register_fake
def _(x, normalized_shape, weight, bias, eps):
    _check_row_op("layer_norm", x, normalized_shape, {}, {"weight": weight, "bias": bias})
    m, _ = _rows(x, normalized_shape)
    sd = stat_dtype(x.dtype)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(m, dtype=sd), x.new_empty(m, dtype=sd)


@torch.library.custom_op(f"{_LIB}::rms_norm", mutates_args=())
def rms_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm over the trailing ``normalized_shape``: ``y = γ·x / sqrt(mean(x²) + ε)``."""
    _check_row_op("rms_norm", x, normalized_shape, {}, {"weight": weight})
    y, rstd = _rms_impl(x, normalized_shape, weight, eps)
    return _fresh(y, x), rstd


def _rms_impl(x, normalized_shape, weight, eps):
    m, k = _rows(x, normalized_shape)
    x2d = x.contiguous().view(m, k)
    w = weight.reshape(k) if weight is not None else None
    y, _, rstd = backends.resolve("row_forward", x2d).row_forward(x2d, w, None, eps, True)
    return y.view(x.shape), rstd


@rms_norm.register_fake
def _(x, normalized_shape, weight, eps):
    _check_row_op("rms_norm", x, normalized_shape, {}, {"weight": weight})
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
    _check_row_backward(dy, x, mean, rstd, normalized_shape, weight)
    dx, dw, db = _row_backward_impl(dy, x, mean, rstd, normalized_shape, weight, need_dweight)
    return _fresh(dx, dy, x), dw, db


def _row_backward_impl(dy, x, mean, rstd, normalized_shape, weight, need_dweight):
    m, k = _rows(x, normalized_shape)
    x2d = x.contiguous().view(m, k)
    dy2d = dy.contiguous().view(m, k)
    w = weight.reshape(k) if weight is not None else None
    dx, dw, db = backends.resolve("row_backward", x2d).row_backward(
        x2d, dy2d, mean, rstd, w, mean is None, need_dweight
    )
    dw = dw.view(normalized_shape) if dw is not None else _empty(x)
    db = db.view(normalized_shape) if db is not None else _empty(x)
    return dx.view(x.shape), dw, db


def _check_row_backward(dy, x, mean, rstd, normalized_shape, weight):
    _check_row_op("row_norm_backward", x, normalized_shape, {"dy": dy}, {"weight": weight},
                  {"mean": mean, "rstd": rstd})


@row_norm_backward.register_fake
def _(dy, x, mean, rstd, normalized_shape, weight, need_dweight):
    _check_row_backward(dy, x, mean, rstd, normalized_shape, weight)
    sd = stat_dtype(x.dtype)
    shape = list(normalized_shape) if need_dweight else [0]
    bias_shape = shape if mean is not None else [0]  # RMSNorm has no bias
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return dx, x.new_empty(shape, dtype=sd), x.new_empty(bias_shape, dtype=sd)


def _setup_ln(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.normalized_shape, ctx.eps = list(normalized_shape), eps
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if composite_backward(dy):  # create_graph=True or batched gradients (module docstring)
        def forward(x, weight, bias):
            return aten_path.layer_norm(x, ctx.normalized_shape, weight, bias, ctx.eps)

        dx, dw, db = _differentiable_vjp(forward, (x, weight, bias), (need[0], need[2], need[3]), dy)
        return dx, None, dw, db, None
    need_dw = (weight is not None and need[2]) or (bias is not None and need[3])
    backward = _row_backward_impl if _is_eager(ctx) else torch.ops.normkit.row_norm_backward
    dx, dw, db = backward(dy, x, mean, rstd, ctx.normalized_shape, weight, need_dw)
    return (dx if need[0] else None), None, _param_grad(dw, weight, need[2]), _param_grad(db, bias, need[3]), None


def _setup_rms(ctx, inputs, output):
    x, normalized_shape, weight, eps = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.normalized_shape, ctx.eps = list(normalized_shape), eps
    ctx.save_for_backward(x, weight, rstd)


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if composite_backward(dy):  # create_graph=True or batched gradients (module docstring)
        def forward(x, weight):
            return aten_path.rms_norm(x, ctx.normalized_shape, weight, ctx.eps)

        dx, dw = _differentiable_vjp(forward, (x, weight), (need[0], need[2]), dy)
        return dx, None, dw, None
    need_dw = weight is not None and need[2]
    backward = _row_backward_impl if _is_eager(ctx) else torch.ops.normkit.row_norm_backward
    dx, dw, _ = backward(dy, x, None, rstd, ctx.normalized_shape, weight, need_dw)
    return (dx if need[0] else None), None, _param_grad(dw, weight, need[2]), None


torch.library.register_autograd(f"{_LIB}::layer_norm", _ln_backward, setup_context=_setup_ln)
torch.library.register_autograd(f"{_LIB}::rms_norm", _rms_backward, setup_context=_setup_rms)



# ----------------------------------------------------------------------------- composite forms
# Each forward op in aten operators (the reference backend's formulas: two-pass statistics, x·scale + shift,
# the activation): what a program holding normkit ops decomposes to (normkit.tools.export).
_REFERENCE = ReferenceBackend()


def _bn_train_composite(x: Tensor, weight, bias, residual, eps: float, act: str):
    mean, var = _REFERENCE.channel_stats(x)
    scale, shift = scale_shift(weight, bias, mean, torch.rsqrt(var + eps))
    return _REFERENCE.channel_apply(x, scale, shift, residual, act), mean, var


def _bn_infer_composite(x: Tensor, mean, var, weight, bias, residual, eps: float, act: str):
    sd = stat_dtype(x.dtype)
    scale, shift = scale_shift(weight, bias, mean.to(sd), torch.rsqrt(var.to(sd) + eps))
    return _REFERENCE.channel_apply(x, scale, shift, residual, act)


def _group_norm_composite(x: Tensor, num_groups: int, weight, bias, residual, eps: float, act: str):
    return _REFERENCE.group_forward(x, num_groups, weight, bias, eps, residual, act)


def _rows_view(x: Tensor, normalized_shape) -> Tensor:
    k = 1
    for d in normalized_shape:
        k *= d
    return x.reshape(-1, k)


def _layer_norm_composite(x: Tensor, normalized_shape, weight, bias, eps: float):
    w = weight.reshape(-1) if weight is not None else None
    b = bias.reshape(-1) if bias is not None else None
    y, mean, rstd = _REFERENCE.row_forward(_rows_view(x, normalized_shape), w, b, eps, False)
    return y.reshape(x.shape), mean, rstd


def _rms_norm_composite(x: Tensor, normalized_shape, weight, eps: float):
    w = weight.reshape(-1) if weight is not None else None
    y, _, rstd = _REFERENCE.row_forward(_rows_view(x, normalized_shape), w, None, eps, True)
    return y.reshape(x.shape), rstd


def decompositions() -> dict:
    """``{torch.ops.normkit.<forward op>.default: the same function in aten operators}`` for the forward
    ops (batch_norm_train, batch_norm_infer, group_norm, layer_norm, rms_norm) — what an inference or
    training-mode forward graph that calls the ops directly contains."""
    n = torch.ops.normkit
    return {
        n.batch_norm_train.default: _bn_train_composite,
        n.batch_norm_infer.default: _bn_infer_composite,
        n.group_norm.default: _group_norm_composite,
        n.layer_norm.default: _layer_norm_composite,
        n.rms_norm.default: _rms_norm_composite,
    }


# ----------------------------------------------------------------------------- the eager path
def _is_eager(ctx) -> bool:
    """Whether this backward belongs to an eager call (:data:`eager`) rather than to a custom op."""
    return getattr(ctx, "eager", False)


def eager_function(name: str, impl, setup, backward_formula) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` with ``impl`` as forward and the op's own autograd formula.

    The custom ops cost about 100 µs of Python dispatch per call on torch 2.13
    (``torch.library.custom_op``'s wrappers; this Function costs about 20 µs). In plain eager mode
    nothing needs a dispatcher op, so where the C++ eager ops (``csrc/autograd.h``) cannot serve a
    call — the triton and reference backends, empty tensors, no extension — :data:`eager` runs
    the same forward, ``setup_context`` and backward formula through this leaner Function, whose
    backward calls the backward's implementation directly instead of the backward op.
    """

    # the classic form, forward(ctx, *args): on torch 2.13 a Function with a separate setup_context
    # costs 35 µs more per call (measured, 8 µs against 43 µs for a one-op Function)
    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            # a backend may return a view (the reference backend's reshaped rows): the output must be a
            # tensor of its own, or autograd refuses an in-place op on it afterwards
            output = tuple(map(own_tensor, output)) if isinstance(output, tuple) else own_tensor(output)
            ctx.eager = True
            setup(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward_formula(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"Eager_{name}"
    return Eager


def eager_call(function: type[torch.autograd.Function], impl):
    """``impl(*args)`` when no backward can follow (inference, no_grad), else ``function.apply(*args)``."""

    def call(*args):
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return impl(*args)

    return call


def _eager_op(name: str, impl, setup, backward_formula):
    return eager_call(eager_function(name, impl, setup, backward_formula), impl)


_python_ops = {
    "batch_norm_train": _eager_op("batch_norm_train", _bn_train_impl, _setup_bn_train, _bn_train_backward),
    "batch_norm_infer": _eager_op("batch_norm_infer", _bn_infer_impl, _setup_bn_infer, _bn_infer_backward),
    "group_norm": _eager_op("group_norm", _gn_impl, _setup_gn, _gn_backward),
    "layer_norm": _eager_op("layer_norm", _ln_impl, _setup_ln, _ln_backward),
    "rms_norm": _eager_op("rms_norm", _rms_impl, _setup_rms, _rms_backward),
}
_ACT_CODES = activations.codes()  # the kernels' activation codes


def native_ops():
    """``torch.ops.normkit_cpu`` when the ``cpu`` backend in force is the C++ extension with its eager
    ops (``csrc/autograd.h``), else None. Loading is the cpu backend's (once, on first use)."""
    return torch.ops.normkit_cpu if getattr(backends._instance("cpu"), "eager_ops", False) else None


def _native_for(x: Tensor):
    """The C++ eager ops (``torch.ops.normkit_cpu``) when they serve this call, else None: a non-empty
    CPU tensor under the ``auto`` or ``cpu`` backend (the kernels the cpu backend would run), the
    extension loaded."""
    if x.is_cpu and x.numel() > 0 and backends.current() in ("auto", "cpu"):
        return native_ops()
    return None


class _EagerOps:
    """The forward ops of ``torch.ops.normkit`` with the same signatures, for plain eager calls:
    :mod:`normkit.functional` calls these unless ``torch.compile`` is tracing, where the custom ops
    stay (one opaque node each, with fake kernels).

    On CPU they are the C++ operators of ``csrc/autograd.h`` (forward, backward and autograd
    without Python); elsewhere (the triton and reference backends, empty tensors, no extension),
    :func:`eager_function`'s Python Function over the same implementations.
    """

    @staticmethod
    def batch_norm_train(x, weight, bias, residual, eps, act):
        if (k := _native_for(x)) is not None:
            return k.bn_train.default(x, weight, bias, residual, eps, _ACT_CODES[act])
        return _python_ops["batch_norm_train"](x, weight, bias, residual, eps, act)

    @staticmethod
    def batch_norm_infer(x, mean, var, weight, bias, residual, eps, act):
        if (k := _native_for(x)) is not None:
            return k.bn_infer.default(x, mean, var, weight, bias, residual, eps, _ACT_CODES[act])
        return _python_ops["batch_norm_infer"](x, mean, var, weight, bias, residual, eps, act)

    @staticmethod
    def group_norm(x, num_groups, weight, bias, residual, eps, act):
        if (k := _native_for(x)) is not None:
            return k.gn.default(x, num_groups, weight, bias, residual, eps, _ACT_CODES[act])
        return _python_ops["group_norm"](x, num_groups, weight, bias, residual, eps, act)

    @staticmethod
    def layer_norm(x, normalized_shape, weight, bias, eps):
        if (k := _native_for(x)) is not None:
            return k.ln.default(x, normalized_shape, weight, bias, eps)
        return _python_ops["layer_norm"](x, normalized_shape, weight, bias, eps)

    @staticmethod
    def rms_norm(x, normalized_shape, weight, eps):
        if (k := _native_for(x)) is not None:
            return k.rms.default(x, normalized_shape, weight, eps)
        return _python_ops["rms_norm"](x, normalized_shape, weight, eps)

    # layer_norm_2d: set below, once normkit.ops_channels has defined it


eager = _EagerOps()


def current_ops():
    """``torch.ops.normkit`` while ``torch.compile`` traces, else :data:`eager` (same names and signatures)."""
    return torch.ops.normkit if torch.compiler.is_compiling() else eager


from . import ops_channels  # noqa: E402  (torch.ops.normkit.layer_norm_2d*)

_EagerOps.layer_norm_2d = staticmethod(ops_channels.eager_layer_norm_2d)
