"""Row family, second half: GroupNorm (and InstanceNorm = GroupNorm with G = C).

Math (DESIGN.md §1). Sample n, group g owns CG = C/G channels × S spatial values, L = CG·S:

    μ = 1/L Σ x,   σ² = 1/L Σ (x − μ)²,   rstd = 1/√(σ² + ε),   x̂ = (x − μ)·rstd
    z = x̂·γ_c + β_c + residual,   y = act(z)
    dz = dy·act'(z),   g = γ_c·dz
    dx = rstd·(g − mean(g) − x̂·mean(g·x̂))             (means over the group's L values)
    dγ_c = Σ_{n,s} dz·x̂,   dβ_c = Σ_{n,s} dz

Layout. Element (n, c, s) sits at n·sN + c·sC + s·sS:

    NCHW (contiguous)     sN = C·S, sC = S, sS = 1   -> a group is one contiguous run of L values
    NHWC (channels_last)  sN = S·C, sC = 1, sS = C   -> a group is S runs of CG values, C apart

One program per (sample, BLOCK_G adjacent groups) walks its groups in (BLOCK_G groups ×
BLOCK_CG channels × BLOCK_S positions) tiles, channel blocks outside, positions inside; the
statistics are vectors of BLOCK_G. The tile shape follows the layout: NCHW takes one group
(BLOCK_G = 1) and long runs along s; NHWC takes several groups so that a tile row spans up to
64 adjacent channels (GroupNorm(32) on 64 channels: 32 groups of 2 channels in one 128-byte row).
Forward: pass 1 walks x − x_first (the shift keeps a large common offset from blurring the sums)
in blocks of LANE_STEPS tiles: a Welford triple per tile lane (fp32) over the block, the lanes
merged with Chan's formula, the blocks merged in fp64 — so a 2²⁶-value group is as precise as a
small one; pass 2 normalizes and stores.
Backward: pass 1 forms, per channel, Σ_s dz and Σ_s dz·x̂ (fp32 lanes per block, blocks added in
fp64) — the sample's share of dβ/dγ, stored in a (N, 2, C) fp64 buffer (each program writes
only its own entries) — and from them the group's Σg = Σ_c γ_c·Σ_s dz and Σg·x̂ in fp64; pass 2
forms dx. A second kernel sums the N shares in fp64 in a fixed order: deterministic, no atomics.

Limits: float16/bfloat16/float32 (fp32 statistics, fp64 block merges); fewer than 2³¹ elements; a group is never
split across programs, so with few, huge groups (small N·G) the GPU is under-used.
"""

import torch
import triton
import triton.language as tl

from ._common import LANE_STEPS, act_args, activation, activation_grad, chan_merge, sum_partials, welford_step


@triton.jit
def _groups(g0, BLOCK_G: tl.constexpr):
    """Group indices g0 … g0 + BLOCK_G − 1 shaped (BLOCK_G, 1, 1)."""
    return (g0 + tl.arange(0, BLOCK_G))[:, None, None]


@triton.jit
def _channels(g, c0, CG, BLOCK_CG: tl.constexpr):
    """(channel index, in-group mask) of the channel block at c0 of groups g: (BLOCK_G, BLOCK_CG, 1)."""
    cj = (c0 + tl.arange(0, BLOCK_CG))[None, :, None]
    return g * CG + cj, cj < CG


