"""``torch.ops.normkit.layer_norm_2d``: LayerNorm over the channels of an image, in place in its layout.

For ``x`` of shape ``(N, C, *spatial)`` (LayerNorm2d: ``(N, C, H, W)``), at every position
``(n, s)`` the ``C`` values ``x[n, :, s]`` are normalized (Ba et al., 2016, applied per pixel as
in ConvNeXt, Liu et al., CVPR 2022)::

    μ = 1/C Σ_c x[n, c, s],   σ² = 1/C Σ_c (x[n, c, s] − μ)²,   rstd = 1/sqrt(σ² + ε)
    y[n, c, s] = γ_c · (x[n, c, s] − μ)·rstd + β_c

which is ``permute → LayerNorm(C) → permute`` without the two permuted copies. Backward, with
``x̂ = (x − μ)·rstd`` and ``g = γ·dy`` (means over ``c``)::

    dx = rstd · (g − mean_c(g) − x̂ · mean_c(g·x̂)),   dγ = Σ_{n,s} dy·x̂,   dβ = Σ_{n,s} dy

| op                      | returns                                    |
|-------------------------|--------------------------------------------|
| layer_norm_2d           | y (x's layout), mean (N, *spatial), rstd (N, *spatial) |
| layer_norm_2d_backward  | dx (x's layout), dweight (C,), dbias (C,) (empty when not needed) |

The backends' entry points are ``ln2d_forward`` and ``ln2d_backward`` (documented in
:mod:`normkit.backends`). Input strides other than contiguous / channels_last are made
contiguous first; ``dy`` is brought to ``x``'s layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as C
from . import aten_path, backends
from ._layout import memory_format_of
from .ops import _differentiable_vjp, _is_eager, composite_backward, eager_call, eager_function
from .reference import stat_dtype

_LIB = "normkit"


def _dense(x: Tensor) -> Tensor:
    fmt = memory_format_of(x)
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous()


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _check(where: str, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    """What the kernels read must exist: checked at the op, whoever calls it."""
    C.check_tensor(where, "x", x)
    C.check_min_ndim(where, x, 2, "(N, C, *spatial)")
    C.check_vector(where, "weight", weight, x.shape[1])
    C.check_vector(where, "bias", bias, x.shape[1])


def channel_rows(x: torch.Tensor):
    """``(x2d, restore)``: ``x`` (N, C, *spatial) as the contiguous (N·S, C) matrix it already is in
    memory (channels_last, (N, C), or S = 1), and the function that views such a matrix back in
    ``x``'s shape and layout; ``None`` for NCHW input with S > 1 (channels are strided)."""
    perm = (0, *range(2, x.dim()), 1)
    xp = x.permute(perm)
    if not xp.is_contiguous():
        return None
    inverse = (0, x.dim() - 1, *range(1, x.dim() - 1))

    def restore(t2d: torch.Tensor) -> torch.Tensor:
        return t2d.view(xp.shape).permute(inverse)

    return xp.reshape(-1, x.shape[1]), restore


@torch.library.custom_op(f"{_LIB}::layer_norm_2d", mutates_args=())
def layer_norm_2d(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over dim 1 of ``(N, C, *spatial)`` at every position; output in ``x``'s layout."""
    _check("layer_norm_2d", x, weight, bias)
    y, mean, rstd = _forward_impl(x, weight, bias, eps)
    if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and x.numel():
        y = y.clone(memory_format=torch.preserve_format)
    return y, mean, rstd


def _forward_impl(x, weight, bias, eps):
    x = _dense(x)
    return backends.resolve("ln2d_forward", x).ln2d_forward(x, weight, bias, eps)


@layer_norm_2d.register_fake
def _(x, weight, bias, eps):
    stat_shape = (x.shape[0], *x.shape[2:])
    sd = stat_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=memory_format_of(x))
    return y, x.new_empty(stat_shape, dtype=sd), x.new_empty(stat_shape, dtype=sd)


@torch.library.custom_op(f"{_LIB}::layer_norm_2d_backward", mutates_args=())
def layer_norm_2d_backward(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, need_dweight: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`layer_norm_2d` (module docstring for the formulas)."""
    _check("layer_norm_2d_backward", x, weight, None)
    stat_shape = (x.shape[0], *x.shape[2:])
    for name, t in (("dy", dy), ("mean", mean), ("rstd", rstd)):
        want = tuple(x.shape) if name == "dy" else stat_shape
        if tuple(t.shape) != want:
            raise C.fail("layer_norm_2d_backward", name, f"shape {want}", C.shape_str(t))
    dx, dw, db = _backward_impl(dy, x, mean, rstd, weight, need_dweight)
    ptr = dx.untyped_storage().data_ptr()
    if dx.numel() and ptr in (x.untyped_storage().data_ptr(), dy.untyped_storage().data_ptr()):
        dx = dx.clone(memory_format=torch.preserve_format)
    return dx, dw, db


def _backward_impl(dy, x, mean, rstd, weight, need_dweight):
    x = _dense(x)
    dy = dy.contiguous(memory_format=memory_format_of(x))
    sd = stat_dtype(x.dtype)
    dx, dw, db = backends.resolve("ln2d_backward", x).ln2d_backward(
        x, dy, _cast(mean, sd), _cast(rstd, sd), weight, need_dweight
    )
    empty = x.new_empty(0, dtype=sd)
    return dx, (dw if dw is not None else empty), (db if db is not None else empty.clone())


@layer_norm_2d_backward.register_fake
def _(dy, x, mean, rstd, weight, need_dweight):
    sd = stat_dtype(x.dtype)
    c = x.shape[1] if need_dweight else 0
    dx = torch.empty_like(x, memory_format=memory_format_of(x))
    return dx, x.new_empty(c, dtype=sd), x.new_empty(c, dtype=sd)


def _setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.eps = eps
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if composite_backward(dy):  # double backward, or batched gradients: torch's operators
        def forward(x, weight, bias):
            return aten_path.layer_norm_2d(x, weight, bias, ctx.eps)

        return (*_differentiable_vjp(forward, (x, weight, bias), need[:3], dy), None)
    need_dw = (weight is not None and need[1]) or (bias is not None and need[2])
    backward = _backward_impl if _is_eager(ctx) else torch.ops.normkit.layer_norm_2d_backward
    dx, dw, db = backward(dy, x, mean, rstd, weight, need_dw)
    dweight = _cast(dw, weight.dtype) if weight is not None and need[1] else None
    dbias = _cast(db, bias.dtype) if bias is not None and need[2] else None
    return (dx if need[0] else None), dweight, dbias, None


torch.library.register_autograd(f"{_LIB}::layer_norm_2d", _backward, setup_context=_setup)

# the eager path (normkit.ops.eager_function): the same forward and formulas without the dispatcher
eager_layer_norm_2d = eager_call(eager_function("layer_norm_2d", _forward_impl, _setup, _backward), _forward_impl)
