"""Row family, first half: LayerNorm and RMSNorm over the rows of a contiguous (M, K) matrix.

Math (DESIGN.md §1), per row of K values, with g = dy·γ:

    LayerNorm   μ = 1/K Σ x,   σ² = 1/K Σ (x − μ)²,   rstd = 1/√(σ² + ε),   x̂ = (x − μ)·rstd
                dx = rstd·(g − mean(g) − x̂·mean(g·x̂))
    RMSNorm     rstd = 1/√(mean(x²) + ε),   x̂ = x·rstd
                dx = rstd·(g − x̂·mean(g·x̂))
    both        y = x̂·γ + β,   dγ = Σ_rows dy·x̂,   dβ = Σ_rows dy

Forward: one program per row. While K fits in one block (``K <= BLOCK_K``, the single-block
path) the row is loaded once and stays in registers (tree sums, two-pass variance). Beyond that
(the split path) the program walks the row twice — pass 1 forms each block's (mean, M2) of
x − x[0] in fp32 (the shift keeps a large common offset out of the sums) and merges the blocks
with Chan's formula in fp64 (RMSNorm: adds the blocks' Σx² in fp64), pass 2 normalizes and
stores — so x is read twice but no row length is too long, and the error does not grow with it.

Backward: P programs (about the device's program capacity), each owning a contiguous range of
rows. dx is formed row by row (split rows: the two row sums per block in fp32, added in fp64).
dγ/dβ are accumulated per program — on the single-block path in fp32 registers over at most
ROW_CHUNK rows, each chunk then added to the program's own row of a (P, 2K) fp64 buffer; on the
split path in the program's own row of a (P, 2K) fp32 buffer, a program then owning at most
ROW_CHUNK rows (read, add, write; a barrier orders the threads' accesses) — and a second kernel
sums the P partial rows in fp64 in a fixed order. So the buffer is P × 2K, never M × K, no
fp32 sum runs over more than ROW_CHUNK rows, and no atomics are used (deterministic).

Limits: float16/bfloat16/float32 (fp32 statistics, fp64 block merges); fewer than 2³¹ elements; one row per program
in the forward (short rows with huge M launch M small programs; long rows with tiny M use few).
"""

import torch
import triton
import triton.language as tl

from ._common import chan_merge, sum_partials


