"""Channel family (BatchNorm and friends): per-channel statistics over N × spatial.

Math (DESIGN.md §1). For channel c and its m = N·S values x_i (S = product of spatial sizes):

    μ_c = 1/m Σ x_i,   σ²_c = 1/m Σ (x_i − μ_c)²                       (stats)
    y   = act(x·scale_c + shift_c + residual)                          (apply)
    z   = x·scale_c + shift_c + residual,  dz = dy·act'(z),  x̂ = (x − μ_c)·rstd_c
    Σdz, Σdz·x̂ per channel                                             (backward reduce)
    dx  = scale_c·(dz − mean_dz_c − x̂·mean_dzx̂_c)                      (backward dx)

Layout. Every kernel sees ``x`` as a 3-D strided view (n, c, s) with offset n·sN + c·sC + s·sS
and walks it in (BLOCK_N × BLOCK_C × BLOCK_S) tiles — no integer division per element:

    NCHW (contiguous)      view (N, C, S),    strides (C·S, S, 1)  tiles (·, 1, long): runs along s
    NHWC (channels_last)   view (N·S, C, 1),  strides (C, 1, 0)    tiles (·, ≤64, 1): runs along c

A (N, C) input is the NHWC case with S = 1.

Split reduction. Each channel's (n, s) plane is cut into P chunks — along n (samples for NCHW,
pixels for NHWC) and, when a small batch gives too few, along s too — and the grid is
(channel tiles, P), so a channel does not serialize the GPU (BatchNorm at ResNet
shapes has C = 64 channels of 3.2 M values each). Each program walks its chunk in blocks of
LANE_STEPS tiles: a Welford triple (backward: two sums) per tile lane in fp32 over the block (no
cross-lane work in the inner loop), the lanes merged, the blocks merged in fp64; it writes a
partial (mean, M2) in fp64 — merged in fp64 in a second kernel with Chan's formula — or fp64
partial sums for the backward, summed in fp64 in a fixed order. So the error does not grow with
the channel's length (BatchNorm over (2, 4, 2048, 2048) reduces 2²³ values per channel). No
atomics: same input, same bits, on every run. The statistics are computed on
x − pivot_c (pivot_c = the channel's first value), so a large common offset (1e4 + randn)
neither cancels in M2 nor blurs the partial means; the mean is rounded once, at the end.

Limits: float16/bfloat16/float32 input (fp32 blocks merged in fp64, fp32 statistics); fewer than 2³¹
elements (32-bit offsets); x, dy, residual share one dense layout (the ops layer guarantees it).
"""

import torch
import triton
import triton.language as tl

from ._common import LANE_STEPS, act_args, activation, activation_grad, chan_merge, sum_partials, welford_step


