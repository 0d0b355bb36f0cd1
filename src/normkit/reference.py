"""The reference backend: the normalization math in plain, readable torch.

It is the oracle every kernel is tested against, the baseline of the benchmark, and the
backend of last resort. It runs on any device and any floating dtype; float16/bfloat16 input is
computed in float32 and float64 input in float64 (the "stat dtype"). Statistics are two-pass
(mean first, then the mean of squared deviations), so a large mean costs no precision; the mean is
taken of the values shifted by the first one of their set (:func:`shifted_mean`), as the kernels
shift, so a constant set has its value as mean exactly and a variance of exactly 0.

Formulas (DESIGN.md §1), for a reduction set of ``m`` values:

    μ = 1/m Σ xᵢ,   σ² = 1/m Σ (xᵢ − μ)²,   rstd = 1/sqrt(σ² + ε),   x̂ = (x − μ)·rstd
    y = act(γ·x̂ + β + residual)
    dz = dy·act'(z)
    dx = γ·rstd·(dz − mean(dz) − x̂·mean(dz·x̂)),   dγ = Σ dz·x̂,   dβ = Σ dz
"""

from __future__ import annotations

import math

import torch

from . import activations
from ._layout import memory_format_of
from .backends import Backend

ACTIVATIONS = activations.names()  # ("", "relu", "silu", ...; `in` takes "leaky_relu:0.2"): normkit.activations


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def activation(z: torch.Tensor, act: str) -> torch.Tensor:
    """``act(z)`` by torch's own function for ``act`` (see :mod:`normkit.activations`)."""
    return activations.get(act).torch_fn(z)


def activation_grad(z: torch.Tensor, act: str) -> torch.Tensor:
    """``act'(z)``, elementwise (the formulas of :mod:`normkit.activations`)."""
    return activations.get(act).derivative(z)


