"""Per-channel kernels (BatchNorm, and the statistics/apply/backward passes of GroupNorm).

Every array is flat (1-D) and read through :func:`ld` / written through :func:`st`. Two loop
orders, one per layout, and no transposes:

* **NCHW** — ``x`` is ``(N, C, S)`` in memory: each ``(n, c)`` row of ``S`` values is
  contiguous. Rows are the parallel unit of the separate passes; the whole-BatchNorm kernels at
  the end take channels as the unit instead (see there). The loops over one row are the
  ``span_*`` helpers, shared with the GroupNorm kernels of :mod:`.group` (a span is a stretch
  of contiguous values with one set of per-channel parameters).
* **CL** (channels_last, and BatchNorm1d's ``(N, C)``) — ``x`` is ``(N, S, C)``: each spatial
  position holds ``C`` contiguous channels. Blocks of ``R`` positions are the parallel unit;
  inside a block one accumulator per channel, so the inner loop over ``c`` vectorises.

Per-channel parameters (scale, shift, mean, ...) are ``(P, C)`` flat with ``P = 1`` (one value
per channel: BatchNorm) or ``P = N`` (one per sample and channel: GroupNorm's
``γ_c·rstd_{n,g}``); ``per_sample`` says which.

Reductions return per-row (NCHW) or per-block (CL) partial sums in float64; the caller adds
them in a fixed order. Partitioning depends only on the shape, never on the thread count, so
results are bit-identical from run to run.

Activations: identity and ReLU (codes 0, 1) run in branch-free inner loops, one written out
per flag combination (a branch or a tuple-returning helper in the element loop keeps LLVM from
vectorising it and cost up to 5x), while SiLU and GELU (codes 2, 3) take a generic per-element
path (they are bound by ``exp``/``erf``, not by memory). ``dy`` is loaded before the ReLU mask
is applied, never under the condition: a load inside the branch kept LLVM from vectorising the
bfloat16 loops (4x slower).

Statistics use *shifted* sums ``Σ(x − k)`` and ``Σ(x − k)²`` with ``k`` a sample value of the
same channel (Chan, Golub & LeVeque, 1983): one pass over ``x``, and a large common mean
cancels before it can destroy the variance (``1e4 + randn`` is exact to float32 rounding).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._scalar import act_fwd, act_grad, ld, like, st, zero

_JIT = dict(parallel=True, cache=True, fastmath=False, nogil=True)
# Row reductions (NCHW) allow reassociation and nothing else: LLVM may then keep 8-wide partial
# sums in a vector register (2x faster, at memory speed). The summation order is still fixed by
# the compiled code — bit-identical from run to run and for any thread count — though it may
# differ between CPUs of different vector width. The shifted-sum trick survives (tested).
_JIT_REDUCE = dict(parallel=True, cache=True, fastmath={"reassoc"}, nogil=True)


@njit(cache=True, inline="always")
def _pidx(n, c, nc, per_sample):
    return (n * nc if per_sample else 0) + c


# ----------------------------------------------------------------------------- statistics
@njit(cache=True, inline="always")
def span_sums(x, base, ns, kk):
    """Shifted sums ``Σ (x − kk)`` and ``Σ (x − kk)²`` of one span, float64 out."""
    a = zero(x)
    q = zero(x)
    for i in range(base, base + ns):
        v = ld(x, i) - kk
        a += v
        q += v * v
    return np.float64(a), np.float64(q)


@njit(**_JIT_REDUCE)
def sums_nchw(x, nn, nc, ns, k, per_sample, s1, s2):
    """``s1[n,c] = Σ_s (x − k)``, ``s2[n,c] = Σ_s (x − k)²`` per (n, c) row, float64 out."""
    for r in prange(nn * nc):
        n = r // nc
        c = r - n * nc
        s1[r], s2[r] = span_sums(x, r * ns, ns, k[_pidx(n, c, nc, per_sample)])


@njit(cache=True, inline="always")
def position_sums(x, base, nc, k, kb, a, q):
    """``a[c] += x − k[kb+c]``, ``q[c] += (x − k[kb+c])²`` over the ``C`` channels of one position."""
    for c in range(nc):
        v = ld(x, base + c) - ld(k, kb + c)
        st(a, c, ld(a, c) + v)
        st(q, c, ld(q, c) + v * v)


@njit(**_JIT)
def sums_cl(x, nn, ns, nc, rows, k, per_sample, s1, s2):
    """Shifted sums per block of ``rows`` positions: ``s1``/``s2`` are ``(N, nblocks, C)``."""
    nb = (ns + rows - 1) // rows
    for blk in prange(nn * nb):
        n = blk // nb
        j = blk - n * nb
        kb = _pidx(n, 0, nc, per_sample)
        a = np.zeros(nc, dtype=k.dtype)
        q = np.zeros(nc, dtype=k.dtype)
        for s in range(j * rows, min(ns, (j + 1) * rows)):
            position_sums(x, (n * ns + s) * nc, nc, k, kb, a, q)
        for c in range(nc):
            s1[blk * nc + c] = np.float64(a[c])
            s2[blk * nc + c] = np.float64(q[c])


# ----------------------------------------------------------------------------- apply
@njit(cache=True, inline="always")
def _z(x, res, has_res, i, a, b):
    z = ld(x, i) * a + b
    if has_res:
        z += ld(res, i)
    return z


@njit(cache=True, inline="always")
def span_apply(x, res, has_res, act, base, ns, aa, bb, out):
    """``out = act(x·aa + bb + res)`` over one span."""
    # one loop per flag combination: no branch in the element loop, so it vectorises
    if act == 0 and not has_res:
        for i in range(base, base + ns):
            st(out, i, ld(x, i) * aa + bb)
    elif act == 1 and not has_res:
        for i in range(base, base + ns):
            st(out, i, max(ld(x, i) * aa + bb, zero(x)))
    elif act == 0:
        for i in range(base, base + ns):
            st(out, i, ld(x, i) * aa + bb + ld(res, i))
    elif act == 1:
        for i in range(base, base + ns):
            st(out, i, max(ld(x, i) * aa + bb + ld(res, i), zero(x)))
    else:
        for i in range(base, base + ns):
            st(out, i, act_fwd(_z(x, res, has_res, i, aa, bb), act))


@njit(**_JIT)
def apply_nchw(x, res, has_res, act, nn, nc, ns, a, b, per_sample, out):
    """``out = act(x·a[c] + b[c] + res)``."""
    for r in prange(nn * nc):
        n = r // nc
        c = r - n * nc
        p = _pidx(n, c, nc, per_sample)
        span_apply(x, res, has_res, act, r * ns, ns, a[p], b[p], out)


@njit(cache=True, inline="always")
def position_apply(x, res, has_res, act, base, nc, a, b, kb, out):
    """``out = act(x·a[kb+c] + b[kb+c] + res)`` over the ``C`` channels of one position (CL order)."""
    if act == 0 and not has_res:
        for c in range(nc):
            st(out, base + c, ld(x, base + c) * ld(a, kb + c) + ld(b, kb + c))
    elif act == 1 and not has_res:
        for c in range(nc):
            st(out, base + c, max(ld(x, base + c) * ld(a, kb + c) + ld(b, kb + c), zero(x)))
    elif act == 0:
        for c in range(nc):
            st(out, base + c, ld(x, base + c) * ld(a, kb + c) + ld(b, kb + c) + ld(res, base + c))
    elif act == 1:
        for c in range(nc):
            z = ld(x, base + c) * ld(a, kb + c) + ld(b, kb + c) + ld(res, base + c)
            st(out, base + c, max(z, zero(x)))
    else:
        for c in range(nc):
            z = _z(x, res, has_res, base + c, ld(a, kb + c), ld(b, kb + c))
            st(out, base + c, act_fwd(z, act))


@njit(**_JIT)
def apply_cl(x, res, has_res, act, nn, ns, nc, rows, a, b, per_sample, out):
    """``out = act(x·a[c] + b[c] + res)`` over blocks of ``rows`` positions."""
    nb = (ns + rows - 1) // rows
    for blk in prange(nn * nb):
        n = blk // nb
        j = blk - n * nb
        kb = _pidx(n, 0, nc, per_sample)
        for s in range(j * rows, min(ns, (j + 1) * rows)):
            position_apply(x, res, has_res, act, (n * ns + s) * nc, nc, a, b, kb, out)


# ----------------------------------------------------------------------------- backward
@njit(cache=True, inline="always")
def _dz_generic(x, dy, res, has_res, act, i, fa, fb):
    """dz = dy·act'(z) with the forward's pre-activation ``z`` (SiLU, GELU)."""
    return ld(dy, i) * act_grad(_z(x, res, has_res, i, fa, fb), act)


@njit(cache=True, inline="always")
def span_bwd_sums(x, dy, res, has_res, act, base, ns, aa, bb, mm):
    """``Σ dz`` and ``Σ dz·(x − mm)`` over one span, float64 out."""
    a = zero(x)
    q = zero(x)
    if act == 0:
        for i in range(base, base + ns):
            g = ld(dy, i)
            a += g
            q += g * (ld(x, i) - mm)
    elif act == 1 and not has_res:
        for i in range(base, base + ns):
            xv = ld(x, i)
            g = ld(dy, i)
            g = g if xv * aa + bb > 0 else zero(x)
            a += g
            q += g * (xv - mm)
    elif act == 1:
        for i in range(base, base + ns):
            xv = ld(x, i)
            g = ld(dy, i)
            g = g if xv * aa + bb + ld(res, i) > 0 else zero(x)
            a += g
            q += g * (xv - mm)
    else:
        for i in range(base, base + ns):
            g = _dz_generic(x, dy, res, has_res, act, i, aa, bb)
            a += g
            q += g * (ld(x, i) - mm)
    return np.float64(a), np.float64(q)


@njit(**_JIT_REDUCE)
def bwd_sums_nchw(x, dy, res, has_res, act, nn, nc, ns, fa, fb, m, per_sample, sa, sb):
    """``sa[n,c] = Σ_s dz``, ``sb[n,c] = Σ_s dz·(x − m)`` per (n, c) row, float64 out."""
    for r in prange(nn * nc):
        n = r // nc
        c = r - n * nc
        p = _pidx(n, c, nc, per_sample)
        sa[r], sb[r] = span_bwd_sums(x, dy, res, has_res, act, r * ns, ns, fa[p], fb[p], m[p])


@njit(cache=True, inline="always")
def position_bwd_sums(x, dy, res, has_res, act, base, nc, fa, fb, m, kb, a, q):
    """``a[c] += dz``, ``q[c] += dz·(x − m[kb+c])`` over the ``C`` channels of one position."""
    # one loop per flag combination, as in the span helpers (the ReLU mask vectorises only so)
    if act == 0:
        for c in range(nc):
            g = ld(dy, base + c)
            st(a, c, ld(a, c) + g)
            st(q, c, ld(q, c) + g * (ld(x, base + c) - ld(m, kb + c)))
    elif act == 1 and not has_res:
        for c in range(nc):
            k = kb + c
            xv = ld(x, base + c)
            g = ld(dy, base + c)
            g = g if xv * ld(fa, k) + ld(fb, k) > 0 else zero(x)
            st(a, c, ld(a, c) + g)
            st(q, c, ld(q, c) + g * (xv - ld(m, k)))
    elif act == 1:
        for c in range(nc):
            k = kb + c
            xv = ld(x, base + c)
            g = ld(dy, base + c)
            g = g if xv * ld(fa, k) + ld(fb, k) + ld(res, base + c) > 0 else zero(x)
            st(a, c, ld(a, c) + g)
            st(q, c, ld(q, c) + g * (xv - ld(m, k)))
    else:
        for c in range(nc):
            k = kb + c
            g = _dz_generic(x, dy, res, has_res, act, base + c, fa[k], fb[k])
            a[c] += g
            q[c] += g * (ld(x, base + c) - m[k])


@njit(**_JIT)
def bwd_sums_cl(x, dy, res, has_res, act, nn, ns, nc, rows, fa, fb, m, per_sample, sa, sb):
    """Per block of ``rows`` positions: ``Σ dz`` and ``Σ dz·(x − m)``, ``(N, nblocks, C)``."""
    nb = (ns + rows - 1) // rows
    for blk in prange(nn * nb):
        n = blk // nb
        j = blk - n * nb
        kb = _pidx(n, 0, nc, per_sample)
        a = np.zeros(nc, dtype=m.dtype)
        q = np.zeros(nc, dtype=m.dtype)
        for s in range(j * rows, min(ns, (j + 1) * rows)):
            position_bwd_sums(x, dy, res, has_res, act, (n * ns + s) * nc, nc, fa, fb, m, kb, a, q)
        for c in range(nc):
            sa[blk * nc + c] = np.float64(a[c])
            sb[blk * nc + c] = np.float64(q[c])


@njit(cache=True, inline="always")
def span_bwd_dx(x, dy, res, has_res, act, base, ns, aa, bb, pp, qq, mm, rr, need_dz, dx, dzo):
    """``dx = pp·dz + qq·(x − mm) + rr`` over one span; ``dzo = dz`` when ``need_dz``."""
    if act == 0 and not need_dz:
        for i in range(base, base + ns):
            st(dx, i, pp * ld(dy, i) + qq * (ld(x, i) - mm) + rr)
    elif act == 1 and not has_res and not need_dz:
        for i in range(base, base + ns):
            xv = ld(x, i)
            g = ld(dy, i)
            g = g if xv * aa + bb > 0 else zero(x)
            st(dx, i, pp * g + qq * (xv - mm) + rr)
    elif act == 1 and has_res and need_dz:  # the residual block's tail: relu(bn(x) + shortcut)
        for i in range(base, base + ns):
            xv = ld(x, i)
            g = ld(dy, i)
            g = g if xv * aa + bb + ld(res, i) > 0 else zero(x)
            st(dx, i, pp * g + qq * (xv - mm) + rr)
            st(dzo, i, g)
    elif act <= 1:
        for i in range(base, base + ns):
            xv = ld(x, i)
            g = ld(dy, i)
            if act == 1:
                z = xv * aa + bb
                if has_res:
                    z += ld(res, i)
                g = g if z > 0 else zero(x)
            st(dx, i, pp * g + qq * (xv - mm) + rr)
            if need_dz:
                st(dzo, i, g)
    else:
        for i in range(base, base + ns):
            g = _dz_generic(x, dy, res, has_res, act, i, aa, bb)
            st(dx, i, pp * g + qq * (ld(x, i) - mm) + rr)
            if need_dz:
                st(dzo, i, g)


@njit(**_JIT)
def bwd_dx_nchw(x, dy, res, has_res, act, nn, nc, ns, fa, fb, p, q, m, r0, per_sample, need_dz, dx, dzo):
    """``dx = p·dz + q·(x − m) + r0`` per (n, c) row; ``dzo = dz`` when ``need_dz``."""
    for r in prange(nn * nc):
        n = r // nc
        c = r - n * nc
        k = _pidx(n, c, nc, per_sample)
        span_bwd_dx(x, dy, res, has_res, act, r * ns, ns, fa[k], fb[k], p[k], q[k], m[k], r0[k], need_dz, dx, dzo)


@njit(cache=True, inline="always")
def position_bwd_dx(x, dy, res, has_res, act, base, nc, fa, fb, p, q, m, r0, kb, need_dz, dx, dzo):
    """``dx = p·dz + q·(x − m) + r0`` (parameters at ``kb + c``) over the channels of one position."""
    if act == 0 and not need_dz:
        for c in range(nc):
            k = kb + c
            v = ld(p, k) * ld(dy, base + c) + ld(q, k) * (ld(x, base + c) - ld(m, k)) + ld(r0, k)
            st(dx, base + c, v)
    elif act == 1 and not has_res and not need_dz:
        for c in range(nc):
            k = kb + c
            xv = ld(x, base + c)
            g = ld(dy, base + c)
            g = g if xv * ld(fa, k) + ld(fb, k) > 0 else zero(x)
            st(dx, base + c, ld(p, k) * g + ld(q, k) * (xv - ld(m, k)) + ld(r0, k))
    elif act == 1 and has_res and need_dz:
        for c in range(nc):
            k = kb + c
            xv = ld(x, base + c)
            z = xv * ld(fa, k) + ld(fb, k) + ld(res, base + c)
            g = ld(dy, base + c)
            g = g if z > 0 else zero(x)
            st(dx, base + c, ld(p, k) * g + ld(q, k) * (xv - ld(m, k)) + ld(r0, k))
            st(dzo, base + c, g)
    elif act <= 1:
        for c in range(nc):
            k = kb + c
            xv = ld(x, base + c)
            g = ld(dy, base + c)
            if act == 1:
                z = xv * ld(fa, k) + ld(fb, k)
                if has_res:
                    z += ld(res, base + c)
                g = g if z > 0 else zero(x)
            st(dx, base + c, ld(p, k) * g + ld(q, k) * (xv - ld(m, k)) + ld(r0, k))
            if need_dz:
                st(dzo, base + c, g)
    else:
        for c in range(nc):
            k = kb + c
            g = _dz_generic(x, dy, res, has_res, act, base + c, ld(fa, k), ld(fb, k))
            st(dx, base + c, ld(p, k) * g + ld(q, k) * (ld(x, base + c) - ld(m, k)) + ld(r0, k))
            if need_dz:
                st(dzo, base + c, g)


@njit(**_JIT)
def bwd_dx_cl(x, dy, res, has_res, act, nn, ns, nc, rows, fa, fb, p, q, m, r0, per_sample, need_dz, dx, dzo):
    """``dx = p·dz + q·(x − m) + r0`` over blocks of ``rows`` positions."""
    nb = (ns + rows - 1) // rows
    for blk in prange(nn * nb):
        n = blk // nb
        j = blk - n * nb
        kb = _pidx(n, 0, nc, per_sample)
        for s in range(j * rows, min(ns, (j + 1) * rows)):
            position_bwd_dx(x, dy, res, has_res, act, (n * ns + s) * nc, nc, fa, fb, p, q, m, r0, kb, need_dz,
                            dx, dzo)


# ----------------------------------------------------------------------------- whole BatchNorm, NCHW
# In NCHW one channel is N rows of S contiguous values. Working through blocks of adjacent
# channels, the second pass over a block (apply after the statistics, dx after the two sums)
# finds its rows still in cache, so x (and dy) come from memory about once instead of twice.
# A block spans enough channels that each sample's run of it is ≥ 2048 values (short runs
# starve the prefetcher). Each channel's sums still run over n in order, so the block width
# changes nothing in the results. The O(1) arithmetic between the passes follows the composed
# path (backends.Backend's channel_forward/channel_backward) step for step in the stat dtype;
# compiled inside these reassociating kernels it may differ from it in the last bit (LLVM may
# turn γ·(1/σ) into γ/σ). Which path runs depends on the shape only (cpu_backend), so results
# are reproducible and the same for any thread count.


@njit(cache=True)
def _bn_scale_shift(kk, s1, s2, count, w, b, eps):
    """(mean, var, scale, shift) of a channel from its shifted sums, in ``kk``'s type."""
    d = s1 / count
    mu = like(kk, np.float64(kk) + d)
    sigma2 = like(kk, max(s2 / count - d * d, 0.0))
    scale = w * (like(kk, 1.0) / like(kk, math.sqrt(sigma2 + like(kk, eps))))
    return mu, sigma2, scale, -mu * scale + b


