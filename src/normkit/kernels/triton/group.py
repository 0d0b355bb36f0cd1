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

One program per (sample, group) walks the group in (BLOCK_CG channels × BLOCK_S positions)
tiles, channel blocks outside, positions inside. The tile shape follows the layout: long
along s for NCHW (coalesced runs of one channel), across the group's channels for NHWC.
Forward: pass 1 merges per-tile (mean, M2) of x − x_first with Chan's formula (the shift keeps a
large common offset from blurring the sums); pass 2 normalizes and stores.
Backward: pass 1 forms Σg and Σg·x̂ for the group and, per channel, the sample's share of dγ/dβ,
stored in a (N, 2, C) fp32 buffer (each program writes only its own entries); pass 2 forms dx.
A second kernel sums the N shares in a fixed order: deterministic, no atomics.

Limits: float16/bfloat16/float32 (fp32 statistics); fewer than 2³¹ elements; N·G programs
(with few, huge groups the GPU is under-used); on NHWC a group with few channels (CG = 2 for
GroupNorm(32) on 64 channels) reads short runs, relying on the cache for the neighbouring groups.
"""

import torch
import triton
import triton.language as tl

from ._common import ACT_CODES, activation, activation_grad, chan_merge, sum_partials


@triton.jit
def _channels(c0, BLOCK_CG: tl.constexpr):
    """Group-local channel indices of the channel block starting at c0."""
    return c0 + tl.arange(0, BLOCK_CG)


@triton.jit
def _tile(base, c0, s0, CG, S, sC, sS, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of the (BLOCK_CG × BLOCK_S) tile at (c0, s0)."""
    cj = _channels(c0, BLOCK_CG)
    ss = s0 + tl.arange(0, BLOCK_S)
    ok = (cj < CG)[:, None] & (ss < S)[None, :]
    return base + cj[:, None] * sC + ss[None, :] * sS, ok


@triton.jit
def _affine(ptr, chans, ok_c, HAS: tl.constexpr, default: tl.constexpr, BLOCK_CG: tl.constexpr):
    """Per-channel γ or β as a (BLOCK_CG, 1) column; ``default`` when absent."""
    if HAS:
        v = tl.load(ptr + chans, mask=ok_c, other=0.0).to(tl.float32)[:, None]
    else:
        v = tl.full([BLOCK_CG, 1], default, tl.float32)
    return v


