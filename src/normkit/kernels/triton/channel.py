"""Channel family (BatchNorm and friends): per-channel statistics over N × spatial.

Math (DESIGN.md §1). For channel c and its m = N·S values x_i (S = product of spatial sizes):

    μ_c = 1/m Σ x_i,   σ²_c = 1/m Σ (x_i − μ_c)²                       (stats)
    y   = act(x·scale_c + shift_c + residual)                          (apply)
    z   = x·scale_c + shift_c + residual,  dz = dy·act'(z),  x̂ = (x − μ_c)·rstd_c
    Σdz, Σdz·x̂ per channel                                             (backward reduce)
    dx  = scale_c·(dz − mean_dz_c − x̂·mean_dzx̂_c)                      (backward dx)

Layout. ``x`` is viewed as (n, c, s) with s the flattened spatial index, and the m = N·S rows
of a channel as one flat index r = n·S + s:

    NCHW (contiguous)       offset = n·C·S + c·S + s     -> a channel is N runs of S contiguous values
    NHWC (channels_last)    offset = r·C + c             -> a channel is a column of an (N·S, C) matrix

A (N, C) input is the NHWC case with S = 1. The reductions use a (BLOCK_M rows × BLOCK_C
channels) tile: NHWC tiles span up to 64 adjacent channels (coalesced along C), NCHW tiles hold
one channel and BLOCK_M consecutive values (coalesced along s).

Split reduction. One channel's m values are cut into P chunks of ``rows_per_prog`` rows and the
grid is (channel tiles, P), so a channel does not serialize the GPU (BatchNorm at ResNet shapes
has C = 64 channels of 3.2 M values each). Each program writes a partial (mean, M2) — merged in
a second kernel with Chan's formula — or partial sums for the backward, summed in a fixed order.
No atomics: same input, same bits, on every run. The statistics are computed on x − pivot_c
(pivot_c = the channel's first value), so a large common offset (1e4 + randn) neither cancels
in M2 nor blurs the partial means; the mean is rounded once, at the end.

Limits: float16/bfloat16/float32 input (fp32 accumulation, fp32 statistics); fewer than 2³¹
elements (32-bit offsets); x, dy, residual share one dense layout (the ops layer guarantees it).
The NCHW offsets cost an integer division per element.
"""

import torch
import triton
import triton.language as tl

from ._common import ACT_CODES, activation, activation_grad, chan_merge, sum_partials


@triton.jit
def _offsets(r, c, C, S, CHANNELS_LAST: tl.constexpr):
    """Element offsets of flat rows ``r`` = n·S + s (BLOCK_M, 1) and channels ``c`` (1, BLOCK_C)."""
    if CHANNELS_LAST:
        off = r * C + c
    else:
        n = r // S
        off = n * (C * S) + c * S + (r - n * S)
    return off


@triton.jit
def _dz(x, dy, res_ptr, off, ok, scale, shift, HAS_RES: tl.constexpr, ACT: tl.constexpr):
    """dz = dy·act'(z) with the pre-activation z = x·scale + shift (+ residual) recomputed."""
    if ACT != 0:
        z = x * scale + shift
        if HAS_RES:
            z += tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dy = dy * activation_grad(z, ACT)
    return dy


# ----------------------------------------------------------------------------- statistics
@triton.jit
def channel_stats_partial_kernel(x_ptr, mean_part_ptr, m2_part_ptr, C, S, R, rows_per_prog,
                                 CHANNELS_LAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (t, p): (mean − pivot, M2) of rows [p·rows_per_prog, …) for the channels of tile t.

    pivot_c = x[row 0, c], the same for every program: sums of x − pivot stay small, so the
    partial means keep their precision when every x is ≈ 1e4 (the "shifted data" algorithm).
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    pivot = tl.load(x_ptr + _offsets(0, c, C, S, CHANNELS_LAST), mask=c_ok, other=0.0).to(tl.float32)[None, :]
    start = tl.program_id(1) * rows_per_prog
    end = tl.minimum(start + rows_per_prog, R)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        ok = (r < end)[:, None] & c_ok[None, :]
        off = _offsets(r[:, None], c[None, :], C, S, CHANNELS_LAST)
        x = tl.where(ok, tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) - pivot, 0.0)
        # this block's own two-pass statistics, from registers ...
        n_b = tl.minimum(end - r0, BLOCK_M).to(tl.float32)
        mean_b = tl.sum(x, axis=0) / n_b
        d = tl.where(ok, x - mean_b[None, :], 0.0)
        # ... merged into the running ones (Chan)
        count, mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, tl.sum(d * d, axis=0))
    out = tl.program_id(1) * C + c
    tl.store(mean_part_ptr + out, mean, mask=c_ok)
    tl.store(m2_part_ptr + out, m2, mask=c_ok)