@triton.jit
def _tile(base, g, c0, s0, G, CG, S, sC, sS, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of the (BLOCK_G × BLOCK_CG × BLOCK_S) tile at channel block c0, positions s0."""
    chans, c_ok = _channels(g, c0, CG, BLOCK_CG)
    ss = (s0 + tl.arange(0, BLOCK_S))[None, None, :]
    return base + chans * sC + ss * sS, (g < G) & c_ok & (ss < S)


@triton.jit
def _per_group(t):
    """Sum a tile over channels and positions: one value per group, (BLOCK_G,)."""
    return tl.sum(tl.sum(t, axis=2), axis=1)


@triton.jit
def _col(v):
    """A (BLOCK_G,) per-group vector shaped to broadcast over a tile."""
    return v[:, None, None]


@triton.jit
def _affine(ptr, chans, ok, HAS: tl.constexpr, default: tl.constexpr):
    """Per-channel γ or β at the tile's channels (BLOCK_G, BLOCK_CG, 1); ``default`` when absent."""
    if HAS:
        v = tl.load(ptr + chans, mask=ok, other=0.0).to(tl.float32)
    else:
        v = tl.full(chans.shape, default, tl.float32)
    return v


@triton.jit
def group_forward_kernel(x_ptr, res_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, S, G, CG, eps, sN, sC, sS, act_p,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr,
                         LANE_STEPS: tl.constexpr):
    """Program (n, group block): each group's (mean, var), then y = act(x̂·γ + β + residual)."""
    n = tl.program_id(0)
    g = _groups(tl.program_id(1) * BLOCK_G, BLOCK_G)
    base = n * sN
    # pass 1: statistics of x − pivot (the group's first value: keeps sums small for large means).
    # Blocks of LANE_STEPS tiles: one fp32 Welford triple per tile lane (no cross-lane work in the
    # inner loop), the lanes merged into the block's (n, μ, M2), and the blocks merged in fp64.
    pivot = tl.load(x_ptr + base + g * CG * sC, mask=g < G, other=0.0).to(tl.float32)
    tiles_s = tl.cdiv(S, BLOCK_S)
    tiles = tl.cdiv(CG, BLOCK_CG) * tiles_s
    n_g = tl.zeros([BLOCK_G, 1, 1], dtype=tl.float64)
    mean_g = tl.zeros([BLOCK_G, 1, 1], dtype=tl.float64)
    m2_g = tl.zeros([BLOCK_G, 1, 1], dtype=tl.float64)
    for t0 in range(0, tiles, LANE_STEPS):
        count = tl.zeros([BLOCK_G, BLOCK_CG, BLOCK_S], dtype=tl.float32)
        mean = tl.zeros([BLOCK_G, BLOCK_CG, BLOCK_S], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_G, BLOCK_CG, BLOCK_S], dtype=tl.float32)
        for t in range(t0, tl.minimum(t0 + LANE_STEPS, tiles)):
            tc = t // tiles_s
            off, ok = _tile(base, g, tc * BLOCK_CG, (t - tc * tiles_s) * BLOCK_S, G, CG, S, sC, sS, BLOCK_CG,
                            BLOCK_S)
            x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) - pivot
            count, mean, m2 = welford_step(count, mean, m2, x, ok)
        n_b = _col(_per_group(count))
        mean_b = _col(_per_group(count * mean)) / tl.maximum(n_b, 1.0)
        d = mean - mean_b
        m2_b = _col(_per_group(m2 + count * d * d))
        n_g, mean_g, m2_g = chan_merge(n_g, mean_g, m2_g, n_b.to(tl.float64), mean_b.to(tl.float64),
                                       m2_b.to(tl.float64))
    var = tl.maximum(m2_g / tl.maximum(n_g, 1.0), 0.0).to(tl.float32)
    mean = (mean_g + pivot).to(tl.float32)  # rounded once
    rstd = 1.0 / tl.sqrt(var + eps)
    stat = n * G + g
    tl.store(mean_ptr + stat, mean, mask=g < G)
    tl.store(var_ptr + stat, var, mask=g < G)
    # pass 2: normalize, affine, residual, activation
    for c0 in range(0, CG, BLOCK_CG):
        chans, c_ok = _channels(g, c0, CG, BLOCK_CG)
        w = _affine(w_ptr, chans, c_ok & (g < G), HAS_W, 1.0)
        b = _affine(b_ptr, chans, c_ok & (g < G), HAS_B, 0.0)
        for s0 in range(0, S, BLOCK_S):
            off, ok = _tile(base, g, c0, s0, G, CG, S, sC, sS, BLOCK_CG, BLOCK_S)
            x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
            z = (x - mean) * rstd * w + b
            if HAS_RES:
                z += tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + off, activation(z, ACT, act_p).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _group_terms(x_ptr, dy_ptr, res_ptr, off, ok, mean, rstd, w, b, act_p, HAS_RES: tl.constexpr,
                 ACT: tl.constexpr):
    """x̂ and dz = dy·act'(z) of one tile (zeros where masked)."""
    x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    xhat = tl.where(ok, (x - mean) * rstd, 0.0)
    dz = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if ACT != 0:
        z = xhat * w + b
        if HAS_RES:
            z += tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dz = dz * activation_grad(z, ACT, act_p)
    return xhat, dz


