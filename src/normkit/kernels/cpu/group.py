"""GroupNorm / InstanceNorm kernels for contiguous (NCHW) input: one memory pass per direction.

In NCHW a (sample, group) block — ``C/G`` channels × ``S`` positions — is contiguous, and at
the usual sizes (≤ a few hundred KB) it stays in L2 while it is worked on. So each block is
read from memory once: the statistics pass brings it into cache and the apply pass (or, in the
backward, the dx pass) rereads it from there. Blocks are the parallel unit; every reduction is
inside one block, in a fixed order, so results do not depend on the thread count.

(channels_last GroupNorm goes through the per-channel kernels of :mod:`.channel` with
per-sample parameters: a group is strided there, and the per-channel accumulators of the CL
loop order are the natural fit.)
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._scalar import ld, like, zero
from .channel import span_apply, span_bwd_dx, span_bwd_sums, span_sums

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