@triton.jit
def channel_stats_merge_kernel(x_ptr, mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, C, S, R, rows_per_prog, P,
                               CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge P partials per channel (means relative to the pivot):

        μ − pivot = Σ n_p·μ'_p / m,   M2 = Σ M2_p + n_p·(μ'_p − (μ − pivot))²
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        n_p = tl.where(p < P, tl.minimum(R - p * rows_per_prog, rows_per_prog), 0).to(tl.float32)
        mean_p = tl.load(mean_part_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        acc += n_p[:, None] * mean_p
    shifted = tl.sum(acc, axis=0) / R
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        n_p = tl.where(p < P, tl.minimum(R - p * rows_per_prog, rows_per_prog), 0).to(tl.float32)
        mean_p = tl.load(mean_part_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        m2_p = tl.load(m2_part_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        d = mean_p - shifted[None, :]
        acc += tl.where(ok, m2_p + n_p[:, None] * d * d, 0.0)
    pivot = tl.load(x_ptr + _offsets(0, c, C, S, CHANNELS_LAST), mask=c_ok, other=0.0).to(tl.float32)
    tl.store(mean_ptr + c, pivot + shifted, mask=c_ok)
    tl.store(var_ptr + c, tl.maximum(tl.sum(acc, axis=0) / R, 0.0), mask=c_ok)


# ----------------------------------------------------------------------------- backward reduce
@triton.jit
def channel_backward_reduce_partial_kernel(x_ptr, dy_ptr, res_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr,
                                           part_ptr, C, S, R, rows_per_prog, HAS_RES: tl.constexpr,
                                           ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (t, p): Σdz and Σdz·x̂ over its rows, stored as part[p, 0, c] and part[p, 1, c]."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + c, mask=c_ok, other=0.0)[None, :]
    scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)[None, :]
    start = tl.program_id(1) * rows_per_prog
    end = tl.minimum(start + rows_per_prog, R)
    acc_dz = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_dzx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        ok = (r < end)[:, None] & c_ok[None, :]
        off = _offsets(r[:, None], c[None, :], C, S, CHANNELS_LAST)
        x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dz = _dz(x, dy, res_ptr, off, ok, scale, shift, HAS_RES, ACT)  # 0 where masked (dy = 0)
        acc_dz += dz
        acc_dzx += dz * ((x - mean) * rstd)
    out = tl.program_id(1) * 2 * C + c
    tl.store(part_ptr + out, tl.sum(acc_dz, axis=0), mask=c_ok)
    tl.store(part_ptr + out + C, tl.sum(acc_dzx, axis=0), mask=c_ok)


# ----------------------------------------------------------------------------- elementwise
@triton.jit
def channel_apply_kernel(x_ptr, res_ptr, y_ptr, scale_ptr, shift_ptr, numel, C, inner,
                         HAS_RES: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(x·scale_c + shift_c + residual) over the flat memory order; c = (i // inner) mod C."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    c = (i // inner) % C  # inner = S for NCHW, 1 for NHWC (Triton specializes the 1 away)
    z = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32) * tl.load(scale_ptr + c, mask=ok, other=0.0)
    z += tl.load(shift_ptr + c, mask=ok, other=0.0)
    if HAS_RES:
        z += tl.load(res_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, activation(z, ACT).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def channel_backward_dx_kernel(x_ptr, dy_ptr, res_ptr, dx_ptr, dz_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr,
                               mean_dz_ptr, mean_dzx_ptr, numel, C, inner, HAS_RES: tl.constexpr,
                               ACT: tl.constexpr, STORE_DZ: tl.constexpr, BLOCK: tl.constexpr):
    """dx = scale_c·(dz − mean_dz_c − x̂·mean_dzx̂_c); also stores dz (the residual's gradient)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    c = (i // inner) % C
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + i, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=ok, other=0.0)
    shift = tl.load(shift_ptr + c, mask=ok, other=0.0)
    dz = _dz(x, dy, res_ptr, i, ok, scale, shift, HAS_RES, ACT)
    xhat = (x - tl.load(mean_ptr + c, mask=ok, other=0.0)) * tl.load(rstd_ptr + c, mask=ok, other=0.0)
    dx = scale * (dz - tl.load(mean_dz_ptr + c, mask=ok, other=0.0) - xhat * tl.load(mean_dzx_ptr + c, mask=ok,
                                                                                         other=0.0))
    tl.store(dx_ptr + i, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if STORE_DZ:
        tl.store(dz_ptr + i, dz.to(dz_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
def geometry(x):
    """(N, C, S, channels_last) of a dense (N, C, *spatial) tensor; (N, C) counts as channels_last."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    return n, c, s, (s == 1 or not x.is_contiguous())


def _reduction_grid(x, programs, tile, rows_per_prog):
    """Tile shape and split of the (N·S rows × C channels) reduction: enough programs to fill the device."""
    n, c, s, channels_last = geometry(x)
    rows = n * s
    if channels_last:
        block_c = min(triton.next_power_of_2(c), 64)
        block_m = max(1, min(triton.next_power_of_2(rows), tile // block_c))
    else:
        block_c = 1
        block_m = min(triton.next_power_of_2(rows), tile)
    c_tiles = triton.cdiv(c, block_c)
    if rows_per_prog is None:
        chunks = max(1, min(triton.cdiv(programs, c_tiles), triton.cdiv(rows, block_m)))
        rows_per_prog = triton.cdiv(triton.cdiv(rows, chunks), block_m) * block_m
    chunks = triton.cdiv(rows, rows_per_prog)
    return dict(c=c, s=s, rows=rows, channels_last=channels_last, block_m=block_m, block_c=block_c,
                grid=(c_tiles, chunks), rows_per_prog=rows_per_prog)


def channel_stats(x, *, programs, tile=2048, rows_per_prog=None):
    """Per-channel (mean, biased var) in fp32, shape (C,). ``programs``: how many to aim for."""
    g = _reduction_grid(x, programs, tile, rows_per_prog)
    c, chunks = g["c"], g["grid"][1]
    mean_part = torch.empty(chunks, c, device=x.device, dtype=torch.float32)
    m2_part = torch.empty_like(mean_part)
    channel_stats_partial_kernel[g["grid"]](
        x, mean_part, m2_part, c, g["s"], g["rows"], g["rows_per_prog"],
        CHANNELS_LAST=g["channels_last"], BLOCK_M=g["block_m"], BLOCK_C=g["block_c"],
    )
    mean = torch.empty(c, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    block_c = min(triton.next_power_of_2(c), 128)
    channel_stats_merge_kernel[(triton.cdiv(c, block_c),)](
        x, mean_part, m2_part, mean, var, c, g["s"], g["rows"], g["rows_per_prog"], chunks,
        CHANNELS_LAST=g["channels_last"], BLOCK_P=min(triton.next_power_of_2(chunks), 32), BLOCK_C=block_c,
    )
    return mean, var


def channel_backward_reduce(x, dy, residual, mean, rstd, scale, shift, act, *, programs, tile=2048,
                            rows_per_prog=None):
    """(Σdz, Σdz·x̂) per channel in fp32, each (C,)."""
    g = _reduction_grid(x, programs, tile, rows_per_prog)
    c, chunks = g["c"], g["grid"][1]
    part = torch.empty(chunks, 2 * c, device=x.device, dtype=torch.float32)
    channel_backward_reduce_partial_kernel[g["grid"]](
        x, dy, residual if residual is not None else x, mean, rstd, scale, shift, part,
        c, g["s"], g["rows"], g["rows_per_prog"], HAS_RES=residual is not None, ACT=ACT_CODES[act],
        CHANNELS_LAST=g["channels_last"], BLOCK_M=g["block_m"], BLOCK_C=g["block_c"],
    )
    sums = sum_partials(part, torch.empty(2 * c, device=x.device, dtype=torch.float32))
    return sums[:c].clone(), sums[c:].clone()  # separate tensors: op outputs must not alias


def _elementwise(x, block):
    n, c, s, channels_last = geometry(x)
    return x.numel(), c, (1 if channels_last else s), (triton.cdiv(x.numel(), block),)


def channel_apply(x, scale, shift, residual, act, *, block=1024):
    """y = act(x·scale + shift + residual) in x's dtype and memory format."""
    numel, c, inner, grid = _elementwise(x, block)
    y = torch.empty_like(x)
    channel_apply_kernel[grid](x, residual if residual is not None else x, y, scale, shift, numel, c, inner,
                               HAS_RES=residual is not None, ACT=ACT_CODES[act], BLOCK=block)
    return y


def channel_backward_dx(x, dy, residual, mean, rstd, scale, shift, act, mean_dz, mean_dzx, need_dz, *,
                        block=1024):
    """(dx, dz or None) in x's dtype and memory format."""
    numel, c, inner, grid = _elementwise(x, block)
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if need_dz else None
    channel_backward_dx_kernel[grid](
        x, dy, residual if residual is not None else x, dx, dz if need_dz else dx, mean, rstd, scale, shift,
        mean_dz, mean_dzx, numel, c, inner, HAS_RES=residual is not None, ACT=ACT_CODES[act],
        STORE_DZ=need_dz, BLOCK=block,
    )
    return dx, dz