@triton.jit
def group_backward_kernel(x_ptr, dy_ptr, res_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, dz_ptr, part_ptr,
                          C, S, G, CG, sN, sC, sS, act_p, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          HAS_RES: tl.constexpr, ACT: tl.constexpr, NEED_DW: tl.constexpr,
                          STORE_DZ: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
                          BLOCK_S: tl.constexpr, LANE_STEPS: tl.constexpr):
    """Program (n, group block): dx (and dz) of its groups; the sample's dγ/dβ shares in part[n, 0/1, c]."""
    n = tl.program_id(0)
    g = _groups(tl.program_id(1) * BLOCK_G, BLOCK_G)
    base = n * sN
    mean = tl.load(mean_ptr + n * G + g, mask=g < G, other=0.0)
    rstd = tl.load(rstd_ptr + n * G + g, mask=g < G, other=0.0)
    # pass 1: per channel, Σ_s dz and Σ_s dz·x̂ (the sample's dβ/dγ shares) — fp32 lanes over blocks
    # of LANE_STEPS tiles, the blocks added in fp64 — and from them the group sums
    # Σg = Σ_c γ_c·Σ_s dz and Σg·x̂ = Σ_c γ_c·Σ_s dz·x̂, in fp64.
    tiles_s = tl.cdiv(S, BLOCK_S)
    sum_g = tl.zeros([BLOCK_G, 1, 1], dtype=tl.float64)
    sum_gx = tl.zeros([BLOCK_G, 1, 1], dtype=tl.float64)
    for c0 in range(0, CG, BLOCK_CG):
        chans, c_ok = _channels(g, c0, CG, BLOCK_CG)
        w = _affine(w_ptr, chans, c_ok & (g < G), HAS_W, 1.0)
        b = _affine(b_ptr, chans, c_ok & (g < G), HAS_B, 0.0)
        dz_c = tl.zeros([BLOCK_G, BLOCK_CG, 1], dtype=tl.float64)
        dzx_c = tl.zeros([BLOCK_G, BLOCK_CG, 1], dtype=tl.float64)
        for t0 in range(0, tiles_s, LANE_STEPS):
            acc_dz = tl.zeros([BLOCK_G, BLOCK_CG, BLOCK_S], dtype=tl.float32)
            acc_dzx = tl.zeros([BLOCK_G, BLOCK_CG, BLOCK_S], dtype=tl.float32)
            for t in range(t0, tl.minimum(t0 + LANE_STEPS, tiles_s)):
                off, ok = _tile(base, g, c0, t * BLOCK_S, G, CG, S, sC, sS, BLOCK_CG, BLOCK_S)
                xhat, dz = _group_terms(x_ptr, dy_ptr, res_ptr, off, ok, mean, rstd, w, b, act_p, HAS_RES, ACT)
                acc_dz += dz
                acc_dzx += dz * xhat
            dz_c += tl.sum(acc_dz, axis=2)[:, :, None].to(tl.float64)
            dzx_c += tl.sum(acc_dzx, axis=2)[:, :, None].to(tl.float64)
        w64 = w.to(tl.float64)
        sum_g += _col(_per_group(w64 * dz_c))
        sum_gx += _col(_per_group(w64 * dzx_c))
        if NEED_DW:
            out = part_ptr + n * 2 * C + chans
            tl.store(out, dzx_c, mask=c_ok & (g < G))
            tl.store(out + C, dz_c, mask=c_ok & (g < G))
    size = CG * S
    mean_g = (sum_g / size).to(tl.float32)
    mean_gx = (sum_gx / size).to(tl.float32)
    # pass 2: dx
    for c0 in range(0, CG, BLOCK_CG):
        chans, c_ok = _channels(g, c0, CG, BLOCK_CG)
        w = _affine(w_ptr, chans, c_ok & (g < G), HAS_W, 1.0)
        b = _affine(b_ptr, chans, c_ok & (g < G), HAS_B, 0.0)
        for s0 in range(0, S, BLOCK_S):
            off, ok = _tile(base, g, c0, s0, G, CG, S, sC, sS, BLOCK_CG, BLOCK_S)
            xhat, dz = _group_terms(x_ptr, dy_ptr, res_ptr, off, ok, mean, rstd, w, b, act_p, HAS_RES, ACT)
            dx = rstd * (dz * w - mean_g - xhat * mean_gx)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
            if STORE_DZ:
                tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