@triton.jit
def _tile(n0, c0, s0, n_end, C, S, sN, sC, sS,
          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets, mask and channel indices (1, BLOCK_C, 1) of the tile at (n0, c0, s0)."""
    n = (n0 + tl.arange(0, BLOCK_N))[:, None, None]
    c = (c0 + tl.arange(0, BLOCK_C))[None, :, None]
    s = (s0 + tl.arange(0, BLOCK_S))[None, None, :]
    return n * sN + c * sC + s * sS, (n < n_end) & (c < C) & (s < S), c


@triton.jit
def _channel_index(c0, BLOCK_C: tl.constexpr):
    """Channel indices c0 … c0 + BLOCK_C − 1 shaped (1, BLOCK_C, 1) to broadcast over a tile."""
    return (c0 + tl.arange(0, BLOCK_C))[None, :, None]


@triton.jit
def _chunk(p, N, S, n_per_prog, s_per_prog, S_CHUNKS):
    """The (n, s) ranges of chunk p: n in [n_start, n_end), s in [s_start, s_end)."""
    pn = p // S_CHUNKS
    ps = p - pn * S_CHUNKS
    n_start = pn * n_per_prog
    s_start = ps * s_per_prog
    return n_start, tl.minimum(n_start + n_per_prog, N), s_start, tl.minimum(s_start + s_per_prog, S)


@triton.jit
def _chunk_count(p, N, S, n_per_prog, s_per_prog, S_CHUNKS):
    """How many values chunk(s) p hold (p may be a vector)."""
    pn = p // S_CHUNKS
    ps = p - pn * S_CHUNKS
    return tl.minimum(N - pn * n_per_prog, n_per_prog) * tl.minimum(S - ps * s_per_prog, s_per_prog)


@triton.jit
def _sum_nc(t):
    """Sum a (BLOCK_N, BLOCK_C, BLOCK_S) tile over n and s: one value per channel, (BLOCK_C,)."""
    return tl.sum(tl.sum(t, axis=2), axis=0)


@triton.jit
def _per_channel(ptr, c, C):
    """A (C,) fp32 vector gathered at the tile's channels c (1, BLOCK_C, 1)."""
    return tl.load(ptr + c, mask=c < C, other=0.0)


@triton.jit
def _dz(x, dy, res_ptr, off, ok, scale, shift, act_p, HAS_RES: tl.constexpr, ACT: tl.constexpr):
    """dz = dy·act'(z) with the pre-activation z = x·scale + shift (+ residual) recomputed."""
    if ACT != 0:
        z = x * scale + shift
        if HAS_RES:
            z += tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dy = dy * activation_grad(z, ACT, act_p)
    return dy


# ----------------------------------------------------------------------------- statistics
@triton.jit
def _chunk_tile(t, n_start, s_start, tiles_s, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """(n0, s0) of tile t of a chunk, the chunk's tiles numbered n-major, tiles_s of them per n-row."""
    tn = t // tiles_s
    return n_start + tn * BLOCK_N, s_start + (t - tn * tiles_s) * BLOCK_S


@triton.jit
def channel_stats_partial_kernel(x_ptr, mean_part_ptr, m2_part_ptr, N, C, S, sN, sC, sS, n_per_prog,
                                 s_per_prog, S_CHUNKS,
                                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                                 LANE_STEPS: tl.constexpr):
    """Program (t, p): (mean − pivot, M2) over chunk p of the (n, s) plane, per channel of tile t (fp64).

    pivot_c = x[0, c, 0], the same for every program: sums of x − pivot stay small, so the
    partial means keep their precision when every x is ≈ 1e4 (the "shifted data" algorithm).
    The chunk is walked in blocks of LANE_STEPS tiles: one fp32 Welford triple per tile lane (no
    cross-lane work in the inner loop), the lanes merged into the block's per-channel (n, μ, M2),
    and the blocks merged in fp64 with Chan's formula.
    """
    c0 = tl.program_id(0) * BLOCK_C
    n_start, n_end, s_start, s_end = _chunk(tl.program_id(1), N, S, n_per_prog, s_per_prog, S_CHUNKS)
    c = _channel_index(c0, BLOCK_C)
    pivot = tl.load(x_ptr + c * sC, mask=c < C, other=0.0).to(tl.float32)
    tiles_s = tl.cdiv(s_end - s_start, BLOCK_S)
    tiles = tl.cdiv(n_end - n_start, BLOCK_N) * tiles_s
    n_c = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean_c = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2_c = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t0 in range(0, tiles, LANE_STEPS):
        count = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=tl.float32)
        mean = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=tl.float32)
        for t in range(t0, tl.minimum(t0 + LANE_STEPS, tiles)):
            n0, s0 = _chunk_tile(t, n_start, s_start, tiles_s, BLOCK_N, BLOCK_S)
            off, ok, _ = _tile(n0, c0, s0, n_end, C, s_end, sN, sC, sS, BLOCK_N, BLOCK_C, BLOCK_S)
            x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) - pivot
            count, mean, m2 = welford_step(count, mean, m2, x, ok)
        # merge the block's lanes per channel (Chan, two-pass over the lanes), then the block
        n_b = _sum_nc(count)
        mean_b = _sum_nc(count * mean) / tl.maximum(n_b, 1.0)
        d = mean - mean_b[None, :, None]
        m2_b = _sum_nc(m2 + count * d * d)
        n_c, mean_c, m2_c = chan_merge(n_c, mean_c, m2_c, n_b.to(tl.float64), mean_b.to(tl.float64),
                                       m2_b.to(tl.float64))
    out = tl.program_id(1) * C + c0 + tl.arange(0, BLOCK_C)
    tl.store(mean_part_ptr + out, mean_c, mask=c0 + tl.arange(0, BLOCK_C) < C)
    tl.store(m2_part_ptr + out, m2_c, mask=c0 + tl.arange(0, BLOCK_C) < C)