@njit(cache=True)
def _bn_dx_coefficients(aa, rs, s1, s2, count, batch_stats):
    """(Σ dz, Σ dz·x̂, q, r) of a channel: ``dx = aa·dz + q·(x − mean) + r``."""
    sdz = like(aa, s1)
    sdzx = like(aa, s2 * np.float64(rs))
    mdz = sdz / like(aa, count) if batch_stats else like(aa, 0.0)
    mdzx = sdzx / like(aa, count) if batch_stats else like(aa, 0.0)
    sc = np.float64(aa)
    return sdz, sdzx, like(aa, -sc * np.float64(rs) * np.float64(mdzx)), like(aa, -sc * np.float64(mdz))


@njit(**_JIT_REDUCE)
def bn_forward_nchw(x, res, has_res, act, nn, nc, ns, w, b, eps, cb, out, mean, var):
    """Training BatchNorm: per block of ``cb`` channels the statistics, then ``out = act(x·scale + shift + res)``.

    ``w``/``b`` are γ/β in the stat dtype (ones/zeros without affine); fills ``mean``/``var``
    (biased), ``(C,)`` in the stat dtype. ``scale = γ·rsqrt(var + eps)``, ``shift = β − mean·scale``.
    ``cb`` only sets the work split: each channel's sums run over n in order whatever it is.
    """
    count = nn * ns
    for j in prange((nc + cb - 1) // cb):
        c0 = j * cb
        width = min(nc, c0 + cb) - c0
        kk = np.empty(width, dtype=w.dtype)
        for c in range(width):
            kk[c] = ld(x, (c0 + c) * ns)
        s1 = np.zeros(width)
        s2 = np.zeros(width)
        for n in range(nn):
            for c in range(width):
                a, q = span_sums(x, (n * nc + c0 + c) * ns, ns, kk[c])
                s1[c] += a
                s2[c] += q
        scale = np.empty(width, dtype=w.dtype)
        shift = np.empty(width, dtype=w.dtype)
        for c in range(width):
            mean[c0 + c], var[c0 + c], scale[c], shift[c] = _bn_scale_shift(kk[c], s1[c], s2[c], count, w[c0 + c],
                                                                          b[c0 + c], eps)
        for n in range(nn):
            for c in range(width):
                span_apply(x, res, has_res, act, (n * nc + c0 + c) * ns, ns, scale[c], shift[c], out)


@njit(**_JIT_REDUCE)
def bn_backward_nchw(x, dy, res, has_res, act, nn, nc, ns, fa, fb, m, rs, batch_stats, need_dz, cb, dx, dzo,
                     sum_dz, sum_dz_xhat):
    """BatchNorm backward per block of ``cb`` channels: ``Σ dz`` and ``Σ dz·x̂``, then ``dx`` (and ``dzo = dz``).

    ``dx = scale·(dz − mean(dz) − x̂·mean(dz·x̂))`` with batch statistics, ``scale·dz`` without;
    ``fa``/``fb`` are the forward's scale/shift, ``m``/``rs`` its mean/rstd (stat dtype).
    """
    count = nn * ns
    for j in prange((nc + cb - 1) // cb):
        c0 = j * cb
        width = min(nc, c0 + cb) - c0
        s1 = np.zeros(width)
        s2 = np.zeros(width)
        for n in range(nn):
            for c in range(width):
                a, q = span_bwd_sums(x, dy, res, has_res, act, (n * nc + c0 + c) * ns, ns, fa[c0 + c], fb[c0 + c],
                                     m[c0 + c])
                s1[c] += a
                s2[c] += q
        qq = np.empty(width, dtype=fa.dtype)
        rr = np.empty(width, dtype=fa.dtype)
        for c in range(width):
            sum_dz[c0 + c], sum_dz_xhat[c0 + c], qq[c], rr[c] = _bn_dx_coefficients(fa[c0 + c], rs[c0 + c], s1[c],
                                                                                    s2[c], count, batch_stats)
        for n in range(nn):
            for c in range(width):
                k = c0 + c
                span_bwd_dx(x, dy, res, has_res, act, (n * nc + k) * ns, ns, fa[k], fb[k], fa[k], qq[c], m[k], rr[c],
                            need_dz, dx, dzo)


# ----------------------------------------------------------------------------- whole BatchNorm, channels_last
# In channels_last (and BatchNorm1d's (N, C)) a channel is strided over the whole tensor, so x is
# read twice (blocks of channels kept in cache measured slower). One call still does all of it —
# block partial sums, their merge in block order (as the composed path's numpy sum does), the
# per-channel coefficients, the second pass — so a small tensor pays one kernel launch, not four
# plus the numpy in between.


@njit(cache=True, inline="always")
def _block_totals(s1, s2):
    """Column sums of two ``(blocks, C)`` tables of partial sums, the blocks added in order."""
    t1 = np.zeros(s1.shape[1])
    t2 = np.zeros(s1.shape[1])
    for j in range(s1.shape[0]):
        for c in range(s1.shape[1]):
            t1[c] += s1[j, c]
            t2[c] += s2[j, c]
    return t1, t2


@njit(**_JIT)
def bn_forward_cl(x, res, has_res, act, npos, nc, rows, w, b, eps, out, mean, var):
    """:func:`bn_forward_nchw` for ``x`` as ``(positions, C)``, over blocks of ``rows`` positions."""
    nb = (npos + rows - 1) // rows
    kk = np.empty(nc, dtype=w.dtype)
    for c in range(nc):
        kk[c] = ld(x, c)
    s1 = np.empty((nb, nc))
    s2 = np.empty((nb, nc))
    for j in prange(nb):
        a = np.zeros(nc, dtype=w.dtype)
        q = np.zeros(nc, dtype=w.dtype)
        for s in range(j * rows, min(npos, (j + 1) * rows)):
            position_sums(x, s * nc, nc, kk, 0, a, q)
        for c in range(nc):
            s1[j, c] = np.float64(a[c])
            s2[j, c] = np.float64(q[c])
    t1, t2 = _block_totals(s1, s2)
    scale = np.empty(nc, dtype=w.dtype)
    shift = np.empty(nc, dtype=w.dtype)
    for c in range(nc):
        mean[c], var[c], scale[c], shift[c] = _bn_scale_shift(kk[c], t1[c], t2[c], npos, w[c], b[c], eps)
    for j in prange(nb):
        for s in range(j * rows, min(npos, (j + 1) * rows)):
            position_apply(x, res, has_res, act, s * nc, nc, scale, shift, 0, out)


@njit(**_JIT)
def bn_backward_cl(x, dy, res, has_res, act, npos, nc, rows, fa, fb, m, rs, batch_stats, need_dz, dx, dzo, sum_dz,
                   sum_dz_xhat):
    """:func:`bn_backward_nchw` for ``x`` as ``(positions, C)``, over blocks of ``rows`` positions."""
    nb = (npos + rows - 1) // rows
    sa = np.empty((nb, nc))
    sb = np.empty((nb, nc))
    for j in prange(nb):
        a = np.zeros(nc, dtype=fa.dtype)
        q = np.zeros(nc, dtype=fa.dtype)
        for s in range(j * rows, min(npos, (j + 1) * rows)):
            position_bwd_sums(x, dy, res, has_res, act, s * nc, nc, fa, fb, m, 0, a, q)
        for c in range(nc):
            sa[j, c] = np.float64(a[c])
            sb[j, c] = np.float64(q[c])
    t1, t2 = _block_totals(sa, sb)
    qq = np.empty(nc, dtype=fa.dtype)
    rr = np.empty(nc, dtype=fa.dtype)
    for c in range(nc):
        sum_dz[c], sum_dz_xhat[c], qq[c], rr[c] = _bn_dx_coefficients(fa[c], rs[c], t1[c], t2[c], npos, batch_stats)
    for j in prange(nb):
        for s in range(j * rows, min(npos, (j + 1) * rows)):
            position_bwd_dx(x, dy, res, has_res, act, s * nc, nc, fa, fb, fa, qq, m, rr, 0, need_dz, dx, dzo)
