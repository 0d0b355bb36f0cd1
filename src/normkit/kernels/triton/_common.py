"""Pieces shared by the Triton kernels: the fused activations and the statistics merge.

Activations (``ACT`` is a compile-time constant, so an unused branch costs nothing; the launchers
take the code, which ``normkit.activations`` maps from the activation's name):

    0 identity   a(z) = z                          a'(z) = 1
    1 relu       a(z) = max(z, 0)                  a'(z) = [not z <= 0]
    2 silu       a(z) = z·σ(z)                     a'(z) = σ(z)·(1 + z·(1 − σ(z)))
    3 gelu       a(z) = z·Φ(z), Φ(z) = ½(1 + erf(z/√2))      a'(z) = Φ(z) + z·φ(z),  φ(z) = e^{−z²/2}/√(2π)

Chan's merge (Chan, Golub & LeVeque, 1979) of two partial statistics (n_a, μ_a, M2_a) and
(n_b, μ_b, M2_b), with δ = μ_b − μ_a and n = n_a + n_b:

    μ  = μ_a + δ·n_b/n
    M2 = M2_a + M2_b + δ²·n_a·n_b/n

Every term is a deviation from a mean, never E[x²] − E[x]², so a large common offset (x ≈ 1e4)
costs no precision.

Long reductions are summed in blocks and the blocks merged in fp64, so fp32 rounding does not
build up with the reduction's length (a running fp32 merge over thousands of blocks drifts by
about √blocks ulps). A block is LANE_STEPS tiles: each lane of the tile keeps its own fp32
Welford triple (or fp32 sums) over at most LANE_STEPS values (no cross-lane work in the inner
loop), then the lanes are merged with the formula in its two-pass form,
n = Σ n_l, μ = Σ n_l μ_l / n, M2 = Σ M2_l + n_l (μ_l − μ)² (a tree over the lanes, fp32), and
the block's (n, μ, M2) or sums join fp64 running ones. fp64 arithmetic happens once per block,
never per element; the results are rounded to fp32 once, at the end.
"""

import triton
import triton.language as tl

# Tiles a lane accumulates in fp32 before its block is reduced across lanes and merged in fp64:
# each lane adds at most this many values in sequence, so fp32 rounding cannot build up with the
# reduction's length, and the cross-lane reduction runs once per LANE_STEPS tiles.
LANE_STEPS = 8

# Globals read inside @triton.jit must be constexpr.
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def activation(z, ACT: tl.constexpr):
    """``a(z)`` for the activation code ``ACT`` (see the module docstring)."""
    if ACT == 1:
        z = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT2))
    return z


@triton.jit
def activation_grad(z, ACT: tl.constexpr):
    """``a'(z)``; only called with ``ACT != 0`` (identity needs no pre-activation)."""
    if ACT == 1:
        g = tl.where(z <= 0, 0.0, 1.0)  # a NaN z passes the gradient on, as torch's ReLU backward
    elif ACT == 2:
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * _INV_SQRT2))
        g = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return g


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge partial statistics b into a (scalars or vectors); returns (n, mean, m2)."""
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def welford_step(count, mean, m2, x, ok):
    """One Welford update per lane (Welford, 1962): lanes where ``ok`` is false are left as they were.

        n ← n + 1,   δ = x − μ,   μ ← μ + δ/n,   M2 ← M2 + δ·(x − μ)

    Every lane of a tile keeps its own running (n, μ, M2) across the loop, so the loop body has no
    cross-lane reduction; the lanes are merged once at the end (see ``merge_lanes`` in the kernels).
    """
    okf = ok.to(tl.float32)
    count += okf
    delta = x - mean
    mean += delta * okf / tl.maximum(count, 1.0)
    m2 += delta * (x - mean) * okf
    return count, mean, m2


@triton.jit
def sum_partials_kernel(part_ptr, out_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out[c] = Σ_p part[p, c]`` in fp64, in a fixed order (deterministic; no atomics).

    The second stage of every split reduction: ``part`` is (P, C) partial sums (fp32 or fp64)
    written by P programs. One program per BLOCK_C columns walks P in BLOCK_P tiles; the sum is
    kept in fp64 (one add per partial, not per element), so it does not drift with P. ``out`` is
    fp32.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        acc += tl.load(part_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0).to(tl.float64)
    tl.store(out_ptr + c, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=c_ok)


def sum_partials(part, out):
    """Launch :func:`sum_partials_kernel`: ``out = part.sum(0)`` for a (P, C) fp32/fp64 ``part``."""
    p, c = part.shape
    block_c = min(triton.next_power_of_2(c), 128)
    block_p = min(triton.next_power_of_2(p), 32)
    sum_partials_kernel[(triton.cdiv(c, block_c),)](part, out, p, c, BLOCK_P=block_p, BLOCK_C=block_c)
    return out