@triton.jit
def channel_stats_merge_kernel(x_ptr, mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, N, C, S, sC, n_per_prog,
                               s_per_prog, S_CHUNKS, P, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge P fp64 partials per channel in fp64, partial p holding n_p values (its chunk of the plane):

        μ − pivot = Σ n_p·μ'_p / m,   M2 = Σ M2_p + n_p·(μ'_p − (μ − pivot))²,   σ² = M2 / m
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    total = N * S
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        n_p = tl.where(p < P, _chunk_count(p, N, S, n_per_prog, s_per_prog, S_CHUNKS), 0).to(tl.float64)
        mean_p = tl.load(mean_part_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        acc += n_p[:, None] * mean_p
    shifted = tl.sum(acc, axis=0) / total
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        n_p = tl.where(p < P, _chunk_count(p, N, S, n_per_prog, s_per_prog, S_CHUNKS), 0).to(tl.float64)
        mean_p = tl.load(mean_part_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        m2_p = tl.load(m2_part_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        d = mean_p - shifted[None, :]
        acc += tl.where(ok, m2_p + n_p[:, None] * d * d, 0.0)
    pivot = tl.load(x_ptr + c * sC, mask=c_ok, other=0.0).to(tl.float64)
    tl.store(mean_ptr + c, (pivot + shifted).to(tl.float32), mask=c_ok)  # rounded once
    tl.store(var_ptr + c, tl.maximum(tl.sum(acc, axis=0) / total, 0.0).to(tl.float32), mask=c_ok)


# ----------------------------------------------------------------------------- backward reduce
@triton.jit
def channel_backward_reduce_partial_kernel(x_ptr, dy_ptr, res_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr,
                                           part_ptr, N, C, S, sN, sC, sS, n_per_prog, s_per_prog, S_CHUNKS,
                                           act_p, HAS_RES: tl.constexpr,
                                           ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                                           BLOCK_S: tl.constexpr, LANE_STEPS: tl.constexpr):
    """Program (t, p): Σdz and Σdz·x̂ over chunk p, stored (fp64) as part[p, 0, c] and part[p, 1, c]."""
    c0 = tl.program_id(0) * BLOCK_C
    n_start, n_end, s_start, s_end = _chunk(tl.program_id(1), N, S, n_per_prog, s_per_prog, S_CHUNKS)
    c = _channel_index(c0, BLOCK_C)
    mean = _per_channel(mean_ptr, c, C)
    rstd = _per_channel(rstd_ptr, c, C)
    scale = _per_channel(scale_ptr, c, C)
    shift = _per_channel(shift_ptr, c, C)
    tiles_s = tl.cdiv(s_end - s_start, BLOCK_S)
    tiles = tl.cdiv(n_end - n_start, BLOCK_N) * tiles_s
    sum_dz = tl.zeros([BLOCK_C], dtype=tl.float64)
    sum_dzx = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t0 in range(0, tiles, LANE_STEPS):  # fp32 lanes over LANE_STEPS tiles, the blocks added in fp64
        acc_dz = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=tl.float32)
        acc_dzx = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=tl.float32)
        for t in range(t0, tl.minimum(t0 + LANE_STEPS, tiles)):
            n0, s0 = _chunk_tile(t, n_start, s_start, tiles_s, BLOCK_N, BLOCK_S)
            off, ok, _ = _tile(n0, c0, s0, n_end, C, s_end, sN, sC, sS, BLOCK_N, BLOCK_C, BLOCK_S)
            x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
            dz = _dz(x, dy, res_ptr, off, ok, scale, shift, act_p, HAS_RES, ACT)  # 0 where masked (dy = 0)
            acc_dz += dz
            acc_dzx += dz * ((x - mean) * rstd)
        sum_dz += _sum_nc(acc_dz).to(tl.float64)
        sum_dzx += _sum_nc(acc_dzx).to(tl.float64)
    out = tl.program_id(1) * 2 * C + c0 + tl.arange(0, BLOCK_C)
    c_ok = c0 + tl.arange(0, BLOCK_C) < C
    tl.store(part_ptr + out, sum_dz, mask=c_ok)
    tl.store(part_ptr + out + C, sum_dzx, mask=c_ok)


# ----------------------------------------------------------------------------- elementwise
@triton.jit
def channel_apply_kernel(x_ptr, res_ptr, y_ptr, scale_ptr, shift_ptr, N, C, S, sN, sC, sS, act_p,
                         HAS_RES: tl.constexpr, ACT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """y = act(x·scale_c + shift_c + residual) on the tile of program (i, j, k)."""
    off, ok, c = _tile(tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_C, tl.program_id(2) * BLOCK_S,
                       N, C, S, sN, sC, sS, BLOCK_N, BLOCK_C, BLOCK_S)
    z = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) * _per_channel(scale_ptr, c, C)
    z += _per_channel(shift_ptr, c, C)
    if HAS_RES:
        z += tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, activation(z, ACT, act_p).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def channel_backward_dx_kernel(x_ptr, dy_ptr, res_ptr, dx_ptr, dz_ptr, mean_ptr, rstd_ptr, scale_ptr,
                               shift_ptr, mean_dz_ptr, mean_dzx_ptr, N, C, S, sN, sC, sS, act_p,
                               HAS_RES: tl.constexpr, ACT: tl.constexpr, STORE_DZ: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = scale_c·(dz − mean_dz_c − x̂·mean_dzx̂_c); also stores dz (the residual's gradient)."""
    off, ok, c = _tile(tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_C, tl.program_id(2) * BLOCK_S,
                       N, C, S, sN, sC, sS, BLOCK_N, BLOCK_C, BLOCK_S)
    x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
    scale = _per_channel(scale_ptr, c, C)
    dz = _dz(x, dy, res_ptr, off, ok, scale, _per_channel(shift_ptr, c, C), act_p, HAS_RES, ACT)
    xhat = (x - _per_channel(mean_ptr, c, C)) * _per_channel(rstd_ptr, c, C)
    dx = scale * (dz - _per_channel(mean_dz_ptr, c, C) - xhat * _per_channel(mean_dzx_ptr, c, C))
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if STORE_DZ:
        tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
def view3(x):
    """The (n, c, s) view of a dense (N, C, *spatial) tensor: sizes, strides, and whether it is NHWC."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    if s == 1 or not x.is_contiguous():  # channels_last (or no spatial dims): rows of C channels
        return dict(N=n * s, C=c, S=1, sN=c, sC=1, sS=0, channels_last=True)
    return dict(N=n, C=c, S=s, sN=c * s, sC=s, sS=1, channels_last=False)


def _args(v):
    return v["N"], v["C"], v["S"], v["sN"], v["sC"], v["sS"]


def _np2(k):
    return triton.next_power_of_2(max(int(k), 1))


def reduction_plan(x, programs, tile):
    """Tile and split of the per-channel reduction: about ``programs`` programs (at least one per tile).

    The (n, s) plane of each channel is cut into n-chunks, and — when N alone gives too few (NCHW
    with a small batch) — each n-chunk into s-chunks as well.
    """
    v = view3(x)
    if v["channels_last"]:
        bc = min(_np2(v["C"]), 64)
        bn, bs = max(1, min(_np2(v["N"]), tile // bc)), 1
    else:
        bc, bs = 1, min(_np2(v["S"]), tile)
        bn = max(1, min(_np2(v["N"]), tile // bs))
    c_tiles = triton.cdiv(v["C"], bc)
    want = max(1, triton.cdiv(programs, c_tiles))
    n_chunks = min(want, triton.cdiv(v["N"], bn))
    s_chunks = max(1, min(triton.cdiv(want, n_chunks), triton.cdiv(v["S"], bs)))
    n_per_prog = triton.cdiv(triton.cdiv(v["N"], n_chunks), bn) * bn
    s_per_prog = triton.cdiv(triton.cdiv(v["S"], s_chunks), bs) * bs
    n_chunks, s_chunks = triton.cdiv(v["N"], n_per_prog), triton.cdiv(v["S"], s_per_prog)
    return dict(view=v, blocks=dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_S=bs), n_per_prog=n_per_prog,
                s_per_prog=s_per_prog, s_chunks=s_chunks, grid=(c_tiles, n_chunks * s_chunks))


def _split(plan):
    return plan["n_per_prog"], plan["s_per_prog"], plan["s_chunks"]


def channel_stats(x, *, programs, tile=2048):
    """Per-channel (mean, biased var) in fp32, shape (C,). ``programs``: how many to aim for."""
    plan = reduction_plan(x, programs, tile)
    v, chunks = plan["view"], plan["grid"][1]
    mean_part = torch.empty(chunks, v["C"], device=x.device, dtype=torch.float64)
    m2_part = torch.empty_like(mean_part)
    channel_stats_partial_kernel[plan["grid"]](x, mean_part, m2_part, *_args(v), *_split(plan),
                                               LANE_STEPS=LANE_STEPS, **plan["blocks"])
    mean = torch.empty(v["C"], device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    block_c = min(_np2(v["C"]), 128)
    channel_stats_merge_kernel[(triton.cdiv(v["C"], block_c),)](
        x, mean_part, m2_part, mean, var, v["N"], v["C"], v["S"], v["sC"], *_split(plan), chunks,
        BLOCK_P=min(_np2(chunks), 32), BLOCK_C=block_c,
    )
    return mean, var


def channel_backward_reduce(x, dy, residual, mean, rstd, scale, shift, act, *, programs, tile=2048):
    """(Σdz, Σdz·x̂) per channel in fp32, each (C,). ``act``: the activation code (``_common.act_args``)."""
    act, act_p = act_args(act)
    plan = reduction_plan(x, programs, tile)
    v, chunks = plan["view"], plan["grid"][1]
    c = v["C"]
    part = torch.empty(chunks, 2 * c, device=x.device, dtype=torch.float64)
    channel_backward_reduce_partial_kernel[plan["grid"]](
        x, dy, residual if residual is not None else x, mean, rstd, scale, shift, part, *_args(v),
        *_split(plan), act_p, HAS_RES=residual is not None and act != 0, ACT=act, LANE_STEPS=LANE_STEPS,
        **plan["blocks"],
    )
    sums = sum_partials(part, torch.empty(2 * c, device=x.device, dtype=torch.float32))
    return sums[:c].clone(), sums[c:].clone()  # separate tensors: op outputs must not alias


def elementwise_plan(x, block):
    """Tiles of about ``block`` elements covering the view, and the 3-D grid over them."""
    v = view3(x)
    if v["channels_last"]:
        bc = min(_np2(v["C"]), 128)
        bn, bs = max(1, min(_np2(v["N"]), block // bc)), 1
    else:
        bs = min(_np2(v["S"]), block)
        bc, bn = max(1, min(_np2(v["C"]), block // bs)), 1
    grid = (triton.cdiv(v["N"], bn), triton.cdiv(v["C"], bc), triton.cdiv(v["S"], bs))
    return v, dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_S=bs), grid


def channel_apply(x, scale, shift, residual, act, *, block=1024):
    """y = act(x·scale + shift + residual) in x's dtype and memory format (``act``: the code, 0 = identity)."""
    act, act_p = act_args(act)
    v, blocks, grid = elementwise_plan(x, block)
    y = torch.empty_like(x)
    channel_apply_kernel[grid](x, residual if residual is not None else x, y, scale, shift, *_args(v), act_p,
                               HAS_RES=residual is not None, ACT=act, **blocks)
    return y


def channel_backward_dx(x, dy, residual, mean, rstd, scale, shift, act, mean_dz, mean_dzx, need_dz, *,
                        block=1024):
    """(dx, dz or None) in x's dtype and memory format."""
    act, act_p = act_args(act)
    v, blocks, grid = elementwise_plan(x, block)
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if need_dz else None
    channel_backward_dx_kernel[grid](
        x, dy, residual if residual is not None else x, dx, dz if need_dz else dx, mean, rstd, scale, shift,
        mean_dz, mean_dzx, *_args(v), act_p, HAS_RES=residual is not None and act != 0, ACT=act,
        STORE_DZ=need_dz,
        **blocks,
    )
    return dx, dz