@triton.jit
def group_forward_kernel(x_ptr, res_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, S, G, CG, eps, sN, sC, sS,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                         BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program n·G + g: the group's (mean, var), then y = act(x̂·γ + β + residual)."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid - n * G
    base = n * sN + g * CG * sC
    # pass 1: statistics of x − pivot (the group's first value: keeps sums small for large means)
    pivot = tl.load(x_ptr + base).to(tl.float32)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, CG, BLOCK_CG):
        for s0 in range(0, S, BLOCK_S):
            off, ok = _tile(base, c0, s0, CG, S, sC, sS, BLOCK_CG, BLOCK_S)
            x = tl.where(ok, tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) - pivot, 0.0)
            n_b = (tl.minimum(CG - c0, BLOCK_CG) * tl.minimum(S - s0, BLOCK_S)).to(tl.float32)
            mean_b = tl.sum(x) / n_b
            d = tl.where(ok, x - mean_b, 0.0)
            count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, tl.sum(d * d))
    mean += pivot
    var = tl.maximum(m2 / count, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(var_ptr + pid, var)
    # pass 2: normalize, affine, residual, activation
    for c0 in range(0, CG, BLOCK_CG):
        cj = _channels(c0, BLOCK_CG)
        w = _affine(w_ptr, g * CG + cj, cj < CG, HAS_W, 1.0, BLOCK_CG)
        b = _affine(b_ptr, g * CG + cj, cj < CG, HAS_B, 0.0, BLOCK_CG)
        for s0 in range(0, S, BLOCK_S):
            off, ok = _tile(base, c0, s0, CG, S, sC, sS, BLOCK_CG, BLOCK_S)
            x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
            z = (x - mean) * rstd * w + b
            if HAS_RES:
                z += tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + off, activation(z, ACT).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _group_terms(x_ptr, dy_ptr, res_ptr, off, ok, mean, rstd, w, b, HAS_RES: tl.constexpr, ACT: tl.constexpr):
    """x̂ and dz = dy·act'(z) of one tile (zeros where masked)."""
    x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    xhat = tl.where(ok, (x - mean) * rstd, 0.0)
    dz = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if ACT != 0:
        z = xhat * w + b
        if HAS_RES:
            z += tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dz = dz * activation_grad(z, ACT)
    return xhat, dz


@triton.jit
def group_backward_kernel(x_ptr, dy_ptr, res_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, dz_ptr, part_ptr,
                          C, S, G, CG, sN, sC, sS, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          HAS_RES: tl.constexpr, ACT: tl.constexpr, NEED_DW: tl.constexpr,
                          STORE_DZ: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program n·G + g: dx (and dz) of the group; the sample's dγ/dβ shares in part[n, 0/1, c]."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid - n * G
    base = n * sN + g * CG * sC
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    # pass 1: Σg, Σg·x̂ over the group; per channel Σ_s dz·x̂ and Σ_s dz
    sum_g = 0.0
    sum_gx = 0.0
    for c0 in range(0, CG, BLOCK_CG):
        cj = _channels(c0, BLOCK_CG)
        chans = g * CG + cj
        w = _affine(w_ptr, chans, cj < CG, HAS_W, 1.0, BLOCK_CG)
        b = _affine(b_ptr, chans, cj < CG, HAS_B, 0.0, BLOCK_CG)
        acc_dw = tl.zeros([BLOCK_CG, BLOCK_S], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_CG, BLOCK_S], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            off, ok = _tile(base, c0, s0, CG, S, sC, sS, BLOCK_CG, BLOCK_S)
            xhat, dz = _group_terms(x_ptr, dy_ptr, res_ptr, off, ok, mean, rstd, w, b, HAS_RES, ACT)
            gg = dz * w
            sum_g += tl.sum(gg)
            sum_gx += tl.sum(gg * xhat)
            if NEED_DW:
                acc_dw += dz * xhat
                acc_db += dz
        if NEED_DW:
            out = part_ptr + n * 2 * C + chans
            tl.store(out, tl.sum(acc_dw, axis=1), mask=cj < CG)
            tl.store(out + C, tl.sum(acc_db, axis=1), mask=cj < CG)
    size = CG * S
    mean_g = sum_g / size
    mean_gx = sum_gx / size
    # pass 2: dx
    for c0 in range(0, CG, BLOCK_CG):
        cj = _channels(c0, BLOCK_CG)
        w = _affine(w_ptr, g * CG + cj, cj < CG, HAS_W, 1.0, BLOCK_CG)
        b = _affine(b_ptr, g * CG + cj, cj < CG, HAS_B, 0.0, BLOCK_CG)
        for s0 in range(0, S, BLOCK_S):
            off, ok = _tile(base, c0, s0, CG, S, sC, sS, BLOCK_CG, BLOCK_S)
            xhat, dz = _group_terms(x_ptr, dy_ptr, res_ptr, off, ok, mean, rstd, w, b, HAS_RES, ACT)
            dx = rstd * (dz * w - mean_g - xhat * mean_gx)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
            if STORE_DZ:
                tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
def _geometry(x, num_groups, tile):
    """Strides of the (n, c, s) view and a layout-suited tile for a dense (N, C, *spatial) ``x``."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    cg = c // num_groups
    if x.is_contiguous():  # NCHW: long runs along s
        strides = (c * s, s, 1)
        block_s = min(triton.next_power_of_2(s), tile)
        block_cg = min(triton.next_power_of_2(cg), max(1, tile // block_s))
    else:  # channels_last: across the group's adjacent channels
        strides = (s * c, 1, c)
        block_cg = min(triton.next_power_of_2(cg), 64, tile)
        block_s = min(triton.next_power_of_2(s), max(1, tile // block_cg))
    return dict(n=n, c=c, s=s, cg=cg, strides=strides, BLOCK_CG=block_cg, BLOCK_S=block_s)


def group_forward(x, num_groups, weight, bias, eps, residual, act, *, tile=2048):
    """(y, mean (N, G), var (N, G)); statistics fp32, y in x's dtype and memory format."""
    geo = _geometry(x, num_groups, tile)
    y = torch.empty_like(x)
    mean = torch.empty(geo["n"], num_groups, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    group_forward_kernel[(geo["n"] * num_groups,)](
        x, residual if residual is not None else x, y, weight if weight is not None else x,
        bias if bias is not None else x, mean, var, geo["s"], num_groups, geo["cg"], eps, *geo["strides"],
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None, ACT=ACT_CODES[act],
        BLOCK_CG=geo["BLOCK_CG"], BLOCK_S=geo["BLOCK_S"],
    )
    return y, mean, var


def group_backward(x, dy, mean, rstd, num_groups, weight, bias, residual, act, need_dweight, need_dz, *,
                   tile=2048):
    """(dx, dγ or None, dβ or None, dz or None); dγ/dβ fp32 (C,) summed from N per-sample shares."""
    geo = _geometry(x, num_groups, tile)
    n, c = geo["n"], geo["c"]
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if need_dz else None
    part = torch.empty(n, 2 * c, device=x.device, dtype=torch.float32) if need_dweight else mean
    group_backward_kernel[(n * num_groups,)](
        x, dy, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, mean, rstd, dx, dz if need_dz else dx, part,
        c, geo["s"], num_groups, geo["cg"], *geo["strides"],
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None, ACT=ACT_CODES[act],
        NEED_DW=need_dweight, STORE_DZ=need_dz, BLOCK_CG=geo["BLOCK_CG"], BLOCK_S=geo["BLOCK_S"],
    )
    if not need_dweight:
        return dx, None, None, dz
    sums = sum_partials(part, torch.empty(2 * c, device=x.device, dtype=torch.float32))
    return dx, sums[:c].clone(), sums[c:].clone(), dz  # op outputs must not alias
