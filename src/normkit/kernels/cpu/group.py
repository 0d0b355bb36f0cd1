"""GroupNorm / InstanceNorm kernels: one memory pass per direction, in both layouts.

In NCHW a (sample, group) block — ``C/G`` channels × ``S`` positions — is contiguous, and at
the usual sizes (≤ a few hundred KB) it stays in L2 while it is worked on. So each block is
read from memory once: the statistics pass brings it into cache and the apply pass (or, in the
backward, the dx pass) rereads it from there. Blocks are the parallel unit; every reduction is
inside one block, in a fixed order, so results do not depend on the thread count.

In channels_last a group is strided but a whole sample is contiguous: :func:`group_fwd_cl` and
:func:`group_bwd_cl` take the sample as the unit, with per-channel accumulators, and likewise
reread it from cache in the second pass.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._scalar import ld, like, st, zero
from .channel import (
    position_apply,
    position_bwd_dx,
    position_bwd_sums,
    span_apply,
    span_bwd_dx,
    span_bwd_sums,
    span_sums,
)

# reassociation only, for vectorised row sums: see channel.py's _JIT_REDUCE
_JIT = dict(parallel=True, cache=True, fastmath={"reassoc"}, nogil=True)


@njit(**_JIT)
def group_fwd_nchw(x, res, has_res, act, nn, nc, ns, ng, w, b, eps, y, mean, var):
    """``y = act((x − μ_{n,g})·rstd_{n,g}·w_c + b_c + res)``; fills ``mean``/``var`` ``(N·G,)``.

    ``w``/``b`` are ``(C,)`` in the stat dtype (ones/zeros when the layer has no affine).
    """
    cg = nc // ng
    length = cg * ns
    for blk in prange(nn * ng):
        start = blk * length
        k = ld(x, start)  # a sample of the block: the shift that keeps a large mean exact
        t1, t2 = span_sums(x, start, length, k)
        s1, s2 = like(k, t1), like(k, t2)
        d = s1 / like(s1, length)
        v = max(s2 / like(s1, length) - d * d, zero(x))
        mu = k + d
        mean[blk] = mu
        var[blk] = v
        rs = like(mu, 1.0) / math.sqrt(v + like(mu, eps))
        g = blk % ng
        for ci in range(cg):
            c = g * cg + ci
            aa = rs * w[c]
            span_apply(x, res, has_res, act, start + ci * ns, ns, aa, b[c] - mu * aa, y)


@njit(**_JIT)
def group_bwd_nchw(x, dy, res, has_res, act, nn, nc, ns, ng, mean, rstd, w, b, need_dz, dx, dzo, sa, sb):
    """GroupNorm backward per (n, g) block, from cache in the second pass.

    ``dx = rstd·(w_c·dz − mean(g) − x̂·mean(g·x̂))`` with ``g = w_c·dz``; ``sa[n,c] = Σ_s dz`` and
    ``sb[n,c] = Σ_s dz·x̂`` (float64) give ``dbias``/``dweight``.
    """
    cg = nc // ng
    length = cg * ns
    for blk in prange(nn * ng):
        n = blk // ng
        g = blk - n * ng
        start = blk * length
        mu = mean[blk]
        rs = rstd[blk]
        sum_g = zero(x)
        sum_gx = zero(x)
        for ci in range(cg):
            c = g * cg + ci
            aa = rs * w[c]
            t1, t2 = span_bwd_sums(x, dy, res, has_res, act, start + ci * ns, ns, aa, b[c] - mu * aa, mu)
            da = like(mu, t1)
            db = like(mu, t2) * rs
            sa[n * nc + c] = np.float64(da)
            sb[n * nc + c] = np.float64(db)
            sum_g += w[c] * da
            sum_gx += w[c] * db
        mg = sum_g / like(sum_g, length)
        mgx = sum_gx / like(sum_g, length)
        qq = -rs * rs * mgx
        rr = -rs * mg
        for ci in range(cg):
            c = g * cg + ci
            aa = rs * w[c]
            span_bwd_dx(x, dy, res, has_res, act, start + ci * ns, ns, aa, b[c] - mu * aa, aa, qq, mu, rr, need_dz,
                        dx, dzo)


# ----------------------------------------------------------------------------- channels_last
# In channels_last a sample — S positions × C channels — is contiguous (800 KB for 64×56×56
# float32), while a group is strided inside it. So the unit here is the sample: its statistics
# pass reads it from memory, accumulating per channel, and the apply (dx) pass rereads it from
# cache. Per-channel float32 accumulators are flushed to float64 every _CHUNK positions.
_CHUNK = 512


@njit(cache=True, inline="always")
def _channel_sums_cl(x, start, ns, nc, k, s1, s2):
    """``s1[c] = Σ_s (x − k[c])``, ``s2[c] = Σ_s (x − k[c])²`` over one sample, float64."""
    a = np.zeros(nc, dtype=k.dtype)
    q = np.zeros(nc, dtype=k.dtype)
    s1[:] = 0.0
    s2[:] = 0.0
    for s0 in range(0, ns, _CHUNK):
        a[:] = 0
        q[:] = 0
        for s in range(s0, min(ns, s0 + _CHUNK)):
            base = start + s * nc
            for c in range(nc):
                v = ld(x, base + c) - ld(k, c)
                st(a, c, ld(a, c) + v)
                st(q, c, ld(q, c) + v * v)
        for c in range(nc):
            s1[c] += a[c]
            s2[c] += q[c]


@njit(**_JIT)
def group_fwd_cl(x, res, has_res, act, nn, ns, nc, ng, w, b, eps, y, mean, var):
    """channels_last twin of :func:`group_fwd_nchw` (same arguments, ``x`` is ``(N, S, C)``)."""
    cg = nc // ng
    count = cg * ns
    for n in prange(nn):
        start = n * ns * nc
        k = np.empty(nc, dtype=w.dtype)  # the shift: each group's first value
        for c in range(nc):
            k[c] = ld(x, start + (c // cg) * cg)
        s1 = np.empty(nc)
        s2 = np.empty(nc)
        _channel_sums_cl(x, start, ns, nc, k, s1, s2)
        scale = np.empty(nc, dtype=w.dtype)
        shift = np.empty(nc, dtype=w.dtype)
        for g in range(ng):
            t1 = 0.0
            t2 = 0.0
            for c in range(g * cg, (g + 1) * cg):
                t1 += s1[c]
                t2 += s2[c]
            kk = k[g * cg]
            d = t1 / count
            mu = like(kk, np.float64(kk) + d)
            v = like(kk, max(t2 / count - d * d, 0.0))
            mean[n * ng + g] = mu
            var[n * ng + g] = v
            rs = like(kk, 1.0) / math.sqrt(v + like(kk, eps))
            for c in range(g * cg, (g + 1) * cg):
                scale[c] = rs * w[c]
                shift[c] = b[c] - mu * scale[c]
        for s in range(ns):
            position_apply(x, res, has_res, act, start + s * nc, nc, scale, shift, 0, y)


@njit(**_JIT)
def group_bwd_cl(x, dy, res, has_res, act, nn, ns, nc, ng, mean, rstd, w, b, need_dz, dx, dzo, sa, sb):
    """channels_last twin of :func:`group_bwd_nchw` (same arguments, ``x`` is ``(N, S, C)``)."""
    cg = nc // ng
    count = cg * ns
    for n in prange(nn):
        start = n * ns * nc
        fa = np.empty(nc, dtype=w.dtype)
        fb = np.empty(nc, dtype=w.dtype)
        m = np.empty(nc, dtype=w.dtype)
        for c in range(nc):
            g = c // cg
            m[c] = mean[n * ng + g]
            fa[c] = rstd[n * ng + g] * w[c]
            fb[c] = b[c] - m[c] * fa[c]
        t1 = np.zeros(nc)
        t2 = np.zeros(nc)
        a = np.zeros(nc, dtype=w.dtype)
        q = np.zeros(nc, dtype=w.dtype)
        for s0 in range(0, ns, _CHUNK):
            a[:] = 0
            q[:] = 0
            for s in range(s0, min(ns, s0 + _CHUNK)):
                position_bwd_sums(x, dy, res, has_res, act, start + s * nc, nc, fa, fb, m, 0, a, q)
            for c in range(nc):
                t1[c] += a[c]
                t2[c] += q[c]
        qq = np.empty(nc, dtype=w.dtype)
        rr = np.empty(nc, dtype=w.dtype)
        for g in range(ng):
            rs = np.float64(rstd[n * ng + g])
            mg = 0.0
            mgx = 0.0
            for c in range(g * cg, (g + 1) * cg):
                sa[n * nc + c] = t1[c]
                sb[n * nc + c] = t2[c] * rs  # Σ dz·x̂
                mg += w[c] * t1[c]
                mgx += w[c] * t2[c] * rs
            mg /= count
            mgx /= count
            for c in range(g * cg, (g + 1) * cg):
                qq[c] = -rs * rs * mgx
                rr[c] = -rs * mg
        for s in range(ns):
            position_bwd_dx(x, dy, res, has_res, act, start + s * nc, nc, fa, fb, fa, qq, m, rr, 0, need_dz, dx,
                            dzo)
