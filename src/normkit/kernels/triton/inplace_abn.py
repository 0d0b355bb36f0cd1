"""In-place activated BatchNorm on the GPU: the apply (into x itself when asked) and the backward from the
output y or the input x. The statistics are the channel family's (:mod:`.channel`'s ``channel_stats``).

Math (``normkit.ops_inplace``). ``KIND``: 0 identity, 1 leaky ReLU (slope p), 2 ELU (α = p); a the activation.

    apply       y = a(x·scale_c + shift_c)                         elementwise, y may be x (each element is
                                                                   read before it is written, by its program)
    from y      z = a⁻¹(y):  leaky  y > 0 ? y : y/p;  ELU  y > 0 ? y : log1p(y/p)
                dz = dy·a'(z):  leaky  y > 0 ? dy : p·dy;  ELU  y > 0 ? dy : (y + p)·dy
                d = z − β_c            (x̂ = d/γ_c)
    from x      z = x·scale_c + shift_c,  dz = dy·a'(z),  d = x − μ_c   (x̂ = d·rstd_c)
    reduce      Σ dz, Σ dz·d per channel — split over programs, fp32 lanes over LANE_STEPS tiles, blocks
                and partials added in fp64 in a fixed order (no atomics: the same bits on every run)
    dx          dx = scale_c·dz + q_c·d + r_c,   q = −scale·factor·mean(dz·x̂),  r = −scale·mean(dz)

``log1p`` and ``expm1`` are written with the classic corrections (``log1p(u) = log(w) − ((w − 1) − u)/w``,
``w = 1 + u``; ``expm1(z) = (e^z − 1)·z/log(e^z)`` for ``|z| < 1``), which keep them within a few ulps of the
functions near 0 where ``log(1 + u)`` and ``e^z − 1`` lose digits.

Limits: float32/float16/bfloat16 input, fp32 statistics; fewer than 2³¹ elements; x and dy in one dense layout.
"""

import torch
import triton
import triton.language as tl

from ._common import LANE_STEPS, sum_partials
from .channel import (
    _args,
    _channel_index,
    _chunk,
    _chunk_tile,
    _per_channel,
    _split,
    _sum_nc,
    _tile,
    elementwise_plan,
    reduction_plan,
)


@triton.jit
def _expm1(z):
    u = tl.exp(z)
    um1 = u - 1.0
    small = tl.abs(z) < 1.0
    corrected = um1 * z / tl.log(tl.where(small & (um1 != 0.0), u, 2.0))
    return tl.where(small, tl.where(um1 == 0.0, z, corrected), um1)


@triton.jit
def _log1p(v):
    w = 1.0 + v
    return tl.where(w == 1.0, v, tl.log(w) - ((w - 1.0) - v) / w)


@triton.jit
def _act(z, p, KIND: tl.constexpr):
    if KIND == 1:
        z = tl.where(z > 0, z, z * p)
    elif KIND == 2:
        z = tl.where(z > 0, z, p * _expm1(tl.minimum(z, 0.0)))
    return z


@triton.jit
def _grad_and_distance(v, dy, p, centre, scale, shift, KIND: tl.constexpr, FROM_Y: tl.constexpr):
    """(dz, d) of a tile (module docstring); v is y (FROM_Y) or x."""
    if FROM_Y:
        pos = v > 0
        if KIND == 1:
            z = tl.where(pos, v, v / p)
            g = tl.where(pos, dy, dy * p)
        elif KIND == 2:
            z = tl.where(pos, v, _log1p(tl.minimum(v, 0.0) / p))
            g = tl.where(pos, dy, dy * (v + p))
        else:
            z = v
            g = dy
        d = z - centre
    else:
        z = v * scale + shift
        if KIND == 1:
            g = tl.where(z > 0, dy, dy * p)
        elif KIND == 2:
            g = tl.where(z > 0, dy, dy * (p * tl.exp(tl.minimum(z, 0.0))))
        else:
            g = dy
        d = v - centre
    return g, d