def shifted_mean(xs: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """The mean of ``xs`` over ``dims`` (kept), as ``p + mean(xs − p)`` with ``p`` the first value of each
    set: exact for a constant set (``mean(xs) = Σ/m`` need not give back the value), otherwise within
    rounding of the plain mean."""
    if xs.numel() == 0:  # no first value: the plain mean (NaN for an empty set, as torch's)
        return xs.mean(dim=dims, keepdim=True)
    pivot = xs
    for d in dims:
        pivot = pivot.narrow(d, 0, 1)
    return pivot + (xs - pivot).mean(dim=dims, keepdim=True)


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C,) vector shaped to broadcast over (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


class ReferenceBackend(Backend):
    name = "reference"

    def unsupported(self, op: str, x: torch.Tensor) -> str | None:
        if not x.is_floating_point():
            return f"expected a floating-point tensor, got {x.dtype}"
        return None

    # ---------------------------------------------------------------- channel family (BN)
    def channel_stats(self, x):
        xs = x.to(stat_dtype(x.dtype))
        dims = _channel_dims(x)
        mean = shifted_mean(xs, dims)
        var = (xs - mean).square().mean(dim=dims)
        return mean.reshape(-1), var

    def _pre_activation(self, x, scale, shift, residual):
        sd = scale.dtype
        z = x.to(sd) * _per_channel(scale, x.dim()) + _per_channel(shift, x.dim())
        if residual is not None:
            z = z + residual.to(sd)
        return z

    def channel_apply(self, x, scale, shift, residual, act):
        z = self._pre_activation(x, scale, shift, residual)
        return _like(activation(z, act), x)

    def _dz(self, x, dy, scale, shift, residual, act):
        dy = dy.to(scale.dtype)
        if act == "":
            return dy
        return dy * activation_grad(self._pre_activation(x, scale, shift, residual), act)

    def channel_backward_reduce(self, x, dy, mean, rstd, scale, shift, residual, act):
        dz = self._dz(x, dy, scale, shift, residual, act)
        xhat = (x.to(mean.dtype) - _per_channel(mean, x.dim())) * _per_channel(rstd, x.dim())
        dims = _channel_dims(x)
        return dz.sum(dim=dims), (dz * xhat).sum(dim=dims)

    def channel_backward_dx(self, x, dy, mean, rstd, scale, shift, residual, act, mean_dz, mean_dz_xhat,
                            need_dz):
        dz = self._dz(x, dy, scale, shift, residual, act)
        nd = x.dim()
        xhat = (x.to(mean.dtype) - _per_channel(mean, nd)) * _per_channel(rstd, nd)
        dx = _per_channel(scale, nd) * (dz - _per_channel(mean_dz, nd) - xhat * _per_channel(mean_dz_xhat, nd))
        return _like(dx, x), (_like(dz, x) if need_dz else None)

    # ---------------------------------------------------------------- row family (LN, RMS)
    def row_forward(self, x2d, weight, bias, eps, rms):
        sd = stat_dtype(x2d.dtype)
        xs = x2d.to(sd)
        if rms:
            mean = None
            rstd = torch.rsqrt(xs.square().mean(dim=1) + eps)
            xhat = xs * rstd[:, None]
        else:
            mean = shifted_mean(xs, [1])
            centred = xs - mean
            rstd = torch.rsqrt(centred.square().mean(dim=1) + eps)
            xhat = centred * rstd[:, None]
            mean = mean.reshape(-1)
        y = xhat
        if weight is not None:
            y = y * weight.to(sd)
        if bias is not None:
            y = y + bias.to(sd)
        return y.to(x2d.dtype), mean, rstd

    def row_backward(self, x2d, dy2d, mean, rstd, weight, rms, need_dweight):
        sd = rstd.dtype
        xs, dy = x2d.to(sd), dy2d.to(sd)
        xhat = (xs if rms else xs - mean[:, None]) * rstd[:, None]
        g = dy * weight.to(sd) if weight is not None else dy
        proj = (g * xhat).mean(dim=1, keepdim=True)
        centred_g = g if rms else g - g.mean(dim=1, keepdim=True)
        dx = rstd[:, None] * (centred_g - xhat * proj)
        dweight = (dy * xhat).sum(dim=0) if need_dweight else None
        dbias = dy.sum(dim=0) if need_dweight and not rms else None
        return dx.to(x2d.dtype), dweight, dbias

    # ---------------------------------------------------------------- row family (GN, IN)
    def _grouped(self, x, num_groups):
        """(N, C, *) viewed as (N, G, C/G, S) in stat dtype (a copy for channels_last input)."""
        n, c = x.shape[:2]
        return x.to(stat_dtype(x.dtype)).reshape(n, num_groups, c // num_groups, _spatial(x))

    def _group_xhat(self, x, mean, rstd, num_groups):
        xg = self._grouped(x, num_groups)
        return (xg - mean[:, :, None, None]) * rstd[:, :, None, None]

    def _group_affine(self, x, xhat_g, weight, bias, residual):
        n, c = x.shape[:2]
        z = xhat_g.reshape(n, c, _spatial(x))
        if weight is not None:
            z = z * weight.to(z.dtype)[None, :, None]
        if bias is not None:
            z = z + bias.to(z.dtype)[None, :, None]
        z = z.reshape(x.shape)
        if residual is not None:
            z = z + residual.to(z.dtype)
        return z

    def group_forward(self, x, num_groups, weight, bias, eps, residual, act):
        xg = self._grouped(x, num_groups)
        mean = shifted_mean(xg, [2, 3])
        var = (xg - mean).square().mean(dim=(2, 3))
        mean = mean.reshape(var.shape)
        rstd = torch.rsqrt(var + eps)
        z = self._group_affine(x, self._group_xhat(x, mean, rstd, num_groups), weight, bias, residual)
        return _like(activation(z, act), x), mean, var

    def group_backward(self, x, dy, mean, rstd, num_groups, weight, bias, residual, act, need_dweight,
                       need_dz):
        n, c = x.shape[:2]
        sd = rstd.dtype
        xhat_g = self._group_xhat(x, mean, rstd, num_groups)
        dz = dy.to(sd)
        if act != "":
            dz = dz * activation_grad(self._group_affine(x, xhat_g, weight, bias, residual), act)
        dz_c = dz.reshape(n, c, _spatial(x))
        xhat_c = xhat_g.reshape(n, c, _spatial(x))
        g = dz_c * weight.to(sd)[None, :, None] if weight is not None else dz_c
        g = g.reshape(xhat_g.shape)
        dx = rstd[:, :, None, None] * (
            g - g.mean(dim=(2, 3), keepdim=True) - xhat_g * (g * xhat_g).mean(dim=(2, 3), keepdim=True)
        )
        dweight = (dz_c * xhat_c).sum(dim=(0, 2)) if need_dweight else None
        dbias = dz_c.sum(dim=(0, 2)) if need_dweight else None
        return (_like(dx.reshape(x.shape), x), dweight, dbias, _like(dz.reshape(x.shape), x) if need_dz else None)


    # ---------------------------------------------------------------- LayerNorm over channels (2d)
    def ln2d_forward(self, x, weight, bias, eps):
        xs = x.to(stat_dtype(x.dtype))
        mean = shifted_mean(xs, [1])
        centred = xs - mean
        mean = mean.squeeze(1)
        rstd = torch.rsqrt(centred.square().mean(dim=1) + eps)
        y = centred * rstd.unsqueeze(1)
        if weight is not None:
            y = y * _per_channel(weight.to(xs.dtype), x.dim())
        if bias is not None:
            y = y + _per_channel(bias.to(xs.dtype), x.dim())
        return _like(y, x), mean, rstd

    def ln2d_backward(self, x, dy, mean, rstd, weight, need_dweight):
        sd = rstd.dtype
        dys = dy.to(sd)
        xhat = (x.to(sd) - mean.unsqueeze(1)) * rstd.unsqueeze(1)
        g = dys * _per_channel(weight.to(sd), x.dim()) if weight is not None else dys
        dx = rstd.unsqueeze(1) * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
        if not need_dweight:
            return _like(dx, x), None, None
        dims = _channel_dims(x)
        return _like(dx, x), (dys * xhat).sum(dim=dims), dys.sum(dim=dims)

    # ---------------------------------------------------------------- in-place activated BatchNorm
    def iabn_apply(self, x, scale, shift, kind, param, in_place):
        z = self._pre_activation(x, scale, shift, None)
        y = _iabn_act(z, kind, param)
        if in_place:
            return x.copy_(y)
        return _like(y, x)

    def _iabn_dz_xhat(self, src, dy, mean, rstd, weight, bias, kind, param, from_output):
        """(dz, x̂, scale) in stat dtype: from the output y (a⁻¹, then (z − β)/γ) or the input x."""
        sd = rstd.dtype
        nd = src.dim()
        s, g = src.to(sd), dy.to(sd)
        scale = rstd if weight is None else weight.to(sd) * rstd
        if from_output:
            pos = s > 0
            if kind == 1:
                z, dz = torch.where(pos, s, s / param), torch.where(pos, g, g * param)
            elif kind == 2:
                z = torch.where(pos, s, torch.log1p(torch.clamp(s, max=0) / param))
                dz = torch.where(pos, g, g * (s + param))
            else:
                z, dz = s, g
            xhat = z if bias is None else z - _per_channel(bias.to(sd), nd)
            xhat = xhat if weight is None else xhat / _per_channel(weight.to(sd), nd)
        else:
            xhat = (s - _per_channel(mean.to(sd), nd)) * _per_channel(rstd, nd)
            z = xhat * _per_channel(weight.to(sd), nd) if weight is not None else xhat
            z = z if bias is None else z + _per_channel(bias.to(sd), nd)
            if kind == 1:
                dz = torch.where(z > 0, g, g * param)
            elif kind == 2:
                dz = torch.where(z > 0, g, g * (param * torch.exp(z)))
            else:
                dz = g
        return dz, xhat, scale

    def iabn_backward_reduce(self, src, dy, mean, rstd, weight, bias, kind, param, from_output):
        dz, xhat, _ = self._iabn_dz_xhat(src, dy, mean, rstd, weight, bias, kind, param, from_output)
        dims = _channel_dims(src)
        return dz.sum(dim=dims), (dz * xhat).sum(dim=dims)

    def iabn_backward_dx(self, src, dy, mean, rstd, weight, bias, kind, param, from_output, mean_dz, mean_dz_xhat):
        dz, xhat, scale = self._iabn_dz_xhat(src, dy, mean, rstd, weight, bias, kind, param, from_output)
        nd, sd = src.dim(), rstd.dtype
        dx = _per_channel(scale, nd) * (dz - _per_channel(mean_dz.to(sd), nd)
                                        - xhat * _per_channel(mean_dz_xhat.to(sd), nd))
        return _like(dx, src)


def _iabn_act(z: torch.Tensor, kind: int, param: float) -> torch.Tensor:
    """InPlace-ABN's activation by torch's own function (0 identity, 1 leaky ReLU, 2 ELU)."""
    if kind == 1:
        return torch.nn.functional.leaky_relu(z, param)
    if kind == 2:
        return torch.nn.functional.elu(z, param)
    return z


def _spatial(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in ``x``'s dtype and memory format (channels_last stays channels_last)."""
    return t.to(dtype=x.dtype, memory_format=memory_format_of(x))
