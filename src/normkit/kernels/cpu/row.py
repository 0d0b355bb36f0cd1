"""Row kernels: LayerNorm and RMSNorm over the rows of a contiguous ``(M, K)`` array.

A row (``K`` values) is small enough to stay in L1/L2, so each row is read from memory once
and reduced exactly in two passes from cache: mean, then ``Σ(x − mean)²`` (RMS: ``Σx²``), then
the output. Rows are the parallel unit. The weight gradient sums over rows: each fixed block of
``rows`` rows writes its own partial ``(K,)`` sums (float64), and the caller adds the blocks in
order — bit-identical whatever the thread count.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._scalar import ld, like, st, zero

# reassociation only, for vectorised row sums: see channel.py's _JIT_REDUCE
_JIT = dict(parallel=True, cache=True, fastmath={"reassoc"}, nogil=True)


# Plain accumulation loops: with ``reassoc`` LLVM keeps several vector accumulators itself; the
# hand-unrolled four scalar accumulators these replaced ran ~20% slower (LayerNorm 8192x1024).
@njit(cache=True, inline="always")
def _row_sum(x, base, kk, shift):
    """Σ (x − shift)² over one row."""
    a = zero(x)
    for i in range(base, base + kk):
        v = ld(x, i) - shift
        a += v * v
    return a


@njit(cache=True, inline="always")
def _row_mean(x, base, kk):
    """Mean of one row, summed as ``Σ(x − x₀)`` so a large common offset cancels first."""
    k0 = ld(x, base)
    t = zero(x)
    for i in range(base, base + kk):
        t += ld(x, i) - k0
    return k0 + t / like(t, kk)


@njit(**_JIT)
def row_fwd(x, mm, kk, w, b, eps, rms, y, mean, rstd):
    """``y = x̂·w + b`` per row, ``x̂ = (x − μ)·rstd`` (RMS: ``x·rstd``); fills ``mean``, ``rstd``.

    ``w``/``b`` are ``(K,)`` in the stat dtype — ones/zeros for a layer without them (exact:
    ``v·1 + 0 = v``), so the element loop has no branch.
    """
    for r in prange(mm):
        base = r * kk
        mu = zero(x) if rms else _row_mean(x, base, kk)
        var = _row_sum(x, base, kk, mu) / like(mu, kk)
        rs = like(mu, 1.0) / math.sqrt(var + like(mu, eps))
        mean[r] = mu
        rstd[r] = rs
        for k in range(kk):
            st(y, base + k, (ld(x, base + k) - mu) * rs * ld(w, k) + ld(b, k))


@njit(**_JIT)
def row_bwd(x, dy, mm, kk, mean, rstd, w, rms, need_dw, rows, dx, dwp, dbp):
    """``dx = rstd·(g − mean(g) − x̂·mean(g·x̂))``, ``g = dy·w`` (RMS: no ``mean(g)``).

    ``w`` is ``(K,)`` (ones without a weight). ``dwp``/``dbp`` are ``(nblocks, K)`` partials of
    ``Σ dy·x̂`` and ``Σ dy`` when ``need_dw`` (``dbp`` untouched for RMS, which has no bias).
    """
    nb = (mm + rows - 1) // rows
    for blk in prange(nb):
        dwl = np.zeros(kk, dtype=rstd.dtype)
        dbl = np.zeros(kk, dtype=rstd.dtype)
        for r in range(blk * rows, min(mm, (blk + 1) * rows)):
            base = r * kk
            mu = zero(x) if rms else mean[r]
            rs = rstd[r]
            sg = zero(x)
            sgx = zero(x)
            for j in range(kk):
                g = ld(dy, base + j) * ld(w, j)
                sg += g
                sgx += g * ((ld(x, base + j) - mu) * rs)
            mg = zero(x) if rms else sg / like(rs, kk)
            mgx = sgx / like(rs, kk)
            if need_dw and rms:  # no bias: Σ dy is not needed (15% of the RMSNorm backward)
                for j in range(kk):
                    d = ld(dy, base + j)
                    xh = ld(x, base + j) * rs
                    st(dx, base + j, rs * (d * ld(w, j) - xh * mgx))
                    st(dwl, j, ld(dwl, j) + d * xh)
            elif need_dw:
                for j in range(kk):
                    d = ld(dy, base + j)
                    xh = (ld(x, base + j) - mu) * rs
                    st(dx, base + j, rs * (d * ld(w, j) - mg - xh * mgx))
                    st(dwl, j, ld(dwl, j) + d * xh)
                    st(dbl, j, ld(dbl, j) + d)
            else:
                for j in range(kk):
                    xh = (ld(x, base + j) - mu) * rs
                    st(dx, base + j, rs * (ld(dy, base + j) * ld(w, j) - mg - xh * mgx))
        if need_dw:
            for j in range(kk):
                dwp[blk * kk + j] = np.float64(dwl[j])
        if need_dw and not rms:
            for j in range(kk):
                dbp[blk * kk + j] = np.float64(dbl[j])
