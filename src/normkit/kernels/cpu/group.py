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

from ._scalar import act_fwd, act_grad, ld, like, st, zero

# reassociation only, for vectorised row sums: see channel.py's _JIT_REDUCE
_JIT = dict(parallel=True, cache=True, fastmath={"reassoc"}, nogil=True)


@njit(cache=True, inline="always")
def _shifted_sums(x, start, length, k):
    a0 = a1 = a2 = a3 = zero(x)
    q0 = q1 = q2 = q3 = zero(x)
    l4 = length - length % 4
    for j in range(0, l4, 4):
        i = start + j
        v0 = ld(x, i) - k
        v1 = ld(x, i + 1) - k
        v2 = ld(x, i + 2) - k
        v3 = ld(x, i + 3) - k
        a0 += v0
        a1 += v1
        a2 += v2
        a3 += v3
        q0 += v0 * v0
        q1 += v1 * v1
        q2 += v2 * v2
        q3 += v3 * v3
    for i in range(start + l4, start + length):
        v = ld(x, i) - k
        a0 += v
        q0 += v * v
    return (a0 + a1) + (a2 + a3), (q0 + q1) + (q2 + q3)


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
        s1, s2 = _shifted_sums(x, start, length, k)
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
            bb = b[c] - mu * aa
            base = start + ci * ns
            if act == 0 and not has_res:
                for i in range(base, base + ns):
                    st(y, i, ld(x, i) * aa + bb)
            elif act == 1 and not has_res:
                for i in range(base, base + ns):
                    st(y, i, max(ld(x, i) * aa + bb, zero(x)))
            elif act == 0:
                for i in range(base, base + ns):
                    st(y, i, ld(x, i) * aa + bb + ld(res, i))
            elif act == 1:
                for i in range(base, base + ns):
                    st(y, i, max(ld(x, i) * aa + bb + ld(res, i), zero(x)))
            else:
                for i in range(base, base + ns):
                    z = ld(x, i) * aa + bb
                    if has_res:
                        z += ld(res, i)
                    st(y, i, act_fwd(z, act))


@njit(cache=True, inline="always")
def _dz(x, dy, res, has_res, act, i, aa, bb):
    """dz = dy·act'(z) for SiLU/GELU (the identity/ReLU loops are written out)."""
    z = ld(x, i) * aa + bb
    if has_res:
        z += ld(res, i)
    return ld(dy, i) * act_grad(z, act)


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
            bb = b[c] - mu * aa
            base = start + ci * ns
            a0 = zero(x)
            q0 = zero(x)
            if act == 0:
                for i in range(base, base + ns):
                    g0 = ld(dy, i)
                    a0 += g0
                    q0 += g0 * (ld(x, i) - mu)
            elif act == 1 and not has_res:
                for i in range(base, base + ns):
                    xv = ld(x, i)
                    g0 = ld(dy, i)
                    g0 = g0 if xv * aa + bb > 0 else zero(x)
                    a0 += g0
                    q0 += g0 * (xv - mu)
            elif act == 1:
                for i in range(base, base + ns):
                    xv = ld(x, i)
                    g0 = ld(dy, i)
                    g0 = g0 if xv * aa + bb + ld(res, i) > 0 else zero(x)
                    a0 += g0
                    q0 += g0 * (xv - mu)
            else:
                for i in range(base, base + ns):
                    g0 = _dz(x, dy, res, has_res, act, i, aa, bb)
                    a0 += g0
                    q0 += g0 * (ld(x, i) - mu)
            da = a0
            db = q0 * rs
            sa[n * nc + c] = np.float64(da)
            sb[n * nc + c] = np.float64(db)
            sum_g += w[c] * da
            sum_gx += w[c] * db
        mg = sum_g / like(sum_g, length)
        mgx = sum_gx / like(sum_g, length)
        for ci in range(cg):
            c = g * cg + ci
            aa = rs * w[c]
            bb = b[c] - mu * aa
            qq = -rs * rs * mgx
            rr = -rs * mg
            base = start + ci * ns
            if act == 0 and not need_dz:
                for i in range(base, base + ns):
                    st(dx, i, aa * ld(dy, i) + qq * (ld(x, i) - mu) + rr)
            elif act <= 1:
                for i in range(base, base + ns):
                    xv = ld(x, i)
                    gz = ld(dy, i)
                    if act == 1:
                        z = xv * aa + bb
                        if has_res:
                            z += ld(res, i)
                        gz = gz if z > 0 else zero(x)
                    st(dx, i, aa * gz + qq * (xv - mu) + rr)
                    if need_dz:
                        st(dzo, i, gz)
            else:
                for i in range(base, base + ns):
                    gz = _dz(x, dy, res, has_res, act, i, aa, bb)
                    st(dx, i, aa * gz + qq * (ld(x, i) - mu) + rr)
                    if need_dz:
                        st(dzo, i, gz)