@triton.jit
def iabn_apply_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, N, C, S, sN, sC, sS, p, KIND: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    off, ok, c = _tile(tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_C, tl.program_id(2) * BLOCK_S,
                       N, C, S, sN, sC, sS, BLOCK_N, BLOCK_C, BLOCK_S)
    z = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) * _per_channel(scale_ptr, c, C)
    z += _per_channel(shift_ptr, c, C)
    tl.store(y_ptr + off, _act(z, p, KIND).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def iabn_reduce_partial_kernel(s_ptr, dy_ptr, centre_ptr, scale_ptr, shift_ptr, part_ptr, N, C, S, sN, sC, sS,
                               n_per_prog, s_per_prog, S_CHUNKS, p, KIND: tl.constexpr, FROM_Y: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                               LANE_STEPS: tl.constexpr):
    """Program (t, p): Σ dz and Σ dz·d over chunk p, stored (fp64) as part[p, 0, c] and part[p, 1, c]."""
    c0 = tl.program_id(0) * BLOCK_C
    n_start, n_end, s_start, s_end = _chunk(tl.program_id(1), N, S, n_per_prog, s_per_prog, S_CHUNKS)
    c = _channel_index(c0, BLOCK_C)
    centre = _per_channel(centre_ptr, c, C)
    scale = _per_channel(scale_ptr, c, C)
    shift = _per_channel(shift_ptr, c, C)
    tiles_s = tl.cdiv(s_end - s_start, BLOCK_S)
    tiles = tl.cdiv(n_end - n_start, BLOCK_N) * tiles_s
    sum_dz = tl.zeros([BLOCK_C], dtype=tl.float64)
    sum_dzd = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t0 in range(0, tiles, LANE_STEPS):
        acc_dz = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=tl.float32)
        acc_dzd = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=tl.float32)
        for t in range(t0, tl.minimum(t0 + LANE_STEPS, tiles)):
            n0, s0 = _chunk_tile(t, n_start, s_start, tiles_s, BLOCK_N, BLOCK_S)
            off, ok, _ = _tile(n0, c0, s0, n_end, C, s_end, sN, sC, sS, BLOCK_N, BLOCK_C, BLOCK_S)
            v = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
            g, d = _grad_and_distance(v, dy, p, centre, scale, shift, KIND, FROM_Y)
            g = tl.where(ok, g, 0.0)
            acc_dz += g
            acc_dzd += g * tl.where(ok, d, 0.0)
        sum_dz += _sum_nc(acc_dz).to(tl.float64)
        sum_dzd += _sum_nc(acc_dzd).to(tl.float64)
    out = tl.program_id(1) * 2 * C + c0 + tl.arange(0, BLOCK_C)
    c_ok = c0 + tl.arange(0, BLOCK_C) < C
    tl.store(part_ptr + out, sum_dz, mask=c_ok)
    tl.store(part_ptr + out + C, sum_dzd, mask=c_ok)


@triton.jit
def iabn_dx_kernel(s_ptr, dy_ptr, dx_ptr, centre_ptr, scale_ptr, shift_ptr, q_ptr, r_ptr, N, C, S, sN, sC, sS, p,
                   KIND: tl.constexpr, FROM_Y: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    off, ok, c = _tile(tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_C, tl.program_id(2) * BLOCK_S,
                       N, C, S, sN, sC, sS, BLOCK_N, BLOCK_C, BLOCK_S)
    v = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
    scale = _per_channel(scale_ptr, c, C)
    g, d = _grad_and_distance(v, dy, p, _per_channel(centre_ptr, c, C), scale, _per_channel(shift_ptr, c, C),
                              KIND, FROM_Y)
    dx = scale * g + _per_channel(q_ptr, c, C) * d + _per_channel(r_ptr, c, C)
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
def iabn_apply(x, scale, shift, kind, param, in_place, *, block=1024):
    """a(x·scale + shift) in x's dtype and layout, written over x itself when ``in_place``."""
    v, blocks, grid = elementwise_plan(x, block)
    y = x if in_place else torch.empty_like(x)
    iabn_apply_kernel[grid](x, y, scale, shift, *_args(v), float(param), KIND=int(kind), **blocks)
    return y


def iabn_backward_reduce(src, dy, centre, scale, shift, kind, param, from_output, *, programs, tile=2048):
    """(Σ dz, Σ dz·d) per channel in fp32 (d: the distance from ``centre``; times the factor gives Σ dz·x̂)."""
    plan = reduction_plan(src, programs, tile)
    v, chunks = plan["view"], plan["grid"][1]
    c = v["C"]
    part = torch.empty(chunks, 2 * c, device=src.device, dtype=torch.float64)
    iabn_reduce_partial_kernel[plan["grid"]](src, dy, centre, scale, shift, part, *_args(v), *_split(plan),
                                             float(param), KIND=int(kind), FROM_Y=bool(from_output),
                                             LANE_STEPS=LANE_STEPS, **plan["blocks"])
    sums = sum_partials(part, torch.empty(2 * c, device=src.device, dtype=torch.float64))
    return sums[:c].clone(), sums[c:].clone()


def iabn_backward_dx(src, dy, centre, scale, shift, q, r, kind, param, from_output, *, block=1024):
    """dx = scale·dz + q·d + r in src's dtype and layout."""
    v, blocks, grid = elementwise_plan(src, block)
    dx = torch.empty_like(src)
    iabn_dx_kernel[grid](src, dy, dx, centre, scale, shift, q, r, *_args(v), float(param), KIND=int(kind),
                         FROM_Y=bool(from_output), **blocks)
    return dx
