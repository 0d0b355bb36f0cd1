"""Pieces shared by the Triton kernels: the fused activations and the statistics merge.

Activations (``ACT`` is a compile-time constant, so an unused branch costs nothing; ``ACT_P`` is the runtime
parameter of leaky ReLU (negative_slope) and ELU (alpha), 0 for the others). The launchers take the kernels'
int64 activation code (``normkit.activations.code``) and split it with :func:`act_args`:

    0  identity     a(z) = z                          a'(z) = 1
    1  relu         a(z) = max(z, 0)                  a'(z) = [not z <= 0]
    2  silu         a(z) = z·σ(z)                     a'(z) = σ(z)·(1 + z·(1 − σ(z)))
    3  gelu         a(z) = z·Φ(z), Φ(z) = ½(1 + erf(z/√2))      a'(z) = Φ(z) + z·φ(z),  φ(z) = e^{−z²/2}/√(2π)
    4  gelu_tanh    a(z) = ½z(1 + t), t = tanh(β(z + κz³))      a'(z) = ½(1 + t) + ½z(1 − t²)·β(1 + 3κz²)
    5  hardswish    a(z) = z·min(max(z + 3, 0), 6)/6  a'(z) = 0 (z < −3), 1 (z ≥ 3), z/3 + ½ (NaN: NaN)
    6  leaky_relu   a(z) = z if z > 0 else p·z        a'(z) = 1 if z > 0 else p
    7  relu6        a(z) = min(max(z, 0), 6)          a'(z) = [0 < z < 6]
    8  hardsigmoid  a(z) = min(max(z + 3, 0), 6)/6    a'(z) = [−3 < z < 3]/6
    9  mish         a(z) = z·tanh(softplus(z))        a'(z) = t + z·σ(z)·(1 − t²),  t = tanh(softplus(z))
    10 elu          a(z) = z if z > 0 else p(e^z − 1) a'(z) = 1 if z > 0 else p·e^z
    11 tanh         a(z) = tanh(z)                    a'(z) = 1 − tanh²(z)
    12 sigmoid      a(z) = σ(z)                       a'(z) = σ(z)(1 − σ(z))

(β = √(2/π), κ = 0.044715.) NaN handling follows aten's vector kernels: min/max propagate a NaN, relu6's and
hardsigmoid's gradient at a NaN is 0.

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
_BETA = tl.constexpr(0.7978845608028654)  # √(2/π)
_KAPPA = tl.constexpr(0.044715)
_ONE_SIXTH_F32 = tl.constexpr(0.1666666716337204)  # aten's float 1/6 (hardsigmoid's gradient)


def act_args(code: int) -> tuple[int, float]:
    """(kind, parameter) of an activation code: the kind in bits 0..7; for leaky ReLU (6) and ELU (10) the
    parameter m·10^−k with k in bits 8..11 and the signed m from bit 12 on (``csrc/act_code.h``)."""
    code = int(code)
    kind = code & 0xFF
    return kind, float((code >> 12) / 10 ** ((code >> 8) & 0xF))


@triton.jit
def _tanh(z):
    # Triton has no tanh on every target (nor in the interpreter): (1 − e)/(1 + e), e = e^{−2|z|}, exact limits ±1;
    # below |z| = 0.3, where that cancels, the odd series to z⁹ (relative error < 1e-7)
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    z2 = z * z
    small = z * (1.0 + z2 * (-0.3333333333333333 + z2 * (0.13333333333333333 + z2 * (-0.05396825396825397
                                                                                   + z2 * 0.021869488536155203))))
    return tl.where(a < 0.3, small, tl.where(z < 0, -big, big))


@triton.jit
def _clamp06(t):
    # min(max(t, 0), 6) with a NaN kept (aten's vector minimum/maximum propagate it)
    return tl.where(t < 0.0, 0.0, tl.where(t > 6.0, 6.0, t))


@triton.jit
def _softplus(z):
    # log1p(e^z) without log1p: log(w)·u/(w − 1), w = 1 + u (Goldberg's correction: the rounding of w cancels), u
    # itself where w rounds to 1; z above 20: z (log1p(e^z) − z = log1p(e^{−z}) < 2.1e-9, below z's rounding)
    u = tl.exp(tl.minimum(z, 20.0))
    w = 1.0 + u
    lp = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
    return tl.where(z > 20.0, z, lp)


@triton.jit
def activation(z, ACT: tl.constexpr, ACT_P=0.0):
    """``a(z)`` for the activation kind ``ACT`` (parameter ``ACT_P``; see the module docstring)."""
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT2))
    elif ACT == 4:
        z = 0.5 * z * (1.0 + _tanh((z + z * z * z * _KAPPA) * _BETA))
    elif ACT == 5:
        z = z * _clamp06(z + 3.0) / 6.0
    elif ACT == 6:
        z = tl.where(z > 0, z, z * ACT_P)
    elif ACT == 7:
        z = _clamp06(z)
    elif ACT == 8:
        z = _clamp06(z + 3.0) / 6.0
    elif ACT == 9:
        z = z * _tanh(_softplus(z))
    elif ACT == 10:
        z = tl.where(z > 0, z, (tl.exp(z) - 1.0) * ACT_P)
    elif ACT == 11:
        z = _tanh(z)
    elif ACT == 12:
        z = tl.sigmoid(z)
    return z


@triton.jit
def activation_grad(z, ACT: tl.constexpr, ACT_P=0.0):
    """``a'(z)``; only called with ``ACT != 0`` (identity needs no pre-activation)."""
    if ACT == 1:
        g = tl.where(z <= 0, 0.0, 1.0)  # a NaN z passes the gradient on, as torch's ReLU backward
    elif ACT == 2:
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.erf(z * _INV_SQRT2))
        g = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == 4:
        t = _tanh((z + z * z * z * _KAPPA) * _BETA)
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * ((1.0 + z * z * (3.0 * _KAPPA)) * _BETA)
    elif ACT == 5:
        g = tl.where(z < -3.0, 0.0, tl.where(z >= 3.0, 1.0, z / 3.0 + 0.5))
    elif ACT == 6:
        g = tl.where(z > 0, 1.0, ACT_P)
    elif ACT == 7:
        g = tl.where((z > 0.0) & (z < 6.0), 1.0, 0.0)
    elif ACT == 8:
        g = tl.where((z > -3.0) & (z < 3.0), _ONE_SIXTH_F32, 0.0)
    elif ACT == 9:
        t = _tanh(_softplus(z))
        g = t + z * tl.sigmoid(z) * (1.0 - t * t)
    elif ACT == 10:
        g = tl.where(z > 0, 1.0, ACT_P * tl.exp(z))
    elif ACT == 11:
        t = _tanh(z)
        g = 1.0 - t * t
    else:
        s = tl.sigmoid(z)
        g = s * (1.0 - s)
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
