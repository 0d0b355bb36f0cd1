"""LayerNorm over the channels of NCHW input (LayerNorm2d): a reduction across strided channels.

For ``x`` contiguous ``(N, C, S)`` (S = H·W), at each position ``(n, s)`` the C values
``x[n, :, s]`` (stride S apart) are one LayerNorm row. With ``g = dy·γ``:

    μ = 1/C Σ_c x,   σ² = 1/C Σ_c (x − μ)²,   rstd = 1/√(σ² + ε),   x̂ = (x − μ)·rstd,   y = x̂·γ + β
    dx = rstd·(g − mean_c(g) − x̂·mean_c(g·x̂)),   dγ = Σ_{n,s} dy·x̂,   dβ = Σ_{n,s} dy

A program owns ``BLOCK_S`` consecutive positions of one sample and walks the channels in
``[BLOCK_C, BLOCK_S]`` tiles (positions are contiguous: every load is coalesced along s). Each
lane (position) keeps its own statistics: per tile the exact two-pass (mean, M2) of its BLOCK_C
values, merged into the running ones with Chan's formula (``_common.chan_merge``), so a large
common offset costs no precision. Forward: pass 1 statistics, pass 2 y (x read twice; a program's
C × BLOCK_S block is usually still in L2). Backward: pass 1 Σ_c g and Σ_c g·x̂, pass 2 dx and
the program's share of dγ/dβ, written to its own row of a (P, C) fp32 buffer that
``sum_partials`` adds in a fixed order (deterministic, no atomics).

channels_last input needs none of this: its (N·S, C) view is a contiguous row matrix and runs on
the row kernels (``row.py``). Limits: float32/float16/bfloat16 with fp32 statistics; fewer than
2³¹ elements (32-bit offsets).
"""

import torch
import triton
import triton.language as tl

from ._common import chan_merge, sum_partials


@triton.jit
def ln2d_forward_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, S, eps, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (n, s-block): statistics of BLOCK_S positions over C channels, then y."""
    n = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    c = tl.arange(0, BLOCK_C)
    base = n * C * S
    count = tl.zeros([BLOCK_S], dtype=tl.float32)
    mean = tl.zeros([BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_ok = c0 + c < C
        ok = c_ok[:, None] & s_ok[None, :]
        x = tl.load(x_ptr + base + (c0 + c)[:, None] * S + s[None, :], mask=ok, other=0.0).to(tl.float32)
        n_b = tl.minimum(C - c0, BLOCK_C).to(tl.float32)
        mean_b = tl.sum(x, axis=0) / n_b
        d = tl.where(ok, x - mean_b[None, :], 0.0)
        count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, tl.sum(d * d, axis=0))
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 / C, 0.0) + eps)
    tl.store(mean_ptr + n * S + s, mean, mask=s_ok)
    tl.store(rstd_ptr + n * S + s, rstd, mask=s_ok)
    for c0 in range(0, C, BLOCK_C):
        c_ok = c0 + c < C
        ok = c_ok[:, None] & s_ok[None, :]
        offs = base + (c0 + c)[:, None] * S + s[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * rstd[None, :]
        if HAS_W:
            y = y * tl.load(w_ptr + c0 + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_B:
            y = y + tl.load(b_ptr + c0 + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def ln2d_backward_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, part_w_ptr, part_b_ptr, C, S,
                         HAS_W: tl.constexpr, NEED_DW: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    """Program (n, s-block): dx of BLOCK_S positions; its share of dγ/dβ into row ``pid`` of the partials."""
    n = tl.program_id(0)
    sb = tl.program_id(1)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    c = tl.arange(0, BLOCK_C)
    base = n * C * S
    mean = tl.load(mean_ptr + n * S + s, mask=s_ok, other=0.0)
    rstd = tl.load(rstd_ptr + n * S + s, mask=s_ok, other=0.0)
    sum_g = tl.zeros([BLOCK_S], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_ok = c0 + c < C
        ok = c_ok[:, None] & s_ok[None, :]
        offs = base + (c0 + c)[:, None] * S + s[None, :]
        xhat = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
        g = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(w_ptr + c0 + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(tl.where(ok, g * xhat, 0.0), axis=0)
    mean_g = sum_g / C
    mean_gx = sum_gx / C
    pid = n * tl.num_programs(1) + sb
    for c0 in range(0, C, BLOCK_C):
        c_ok = c0 + c < C
        ok = c_ok[:, None] & s_ok[None, :]
        offs = base + (c0 + c)[:, None] * S + s[None, :]
        xhat = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = dy
        if HAS_W:
            g = g * tl.load(w_ptr + c0 + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        dx = rstd[None, :] * (g - mean_g[None, :] - xhat * mean_gx[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if NEED_DW:
            tl.store(part_w_ptr + pid * C + c0 + c, tl.sum(tl.where(ok, dy * xhat, 0.0), axis=1), mask=c_ok)
            tl.store(part_b_ptr + pid * C + c0 + c, tl.sum(dy, axis=1), mask=c_ok)


def _blocks(c: int, block_c: int | None, block_s: int | None) -> tuple[int, int]:
    """Tile sizes: 64 positions (coalesced loads), up to 4096 elements per tile."""
    block_s = block_s or 64
    block_c = block_c or max(1, min(triton.next_power_of_2(c), 4096 // block_s))
    return block_c, block_s


def ln2d_forward(x, weight, bias, eps, block_c=None, block_s=None):
    """``(y, mean, rstd)`` for contiguous ``x`` (N, C, *spatial); mean/rstd (N, *spatial) fp32."""
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    y = torch.empty_like(x)
    mean = torch.empty((n, *x.shape[2:]), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    bc, bs = _blocks(c, block_c, block_s)
    dummy = mean
    ln2d_forward_kernel[(n, triton.cdiv(s, bs))](
        x, y, weight if weight is not None else dummy, bias if bias is not None else dummy, mean, rstd, c, s,
        float(eps), HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=bc, BLOCK_S=bs)
    return y, mean, rstd


def ln2d_backward(x, dy, mean, rstd, weight, need_dweight, block_c=None, block_s=None):
    """``(dx, dweight, dbias)`` for contiguous ``x``/``dy``; dweight/dbias (C,) fp32 or None."""
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    bc, bs = _blocks(c, block_c, block_s)
    grid = (n, triton.cdiv(s, bs))
    dx = torch.empty_like(x)
    rows = grid[0] * grid[1] if need_dweight else 1
    part_w = torch.empty((rows, c), dtype=torch.float32, device=x.device)
    part_b = torch.empty_like(part_w)
    ln2d_backward_kernel[grid](
        x, dy, dx, weight if weight is not None else mean, mean, rstd, part_w, part_b, c, s,
        HAS_W=weight is not None, NEED_DW=bool(need_dweight), BLOCK_C=bc, BLOCK_S=bs)
    if not need_dweight:
        return dx, None, None
    dw = torch.empty(c, dtype=torch.float32, device=x.device)
    db = torch.empty_like(dw)
    return dx, sum_partials(part_w, dw), sum_partials(part_b, db)