@triton.jit
def row_forward_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, K, eps, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, RMS: tl.constexpr, SINGLE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program ``row``: the row's statistics, then y = x̂·γ + β."""
    row = tl.program_id(0)
    x_ptr += row * K
    y_ptr += row * K
    k = tl.arange(0, BLOCK_K)
    if SINGLE:
        ok = k < K
        x = tl.load(x_ptr + k, mask=ok, other=0.0).to(tl.float32)
        if RMS:
            mean = 0.0
            var = tl.sum(x * x, axis=0) / K
        else:
            mean = tl.sum(x, axis=0) / K
            d = tl.where(ok, x - mean, 0.0)
            var = tl.sum(d * d, axis=0) / K
    else:
        # pass 1: per-block statistics of x − x[0] in fp32 (a tree sum over the block's lanes),
        # merged across blocks in fp64 — Chan's formula (RMS: a sum of per-block Σx²) — so the
        # error does not grow with the number of blocks
        pivot = tl.load(x_ptr).to(tl.float32)
        count = tl.zeros([], tl.float64)
        mean = tl.zeros([], tl.float64)
        m2 = tl.zeros([], tl.float64)
        for k0 in range(0, K, BLOCK_K):
            ok = k0 + k < K
            xb = tl.load(x_ptr + k0 + k, mask=ok, other=0.0).to(tl.float32)
            if RMS:
                m2 += tl.sum(xb * xb, axis=0).to(tl.float64)
            else:
                xb = tl.where(ok, xb - pivot, 0.0)
                n_b = tl.minimum(K - k0, BLOCK_K).to(tl.float32)
                mean_b = tl.sum(xb, axis=0) / n_b
                d = tl.where(ok, xb - mean_b, 0.0)
                count, mean, m2 = chan_merge(count, mean, m2, n_b.to(tl.float64), mean_b.to(tl.float64),
                                             tl.sum(d * d, axis=0).to(tl.float64))
        var = (m2 / K).to(tl.float32)
        if RMS:
            mean = 0.0
        else:
            mean = (mean + pivot).to(tl.float32)  # rounded once
    rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
    if not RMS:
        tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    # pass 2 (a single iteration on the single-block path, reusing x from registers)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + k < K
        if not SINGLE:
            x = tl.load(x_ptr + k0 + k, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + k0 + k, mask=ok, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + k0 + k, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + k0 + k, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row_terms(x_ptr, dy_ptr, w_ptr, cols, ok, mean, rstd, HAS_W: tl.constexpr):
    """x̂, dy and g = dy·γ of one block of a row (zeros where masked)."""
    x = tl.load(x_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    xhat = tl.where(ok, (x - mean) * rstd, 0.0)
    g = dy
    if HAS_W:
        g = dy * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return xhat, dy, g


@triton.jit
def row_backward_kernel(x_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, M, K, rows_per_prog,
                        HAS_W: tl.constexpr, RMS: tl.constexpr, NEED_DW: tl.constexpr, SINGLE: tl.constexpr,
                        BLOCK_K: tl.constexpr, ROW_CHUNK: tl.constexpr):
    """Program p: dx for rows [p·rows_per_prog, …), and its partial dγ (part[p, 0]) and dβ (part[p, 1]).

    Single-block path: dγ/dβ are summed in fp32 registers over at most ROW_CHUNK rows, then added
    to the program's fp64 partial rows (``part`` is fp64). Split path: every row is added to the
    program's fp32 partial rows, and the launcher gives a program at most ROW_CHUNK rows.
    """
    p = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    dw_ptr = part_ptr + p * 2 * K  # this program's own partial rows: no other program writes them
    db_ptr = dw_ptr + K
    start = p * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, end, ROW_CHUNK):
        dw_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for row in range(r0, tl.minimum(r0 + ROW_CHUNK, end)):
            rstd = tl.load(rstd_ptr + row)
            mean = 0.0
            if not RMS:
                mean = tl.load(mean_ptr + row)
            base = row * K
            if SINGLE:
                ok = k < K
                xhat, dy, g = _row_terms(x_ptr + base, dy_ptr + base, w_ptr, k, ok, mean, rstd, HAS_W)
                proj = tl.sum(g * xhat, axis=0) / K
                dx = g - xhat * proj
                if not RMS:
                    dx -= tl.sum(g, axis=0) / K
                tl.store(dx_ptr + base + k, (rstd * dx).to(dx_ptr.dtype.element_ty), mask=ok)
                if NEED_DW:
                    dw_acc += dy * xhat
                    db_acc += dy
            else:
                # pass 1: the two row means mean(g·x̂) and mean(g): per-block fp32 sums, added in fp64
                sum_gx = tl.zeros([], tl.float64)
                sum_g = tl.zeros([], tl.float64)
                for k0 in range(0, K, BLOCK_K):
                    ok = k0 + k < K
                    xhat, dy, g = _row_terms(x_ptr + base, dy_ptr + base, w_ptr, k0 + k, ok, mean, rstd, HAS_W)
                    sum_gx += tl.sum(g * xhat, axis=0).to(tl.float64)
                    sum_g += tl.sum(g, axis=0).to(tl.float64)
                proj = (sum_gx / K).to(tl.float32)
                g_mean = (sum_g / K).to(tl.float32)
                # pass 2: dx, and the program's partial dγ/dβ updated in place (read, add, write)
                for k0 in range(0, K, BLOCK_K):
                    ok = k0 + k < K
                    xhat, dy, g = _row_terms(x_ptr + base, dy_ptr + base, w_ptr, k0 + k, ok, mean, rstd, HAS_W)
                    dx = g - xhat * proj
                    if not RMS:
                        dx -= g_mean
                    tl.store(dx_ptr + base + k0 + k, (rstd * dx).to(dx_ptr.dtype.element_ty), mask=ok)
                    if NEED_DW:
                        dw = tl.load(dw_ptr + k0 + k, mask=ok, other=0.0)
                        tl.store(dw_ptr + k0 + k, dw + dy * xhat, mask=ok)
                        db = tl.load(db_ptr + k0 + k, mask=ok, other=0.0)
                        tl.store(db_ptr + k0 + k, db + dy, mask=ok)
                if NEED_DW:
                    # the next row reads these partial sums back: make this row's stores visible to
                    # every thread of the program, whatever layout the compiler picks for the loads
                    tl.debug_barrier()
        if SINGLE and NEED_DW:
            # add this chunk's fp32 sums to the program's fp64 partial rows (read, add, write)
            ok = k < K
            tl.store(dw_ptr + k, tl.load(dw_ptr + k, mask=ok, other=0.0) + dw_acc.to(tl.float64), mask=ok)
            tl.store(db_ptr + k, tl.load(db_ptr + k, mask=ok, other=0.0) + db_acc.to(tl.float64), mask=ok)
            tl.debug_barrier()


# ----------------------------------------------------------------------------- launchers
def _block(k, max_block):
    block = min(triton.next_power_of_2(k), max_block)
    return block, block >= k


def row_forward(x2d, weight, bias, eps, rms, *, max_block=8192):
    """(y, mean or None, rstd) for a contiguous (M, K) ``x2d``; statistics fp32 (M,)."""
    m, k = x2d.shape
    block, single = _block(k, max_block)
    y = torch.empty_like(x2d)
    rstd = torch.empty(m, device=x2d.device, dtype=torch.float32)
    mean = None if rms else torch.empty_like(rstd)
    row_forward_kernel[(m,)](
        x2d, y, weight if weight is not None else x2d, bias if bias is not None else x2d,
        mean if mean is not None else rstd, rstd, k, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms, SINGLE=single, BLOCK_K=block,
        num_warps=min(max(block // 256, 1), 8),
    )
    return y, mean, rstd


def row_backward(x2d, dy2d, mean, rstd, weight, rms, need_dweight, *, programs, max_block=8192, row_chunk=128):
    """(dx, dγ or None, dβ or None); dγ/dβ fp32 (K,), summed in fp64 from P partial rows.

    ``row_chunk``: rows summed in fp32 before their sum joins an fp64 one (see the kernel).
    """
    m, k = x2d.shape
    block, single = _block(k, max_block)
    p = max(1, min(programs, m))
    rows_per_prog = triton.cdiv(m, p)
    if need_dweight and not single:  # fp32 partial rows: at most row_chunk rows in each
        rows_per_prog = min(rows_per_prog, row_chunk)
    p = triton.cdiv(m, rows_per_prog)
    dx = torch.empty_like(x2d)
    # Partial rows are added to (read, add, write), so they start at zero.
    part = torch.zeros(p, 2 * k, device=x2d.device, dtype=torch.float64 if single else torch.float32) \
        if need_dweight else rstd
    row_backward_kernel[(p,)](
        x2d, dy2d, weight if weight is not None else x2d, mean if mean is not None else rstd, rstd, dx, part,
        m, k, rows_per_prog, HAS_W=weight is not None, RMS=rms, NEED_DW=need_dweight, SINGLE=single,
        BLOCK_K=block, ROW_CHUNK=row_chunk, num_warps=min(max(block // 256, 1), 8),
    )
    if not need_dweight:
        return dx, None, None
    sums = sum_partials(part, torch.empty(2 * k, device=x2d.device, dtype=torch.float32))
    return dx, sums[:k].clone(), sums[k:].clone()  # op outputs must not alias