def _np2(k):
    return triton.next_power_of_2(max(int(k), 1))


def plan(x, num_groups, tile):
    """Strides of the (n, c, s) view, a layout-suited tile and the grid, for a dense (N, C, *) ``x``."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    cg = c // num_groups
    if x.is_contiguous():  # NCHW: one group per program, long runs along s
        strides = (c * s, s, 1)
        bg, bs = 1, min(_np2(s), tile)
        bcg = min(_np2(cg), max(1, tile // bs))
    else:  # channels_last: several groups per program, a tile row spans up to 64 adjacent channels
        strides = (s * c, 1, c)
        bcg = min(_np2(cg), 64, tile)
        bg = max(1, min(_np2(num_groups), 64 // bcg, tile // bcg))
        bs = min(_np2(s), max(1, tile // (bg * bcg)))
    return dict(n=n, c=c, s=s, cg=cg, strides=strides, grid=(n, triton.cdiv(num_groups, bg)),
                blocks=dict(BLOCK_G=bg, BLOCK_CG=bcg, BLOCK_S=bs))


def group_forward(x, num_groups, weight, bias, eps, residual, act, *, tile=2048):
    """(y, mean (N, G), var (N, G)); statistics fp32, y in x's dtype and memory format. ``act``: the code."""
    act, act_p = act_args(act)
    p = plan(x, num_groups, tile)
    y = torch.empty_like(x)
    mean = torch.empty(p["n"], num_groups, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    group_forward_kernel[p["grid"]](
        x, residual if residual is not None else x, y, weight if weight is not None else x,
        bias if bias is not None else x, mean, var, p["s"], num_groups, p["cg"], eps, *p["strides"], act_p,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None, ACT=act,
        LANE_STEPS=LANE_STEPS, **p["blocks"],
    )
    return y, mean, var


def group_backward(x, dy, mean, rstd, num_groups, weight, bias, residual, act, need_dweight, need_dz, *,
                   tile=2048):
    """(dx, dγ or None, dβ or None, dz or None); dγ/dβ fp32 (C,) summed from N per-sample shares."""
    act, act_p = act_args(act)
    p = plan(x, num_groups, tile)
    n, c = p["n"], p["c"]
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if need_dz else None
    part = torch.empty(n, 2 * c, device=x.device, dtype=torch.float64) if need_dweight else mean
    group_backward_kernel[p["grid"]](
        x, dy, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, mean, rstd, dx, dz if need_dz else dx, part,
        c, p["s"], num_groups, p["cg"], *p["strides"], act_p,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None and act != 0,
        ACT=act,
        NEED_DW=need_dweight, STORE_DZ=need_dz, LANE_STEPS=LANE_STEPS, **p["blocks"],
    )
    if not need_dweight:
        return dx, None, None, dz
    sums = sum_partials(part, torch.empty(2 * c, device=x.device, dtype=torch.float32))
    return dx, sums[:c].clone(), sums[c:].clone(), dz  # op outputs must not alias
