"""In-place activated BatchNorm: the autograd of ``y = act(BatchNorm(x))`` saving only the output.

InPlace-ABN (Rota Bulò, Porzi & Kontschieder, "In-Place Activated BatchNorm for Memory-Optimized Training
of DNNs", CVPR 2018) keeps one tensor per layer for backward — the output ``y``, which the next convolution
keeps anyway — instead of BatchNorm's input and the activation's input: the backward inverts the activation
and the affine step to get ``x̂`` back. Here it computes exactly BatchNorm → activation with torch's ``γ``
(the ``inplace_abn`` package scales by ``|γ| + ε``):

    forward   μ, σ² of x per channel;  y = a(γ·x̂ + β),  x̂ = (x − μ)·rstd,  rstd = 1/sqrt(σ² + ε)
    backward  z = a⁻¹(y):  leaky ReLU  y ≥ 0 ? y : y/s;   ELU  y > 0 ? y : log1p(y/α);   identity  y
              x̂ = (z − β)/γ,   dz = dy·a'(z)
              dx = γ·rstd·(dz − mean(dz) − x̂·mean(dz·x̂)),   dγ = Σ dz·x̂,   dβ = Σ dz

**When inversion is exact.** ``x̂`` recovered from the stored ``y`` carries the rounding of ``y`` (one unit
``u`` of its dtype, relative to ``z``) amplified: ``|δx̂| ≤ u·|z|/|γ| ≤ u·(|x̂| + |β|/|γ|)`` for leaky ReLU and
identity; ELU's ``log1p`` near saturation adds ``u·(e^{−z} − 1 − |z|)/|γ|``. BatchNorm's own ``x̂`` has
``u·|x̂|``; the *excess* amplification ``|β|/|γ|`` is what inversion adds, and ELU's ``log1p`` near
saturation (``y → −α``) gives ``z`` back only to about ``u·(e^{−z} − 1)``. A call inverts only when every
channel's excess is at most :data:`INVERT_LIMIT`, for ELU its smallest ``z`` comes back to within
:data:`ELU_Z_ERROR` (both chosen by measurement, docs/inplace-abn.md), and the activation is invertible
(slope / α > 0). Otherwise — a channel with ``γ`` at or near 0, ELU deep in saturation, a zero slope — that
call keeps ``x`` (the ordinary fused BatchNorm + activation backward, from ``x``): silently correct; the
layer says so once (:func:`warn_fallback`).

**In place.** The forward writes ``y`` over ``x`` when the caller allows it (``in_place``: ``x`` is an
intermediate result of the autograd graph, not a leaf nor a view of one), marks ``x`` dirty and bumps its
version counter, so autograd raises its usual error if anything else saved ``x`` for its backward.

**Double backward** (``create_graph=True``, gradgradcheck) and batched gradients: the backward is then
computed in torch's differentiable operators — from the saved output ``y`` and the variance ``σ²`` (an output
of the forward, differentiable, so ``rstd``'s dependence on ``x`` is in the graph), which gives the same
function of ``(x, γ, β, dy)``; on the fallback, by recomputing BatchNorm → activation from ``x``.

The kernels are the backend's ``iabn_*`` entry points (:mod:`normkit.backends`): C++ on CPU
(``csrc/inplace_abn.h``), Triton on GPUs (``kernels/triton/inplace_abn.py``), torch in the reference backend.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import backends
from .backends import scale_shift
from .ops import _dense, composite_backward
from .reference import stat_dtype

__all__ = ["KINDS", "INVERT_LIMIT", "ELU_Z_ERROR", "kind_of", "refusal", "train", "can_write"]

#: the activation names of InPlace-ABN and the kernels' codes
KINDS = {"identity": 0, "leaky_relu": 1, "elu": 2}
IDENTITY, LEAKY, ELU = 0, 1, 2

#: A call inverts when every channel's excess amplification of the output's rounding, |β|/|γ|, is at most
#: this. Measured (scripts/iabn_inversion_error.py, docs/inplace-abn.md): up to 2 the float32 gradients' error
#: stays within about 3x torch's own BatchNorm → activation error on the same input in every regime tried
#: (2x in most), at 4 up to 8x, and beyond it grows in proportion to |β|/|γ|.
INVERT_LIMIT = 2.0

#: ELU inverts only where the smallest pre-activation of every channel comes back from the output to within
#: this (absolute): float32 gradients stay at their |β|/|γ| = 0 error ratio up to it (z ≥ −7.6), then grow
#: with e^{−z} (4x at z = −9, 17x at −10.6). In float16/bfloat16 it holds only for z above −0.3 / −0.03.
ELU_Z_ERROR = 2.0 ** -13


def kind_of(activation: str) -> int:
    return KINDS[activation]


def refusal(kind: int, param: float, weight: Tensor | None, bias: Tensor | None) -> str | None:
    """Why a call cannot invert, from the activation and the parameters alone (None: it can, for leaky
    ReLU and identity; ELU adds :func:`_elu_refusal` on the batch's range)."""
    if kind != IDENTITY and not param > 0:
        name = "leaky_relu's negative_slope" if kind == LEAKY else "elu's alpha"
        return f"{name} is {param!r}: the activation is not invertible"
    if weight is None:
        return None
    with torch.no_grad():
        gamma = weight.detach().abs()
        beta = bias.detach().abs() if bias is not None else torch.zeros_like(gamma)
        if bool((beta <= INVERT_LIMIT * gamma).all()):  # (the common case: five small ops)
            return None
        excess = beta.to(torch.float64) / gamma.to(torch.float64)  # inf where γ = 0, NaN for 0/0
        c = int((~(excess <= INVERT_LIMIT)).nonzero()[0, 0]) if bool((~(excess <= INVERT_LIMIT)).any()) else 0
    return (f"channel {c} has γ = {float(gamma[c]):.3g}, |β| = {float(beta[c]):.3g}: "
            f"|β|/|γ| = {float(excess[c]):.3g} > {INVERT_LIMIT:g}, inverting would amplify the output's rounding")


def _elu_refusal(x: Tensor, weight, bias, mean: Tensor, rstd: Tensor, alpha: float) -> str | None:
    """ELU's saturation on this batch: near ``y = −α`` the stored output keeps few bits of ``α + y = α·e^z``,
    and ``log1p`` gives ``z`` back with an absolute error of about ``u·(e^{−z} − 1)`` (``u`` the unit roundoff
    of x's dtype). Refused when that error at a channel's smallest ``z`` exceeds :data:`ELU_Z_ERROR`."""
    dims = [0, *range(2, x.dim())]
    sd = torch.float64
    lo, hi = x.detach().amin(dim=dims).to(sd), x.detach().amax(dim=dims).to(sd)
    gamma = weight.detach().to(sd) if weight is not None else torch.ones_like(lo)
    beta = bias.detach().to(sd) if bias is not None else torch.zeros_like(lo)
    m, r = mean.detach().to(sd), rstd.detach().to(sd)
    z_lo = torch.minimum(gamma * (lo - m) * r, gamma * (hi - m) * r) + beta
    u = torch.finfo(x.dtype).eps / 2
    error = u * torch.expm1((-z_lo).clamp(min=0))
    bad = ~(error <= ELU_Z_ERROR)
    if not bool(bad.any()):
        return None
    c = int(bad.nonzero()[0, 0])
    return (f"channel {c}: ELU saturates in {x.dtype} (smallest pre-activation {float(z_lo[c]):.3g}: the output "
            f"gives it back only to ±{float(error[c]):.2g} > {ELU_Z_ERROR:.2g})")


def can_write(x: Tensor) -> bool:
    """Whether the forward may write its output over ``x``: an intermediate of the autograd graph (it has a
    ``grad_fn``), not a view of a leaf, dense in its layout. Leaves are the caller's own tensors (data, or
    parameters autograd refuses to change in place); without grad there is no graph to save memory from."""
    if x.grad_fn is None:
        return False
    base = x._base
    if base is not None and base.grad_fn is None:  # a view of a leaf
        return False
    return _dense(x) is x


# ----------------------------------------------------------------------------- the autograd Function
def _count(x: Tensor) -> int:
    return x.numel() // x.shape[1]


def _backward_from_output(y, var, weight, bias, dy, dvar, kind, param, eps, count, dims):
    """BatchNorm → activation's gradients from the output, in torch's differentiable operators (module
    docstring): (dx, dγ, dβ)."""
    sd = var.dtype
    shape = (1, -1) + (1,) * (y.dim() - 2)
    yy, g = y.to(sd), dy.to(sd)
    if kind == LEAKY:
        pos = yy > 0
        z = torch.where(pos, yy, yy / param)
        dz = torch.where(pos, g, g * param)
    elif kind == ELU:
        pos = yy > 0
        z = torch.where(pos, yy, torch.log1p(torch.where(pos, torch.zeros_like(yy), yy) / param))
        dz = torch.where(pos, g, g * (yy + param))
    else:
        z, dz = yy, g
    gamma = weight.to(sd).reshape(shape) if weight is not None else None
    beta = bias.to(sd).reshape(shape) if bias is not None else None
    xhat = z if beta is None else z - beta
    xhat = xhat if gamma is None else xhat / gamma
    rstd = torch.rsqrt(var + eps).reshape(shape)
    dz_xhat = dz * xhat
    scale = rstd if gamma is None else gamma * rstd
    dx = scale * (dz - dz.mean(dim=dims, keepdim=True) - xhat * dz_xhat.mean(dim=dims, keepdim=True))
    if dvar is not None:
        dx = dx + dvar.to(sd).reshape(shape) * (2.0 / count) * xhat / rstd
    return dx.to(y.dtype), dz_xhat.sum(dim=dims), dz.sum(dim=dims)


def _composite(x, weight, bias, eps, kind, param):
    """BatchNorm → activation in torch's operators: (y, biased batch variance)."""
    y = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if kind == LEAKY:
        y = torch.nn.functional.leaky_relu(y, param)
    elif kind == ELU:
        y = torch.nn.functional.elu(y, param)
    dims = [0, *range(2, x.dim())]
    xs = x.to(stat_dtype(x.dtype))
    return y, (xs - xs.mean(dim=dims, keepdim=True)).square().mean(dim=dims)


class _InPlaceABN(torch.autograd.Function):
    """(x, γ, β) → (y, mean, var); ``plan`` (a dict) carries the options in and the decision out."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan):
        y, mean, var, inverted = _forward(x, weight, bias, plan)
        if y is x:
            torch.autograd.graph.increment_version(x)
            ctx.mark_dirty(x)
        ctx.mark_non_differentiable(mean)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y if inverted else x, weight, bias, mean, var)
        ctx.inverted, ctx.plan = inverted, plan
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, dvar):
        src, weight, bias, mean, var = ctx.saved_tensors
        plan = ctx.plan
        need = ctx.needs_input_grad
        kind, param, eps = plan["kind"], plan["param"], plan["eps"]
        dims = [0, *range(2, src.dim())]
        if dy is None and dvar is None:
            return None, None, None, None
        if dy is None:
            dy = torch.zeros_like(src)
        if composite_backward(dy):  # create_graph=True or batched gradients: torch's operators
            if plan.get("sync"):
                raise NotImplementedError("InPlaceABNSync: double backward (create_graph=True) across ranks is not "
                                          "supported (nor is it by SyncBatchNorm)")
            if ctx.inverted:
                dx, dw, db = _backward_from_output(src, var, weight, bias, dy, dvar, kind, param, eps, plan["count"],
                                                   dims)
                return (dx if need[0] else None, _param(dw, weight, need[1]), _param(db, bias, need[2]), None)
            return (*_vjp_composite(src, weight, bias, dy, dvar, plan, need), None)
        dx, dw, db = _kernel_backward(src, dy, weight, bias, mean, var, plan, ctx.inverted, need[0])
        if dvar is not None and need[0]:  # (only inside a double backward's graph)
            xhat = _xhat_of(src, weight, bias, mean, var, plan, ctx.inverted)
            rstd = torch.rsqrt(var.to(xhat.dtype) + eps).reshape((1, -1) + (1,) * (src.dim() - 2))
            dx = dx + (dvar.to(xhat.dtype).reshape(rstd.shape) * (2.0 / plan["count"]) * xhat / rstd).to(dx.dtype)
        return dx if need[0] else None, _param(dw, weight, need[1]), _param(db, bias, need[2]), None


def _param(g, param, needed):
    return g.to(param.dtype) if needed and param is not None and g is not None else None


def _vjp_composite(x, weight, bias, dy, dvar, plan, need):
    """The fallback's double backward: BatchNorm → activation recomputed from x in torch's ops, differentiated."""
    inputs = [t for t, n in zip((x, weight, bias), need[:3], strict=True) if n and t is not None]
    if not inputs:
        return None, None, None
    with torch.enable_grad():
        y, var = _composite(x, weight, bias, plan["eps"], plan["kind"], plan["param"])
        outs, grads = [y], [dy]
        if dvar is not None:
            outs.append(var)
            grads.append(dvar)
        got = iter(torch.autograd.grad(outs, inputs, grads, create_graph=torch.is_grad_enabled(), allow_unused=True))
    res = []
    for t, n in zip((x, weight, bias), need[:3], strict=True):
        g = next(got) if n and t is not None else None
        res.append(torch.zeros_like(t) if g is None and n and t is not None else g)
    return tuple(res)


def _xhat_of(src, weight, bias, mean, var, plan, inverted):
    """x̂ from the saved source in torch's operators (the rare dvar term of a double backward)."""
    sd = var.dtype
    shape = (1, -1) + (1,) * (src.dim() - 2)
    if not inverted:
        return (src.to(sd) - mean.to(sd).reshape(shape)) * torch.rsqrt(var + plan["eps"]).reshape(shape)
    y = src.to(sd)
    kind, param = plan["kind"], plan["param"]
    if kind == LEAKY:
        z = torch.where(y > 0, y, y / param)
    elif kind == ELU:
        z = torch.where(y > 0, y, torch.log1p(torch.clamp(y, max=0) / param))
    else:
        z = y
    if bias is not None:
        z = z - bias.to(sd).reshape(shape)
    return z if weight is None else z / weight.to(sd).reshape(shape)


# ----------------------------------------------------------------------------- forward and backward
def _forward(x: Tensor, weight, bias, plan: dict):
    """(y, mean, var, inverted): the statistics (merged over ranks for Sync), the decision, the output."""
    kind, param, eps = plan["kind"], plan["param"], plan["eps"]
    invert = plan["refusal"] is None
    write = plan["in_place"] and invert
    if not plan.get("sync") and kind != ELU:
        y, mean, var = backends.resolve("iabn_forward", x).iabn_forward(x, weight, bias, eps, kind, param, write)
        plan["count"] = _count(x)
        return y, mean, var, invert
    from . import channel

    count, mean, var = channel.local_stats(x, for_merge=bool(plan.get("sync")))
    if plan.get("sync"):
        from . import distributed

        count, mean, var = distributed.merge_stats(count, mean, var, plan["group"])
        mean = mean.to(var.dtype)
        plan["check_count"](count)
    plan["count"] = count
    rstd = torch.rsqrt(var + eps)
    if invert and kind == ELU and x.numel():
        reason = _elu_refusal(x, weight, bias, mean, rstd, param)
        if reason is not None:
            plan["refusal"], invert, write = reason, False, False
    if x.numel() == 0:
        return torch.empty_like(x), mean, var, invert
    scale, shift = scale_shift(weight, bias, mean, rstd)
    y = backends.resolve("iabn_apply", x).iabn_apply(x, scale, shift, kind, param, write)
    return y, mean, var, invert


def _kernel_backward(src, dy, weight, bias, mean, var, plan, inverted, need_dx):
    """(dx or None, dγ, dβ) on the backend's kernels (local sums all-reduced between them for Sync)."""
    kind, param, eps = plan["kind"], plan["param"], plan["eps"]
    dy = dy.contiguous(memory_format=_format(src)) if dy.stride() != src.stride() else dy
    rstd = torch.rsqrt(var + eps)
    if src.numel() == 0 and not plan.get("sync"):
        zeros = torch.zeros_like(var)
        return torch.empty_like(src), zeros, zeros.clone()
    if not plan.get("sync"):
        be = backends.resolve("iabn_backward", src)
        dx, sum_dz, sum_dz_xhat = be.iabn_backward(src, dy, mean, rstd, weight, bias, kind, param, inverted, need_dx)
        return dx, sum_dz_xhat, sum_dz
    from .distributed import all_reduce_sums

    be = backends.resolve("iabn_backward_reduce", src)
    if src.numel() == 0:  # a rank without samples still takes part in the collective
        sum_dz, sum_dz_xhat = torch.zeros_like(var), torch.zeros_like(var)
    else:
        sum_dz, sum_dz_xhat = be.iabn_backward_reduce(src, dy, mean, rstd, weight, bias, kind, param, inverted)
    total_dz, total_dz_xhat = all_reduce_sums(sum_dz, sum_dz_xhat, plan["group"])
    dx = None
    if need_dx and src.numel() == 0:
        dx = torch.empty_like(src)
    elif need_dx:
        count = max(plan["count"], 1)
        dx = be.iabn_backward_dx(src, dy, mean, rstd, weight, bias, kind, param, inverted,
                                 total_dz.to(torch.float64) / count, total_dz_xhat.to(torch.float64) / count)
    return dx, sum_dz_xhat, sum_dz


def _format(x: Tensor) -> torch.memory_format:
    from ._layout import memory_format_of

    return memory_format_of(x)


def train(x: Tensor, weight, bias, eps: float, kind: int, param: float, refusal_: str | None, in_place: bool,
          sync: bool = False, group=None, check_count=None) -> tuple[Tensor, Tensor, Tensor, int, str | None]:
    """Training-mode InPlace-ABN on the kernels: ``(y, mean, var, count, refusal)`` — the batch statistics
    (over all ranks of ``group`` when ``sync``), the values per channel they cover, and why the call kept
    ``x`` (None: it inverted). ``refusal_`` is :func:`refusal`'s answer for the parameters; ``in_place``
    allows writing ``y`` over ``x`` (:func:`can_write`)."""
    plan = {"kind": kind, "param": float(param), "eps": float(eps), "refusal": refusal_, "in_place": in_place,
            "sync": sync, "group": group, "check_count": check_count}
    x = x if in_place else _dense(x)
    needs = torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad
                                                                 for t in (weight, bias)))
    if needs:
        y, mean, var = _InPlaceABN.apply(x, weight, bias, plan)
    else:
        with torch.no_grad():
            y, mean, var, _ = _forward(x, weight, bias, plan)
    return y, mean.detach(), var.detach(), plan["count"], plan["refusal"]


def warn_fallback(layer, reason: str) -> None:
    """Say once per layer that a call kept x instead of inverting (the result is exact either way)."""
    if getattr(layer, "_iabn_warned", False):
        return
    layer._iabn_warned = True
    warnings.warn(f"{type(layer).__name__}({layer.num_features}): this call keeps its input for backward instead "
                  f"of inverting the output ({reason}); the result is exact, only the memory saving is lost. "
                  "(Said once per layer.)", RuntimeWarning, stacklevel=4)

