"""The cpu backend (C++ kernels, torch.ops.normkit_cpu) against the reference backend, entry point by entry point.

Every case is data: a name, a shape, a layout and a dtype; one generic test per entry point
runs all of them. Inputs have a non-zero mean (3 + 0.5·randn) unless the case says otherwise;
sizes are odd (C = 3, 7, 33; H×W = 1×1, 5×7). Low precision is compared with the reference
run on the same 16-bit input (it computes in float32 and rounds once), so the tolerance is
a couple of units in the last place of the output dtype.
"""

from __future__ import annotations

import pytest
import torch

import normkit
from normkit._layout import memory_format_of
from normkit.cpu_backend import CpuBackend
from normkit.reference import ReferenceBackend

CPU, REF = CpuBackend(), ReferenceBackend()
CL = torch.channels_last

# dtype -> (rtol, atol) relative to the output's scale
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# name: (shape, channels_last, dtype, offset)   offset = the inputs' common mean
CHANNEL_CASES = {
    "nchw_5x7": ((2, 7, 5, 7), False, torch.float32, 3.0),
    "cl_5x7": ((2, 7, 5, 7), True, torch.float32, 3.0),
    "nchw_1x1": ((5, 3, 1, 1), False, torch.float32, 3.0),
    "cl_c33": ((3, 33, 2, 3), True, torch.float32, 3.0),
    "bn1d_2d": ((9, 33), False, torch.float32, 3.0),
    "bn1d_3d": ((4, 7, 11), False, torch.float32, 3.0),
    "bn3d": ((2, 3, 3, 2, 5), False, torch.float32, 3.0),
    "large_mean": ((4, 3, 5, 7), False, torch.float32, 1e4),
    "large_mean_cl": ((4, 3, 5, 7), True, torch.float32, 1e4),
    "fp64": ((2, 7, 5, 7), False, torch.float64, 3.0),
    "fp64_cl": ((2, 7, 5, 7), True, torch.float64, 3.0),
    "fp16": ((2, 7, 5, 7), False, torch.float16, 3.0),
    "fp16_cl": ((2, 7, 5, 7), True, torch.float16, 3.0),
    "bf16": ((2, 7, 5, 7), False, torch.bfloat16, 3.0),
    "bf16_cl": ((2, 7, 5, 7), True, torch.bfloat16, 3.0),
}
# every activation (with and without a residual for the first four)
ACT_CASES = {"identity": ("", False), "identity_res": ("", True), "relu": ("relu", False), "relu_res": ("relu", True),
             "silu": ("silu", False), "silu_res": ("silu", True), "gelu": ("gelu", False), "gelu_res": ("gelu", True),
             "gelu_tanh": ("gelu_tanh", False), "hardswish_res": ("hardswish", True),
             "leaky_relu": ("leaky_relu:0.2", False), "relu6_res": ("relu6", True),
             "hardsigmoid": ("hardsigmoid", False),
             "mish_res": ("mish", True), "elu": ("elu:0.5", False), "tanh_res": ("tanh", True),
             "sigmoid": ("sigmoid", False)}
# the activations every dtype runs (the others in float32): the piecewise-linear and the kept-gradient kinds
OTHER_DTYPE_ACTS = ("identity", "relu_res", "silu_res", "mish_res", "hardswish_res")


def _tensor(shape, cl, dtype, offset, seed):
    g = torch.Generator().manual_seed(seed)
    t = (offset + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    if cl and t.dim() in (4, 5):
        return t.contiguous(memory_format=CL if t.dim() == 4 else torch.channels_last_3d)
    return t


# A 1e4 offset stored in float32 is only known to ulp(1e4)/2 ≈ 5e-4, and so are the float32
# mean the interface returns and x − mean: normalized outputs carry ~1e-3 of that, in any
# float32 algorithm. (E[x²] − E[x]² would be off by O(1) here: the tolerance still tells.)
LARGE_MEAN_TOL = (3e-3, 3e-3)


def _close(got, want, dtype, what, large=False):
    assert got.dtype == want.dtype, what
    rtol, atol = LARGE_MEAN_TOL if large and dtype == torch.float32 else TOL[dtype]
    scale = max(want.double().abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale, msg=what)


def _exact(t):
    """float32 inputs go to the oracle in float64: the kernels must beat float32 torch math."""
    return t.double() if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t


def _want(fn, *args):
    """The reference entry point ``fn`` on float64 copies of float32 inputs, cast back."""
    if args[0].dtype != torch.float32:
        return fn(*args)
    out = fn(*[_exact(a) for a in args])
    if isinstance(out, torch.Tensor):
        return out.float()
    return tuple(o.float() if isinstance(o, torch.Tensor) else o for o in out)


def _stats_of(x):
    mean, var = REF.channel_stats(x)
    return mean, torch.rsqrt(var + 1e-5)


@pytest.mark.parametrize("case", CHANNEL_CASES)
def test_channel_stats(case):
    shape, cl, dtype, offset = CHANNEL_CASES[case]
    x = _tensor(shape, cl, dtype, offset, 0)
    for got, want, name in zip(CPU.channel_stats(x), REF.channel_stats(x), ("mean", "var"), strict=True):
        # exact statistics: compare with float64 math on the same input values
        exact = REF.channel_stats(x.double())[("mean", "var").index(name)].to(want.dtype)
        _close(got, exact, torch.float32 if dtype != torch.float64 else dtype, f"{case} {name}")


# every activation in float32; identity and relu+residual in the other dtypes
APPLY_CASES = [
    (case, act) for case, (_, _, dtype, _) in CHANNEL_CASES.items() for act in ACT_CASES
    if dtype == torch.float32 or act in OTHER_DTYPE_ACTS
]


@pytest.mark.parametrize(("case", "act_case"), APPLY_CASES, ids=[f"{c}-{a}" for c, a in APPLY_CASES])
def test_channel_apply_and_backward(case, act_case):
    shape, cl, dtype, offset = CHANNEL_CASES[case]
    act, has_res = ACT_CASES[act_case]
    x = _tensor(shape, cl, dtype, offset, 1)
    dy = _tensor(shape, cl, dtype, 0.0, 2)
    res = _tensor(shape, cl, dtype, -3.0, 3) if has_res else None
    c = shape[1]
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(4)
    scale = (1 + 0.3 * torch.randn(c, generator=g)).to(sd)
    shift = (0.2 * torch.randn(c, generator=g)).to(sd) - 3.0 * scale
    mean, rstd = _stats_of(x)
    y = CPU.channel_apply(x, scale, shift, res, act)
    _close(y, _want(REF.channel_apply, x, scale, shift, res, act).to(dtype), dtype, f"{case} apply")
    assert y.is_contiguous(memory_format=CL if cl and x.dim() == 4 else torch.contiguous_format)

    got = CPU.channel_backward_reduce(x, dy, mean, rstd, scale, shift, res, act)
    want = _want(REF.channel_backward_reduce, x, dy, mean, rstd, scale, shift, res, act)
    count = x.numel() // c
    for gv, wv, name in zip(got, want, ("sum_dz", "sum_dz_xhat"), strict=True):
        _close(gv / count, wv / count, torch.float32 if dtype != torch.float64 else dtype, f"{case} {name}")
    mean_dz, mean_dz_xhat = want[0] / count, want[1] / count
    dx, dz = CPU.channel_backward_dx(x, dy, mean, rstd, scale, shift, res, act, mean_dz, mean_dz_xhat, True)
    rdx, rdz = _want(REF.channel_backward_dx, x, dy, mean, rstd, scale, shift, res, act, mean_dz,
                     mean_dz_xhat, True)
    rdx, rdz = rdx.to(dtype), rdz.to(dtype)
    _close(dx, rdx, dtype, f"{case} dx", large=offset > 100)
    _close(dz, rdz, dtype, f"{case} dz")
    assert dx.is_contiguous(memory_format=CL if cl and x.dim() == 4 else torch.contiguous_format)
    assert CPU.channel_backward_dx(x, dy, mean, rstd, scale, shift, res, act, mean_dz, mean_dz_xhat,
                                   False)[1] is None


# The whole-BatchNorm entry points (channel_forward / channel_backward): NCHW runs blocks of channels
# (or, with fewer channels than twice the threads, row-parallel passes: the same sums, see
# test_bit_identical_for_any_thread_count), channels_last / (N, C) the per-channel accumulators.
WHOLE_CASES = {
    "nchw_c9_5x7": ((2, 9, 5, 7), False, torch.float32, 3.0),
    "nchw_c33_2x3": ((3, 33, 2, 3), False, torch.float32, 3.0),
    "bn1d_3d_c9": ((4, 9, 11), False, torch.float32, 3.0),
    "bn3d_c8": ((2, 8, 3, 2, 5), False, torch.float32, 3.0),
    "large_mean_c9": ((4, 9, 5, 7), False, torch.float32, 1e4),
    "fp64_c9": ((2, 9, 5, 7), False, torch.float64, 3.0),
    "fp16_c9": ((2, 9, 5, 7), False, torch.float16, 3.0),
    "bf16_c9": ((2, 9, 5, 7), False, torch.bfloat16, 3.0),
    "composed_c7": ((2, 7, 5, 7), False, torch.float32, 3.0),
    "cl_c9": ((2, 9, 5, 7), True, torch.float32, 3.0),
    "cl_c3_large_mean": ((4, 3, 5, 7), True, torch.float32, 1e4),
    "bn1d_2d_c33": ((9, 33), False, torch.float32, 3.0),
    "bn1d_2d_fp16": ((9, 33), False, torch.float16, 3.0),
    "cl_bf16": ((2, 9, 5, 7), True, torch.bfloat16, 3.0),
    "cl_fp64": ((2, 9, 5, 7), True, torch.float64, 3.0),
    "cl_5d": ((2, 9, 3, 2, 5), True, torch.float32, 3.0),
}
WHOLE_ACTS = [(case, act) for case, (_, _, dtype, _) in WHOLE_CASES.items() for act in ACT_CASES
              if dtype == torch.float32 or act in OTHER_DTYPE_ACTS]


@pytest.mark.parametrize(("case", "act_case"), WHOLE_ACTS, ids=[f"{c}-{a}" for c, a in WHOLE_ACTS])
def test_whole_batch_norm_forward_and_backward(case, act_case):
    shape, cl, dtype, offset = WHOLE_CASES[case]
    act, has_res = ACT_CASES[act_case]
    x = _tensor(shape, cl, dtype, offset, 1)
    dy = _tensor(shape, cl, dtype, 0.0, 2)
    res = _tensor(shape, cl, dtype, -3.0, 3) if has_res else None
    c = shape[1]
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(4)
    weight, bias = (1 + 0.3 * torch.randn(c, generator=g)).to(sd), (0.2 * torch.randn(c, generator=g)).to(sd)
    large = offset > 100
    y, mean, var = CPU.channel_forward(x, weight, bias, 1e-5, res, act)
    wy, wmean, wvar = _want(REF.channel_forward, x, weight, bias, 1e-5, res, act)
    _close(y, wy.to(dtype), dtype, f"{case} y", large=large)
    _close(mean, wmean, sd, f"{case} mean")
    _close(var, wvar, sd, f"{case} var")
    assert y.is_contiguous(memory_format=memory_format_of(x))

    rstd = torch.rsqrt(var + 1e-5)
    scale = weight * rstd
    shift = bias - mean * scale
    for batch_stats in (True, False):
        got = CPU.channel_backward(x, dy, mean, rstd, scale, shift, res, act, batch_stats, has_res)
        want = _want(REF.channel_backward, x, dy, mean, rstd, scale, shift, res, act, batch_stats, has_res)
        what = f"{case} batch_stats={batch_stats}"
        _close(got[0], want[0].to(dtype), dtype, f"{what} dx", large=large)
        for gv, wv, name in zip(got[1:3], want[1:3], ("sum_dz", "sum_dz_xhat"), strict=True):
            # SiLU/GELU at a 1e4 mean: z = x·scale + shift is only float32-exact to ~1e-3 (any float32 math)
            _close(gv / x.numel() * c, wv / x.numel() * c, sd, f"{what} {name}", large=large)
        if has_res:
            _close(got[3], want[3].to(dtype), dtype, f"{what} dz", large=large)
        else:
            assert got[3] is None


# name: (rows, cols, dtype, offset)
ROW_CASES = {
    "odd_1023": (3, 1023, torch.float32, 3.0),
    "k33": (7, 33, torch.float32, 3.0),
    "k1": (5, 1, torch.float32, 3.0),
    "large_mean": (4, 65, torch.float32, 1e4),
    "fp64": (7, 33, torch.float64, 3.0),
    "fp16": (7, 33, torch.float16, 3.0),
    "bf16": (7, 33, torch.bfloat16, 3.0),
}
# name: (rms, weight, bias)
ROW_VARIANTS = {"ln_affine": (False, True, True), "ln_plain": (False, False, False),
                "ln_weight": (False, True, False), "rms_weight": (True, True, False),
                "rms_plain": (True, False, False)}


@pytest.mark.parametrize("variant", ROW_VARIANTS)
@pytest.mark.parametrize("case", ROW_CASES)
def test_row_forward_backward(case, variant):
    m, k, dtype, offset = ROW_CASES[case]
    rms, has_w, has_b = ROW_VARIANTS[variant]
    x = _tensor((m, k), False, dtype, offset, 5)
    dy = _tensor((m, k), False, dtype, 0.0, 6)
    g = torch.Generator().manual_seed(7)
    w = (1 + 0.3 * torch.randn(k, generator=g)).to(dtype) if has_w else None
    b = (0.3 * torch.randn(k, generator=g)).to(dtype) if has_b else None
    y, mean, rstd = CPU.row_forward(x, w, b, 1e-5, rms)
    ry, rmean, rrstd = REF.row_forward(x, w, b, 1e-5, rms)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    _close(y, ry, dtype, f"{case} y", large=offset > 100)
    _close(rstd, rrstd, sd, f"{case} rstd")
    assert (mean is None) == rms
    if not rms:
        _close(mean, rmean, sd, f"{case} mean")
    dx, dw, db = CPU.row_backward(x, dy, rmean, rrstd, w, rms, True)
    rdx, rdw, rdb = REF.row_backward(x, dy, rmean, rrstd, w, rms, True)
    _close(dx, rdx, dtype, f"{case} dx", large=offset > 100)
    _close(dw / m, rdw / m, sd, f"{case} dweight", large=offset > 100)
    if rms:
        assert db is None and rdb is None  # RMSNorm has no bias
    else:
        _close(db / m, rdb / m, sd, f"{case} dbias")
    assert CPU.row_backward(x, dy, rmean, rrstd, w, rms, False)[1:] == (None, None)


# name: (shape, groups, channels_last, dtype, offset, act, residual, affine)
GROUP_CASES = {
    "gn_5x7": ((2, 6, 5, 7), 3, False, torch.float32, 3.0, "", False, True),
    "gn_cl": ((2, 6, 5, 7), 3, True, torch.float32, 3.0, "", False, True),
    "in_c7": ((3, 7, 5, 7), 7, False, torch.float32, 3.0, "", False, False),
    "in_c7_cl": ((3, 7, 5, 7), 7, True, torch.float32, 3.0, "", False, True),
    "gn_1x1": ((4, 33, 1, 1), 3, False, torch.float32, 3.0, "", False, True),
    "gn_3d": ((2, 6, 9), 2, False, torch.float32, 3.0, "", False, True),
    "ln_like_g1": ((2, 7, 5, 7), 1, False, torch.float32, 3.0, "", False, True),
    "large_mean": ((2, 6, 5, 7), 3, False, torch.float32, 1e4, "", False, True),
    "large_mean_cl": ((2, 6, 5, 7), 3, True, torch.float32, 1e4, "", False, True),
    "relu_res": ((2, 6, 5, 7), 3, False, torch.float32, 3.0, "relu", True, True),
    "relu_res_cl": ((2, 6, 5, 7), 3, True, torch.float32, 3.0, "relu", True, True),
    "silu": ((2, 6, 5, 7), 2, False, torch.float32, 3.0, "silu", False, True),
    "gelu_res_cl": ((2, 6, 5, 7), 2, True, torch.float32, 3.0, "gelu", True, True),
    "fp64": ((2, 6, 5, 7), 3, False, torch.float64, 3.0, "relu", True, True),
    "fp64_cl": ((2, 6, 5, 7), 3, True, torch.float64, 3.0, "", False, True),
    "fp16": ((2, 6, 5, 7), 3, False, torch.float16, 3.0, "", False, True),
    "fp16_cl": ((2, 6, 5, 7), 3, True, torch.float16, 3.0, "relu", True, True),
    "bf16": ((2, 6, 5, 7), 3, False, torch.bfloat16, 3.0, "relu", True, True),
    "bf16_cl": ((2, 6, 5, 7), 3, True, torch.bfloat16, 3.0, "", False, True),
    # N >= 8 in channels_last: the per-sample kernels (group_fwd_cl / group_bwd_cl)
    "gn_cl_n8": ((8, 6, 5, 7), 3, True, torch.float32, 3.0, "", False, True),
    "in_cl_n9": ((9, 7, 3, 5), 7, True, torch.float32, 3.0, "", False, False),
    "gn_cl_n8_large_mean": ((8, 6, 5, 7), 3, True, torch.float32, 1e4, "", False, True),
    "gn_cl_n8_relu_res": ((8, 6, 5, 7), 2, True, torch.float32, 3.0, "relu", True, True),
    "gn_cl_n8_silu_res": ((8, 6, 5, 7), 3, True, torch.float32, 3.0, "silu", True, True),
    "gn_cl_n8_gelu": ((8, 6, 5, 7), 1, True, torch.float32, 3.0, "gelu", False, True),
    "gn_2d_n9": ((9, 6), 3, False, torch.float32, 3.0, "", False, True),
    "gn_cl_n8_fp64": ((8, 6, 5, 7), 3, True, torch.float64, 3.0, "relu", True, True),
    "gn_cl_n8_fp16": ((8, 6, 5, 7), 3, True, torch.float16, 3.0, "", False, True),
    "gn_cl_n8_bf16": ((8, 6, 5, 7), 3, True, torch.bfloat16, 3.0, "relu", True, True),
    "gn_cl_n8_big": ((8, 64, 23, 29), 32, True, torch.float32, 3.0, "", False, True),
    # the other activations: both layouts, the per-sample (N >= 8) and chunked channels_last paths, 16-bit
    # dtypes (their kept gradient in a float buffer), float64
    "gelu_tanh_res": ((2, 6, 5, 7), 3, False, torch.float32, 3.0, "gelu_tanh", True, True),
    "hardswish_cl": ((2, 6, 5, 7), 3, True, torch.float32, 3.0, "hardswish", False, True),
    "leaky_relu_res": ((2, 6, 5, 7), 2, False, torch.float32, 3.0, "leaky_relu:0.2", True, True),
    "relu6_cl_n8": ((8, 6, 5, 7), 3, True, torch.float32, 3.0, "relu6", False, True),
    "hardsigmoid_res_cl": ((2, 6, 5, 7), 3, True, torch.float32, 3.0, "hardsigmoid", True, True),
    "mish_cl_n8_res": ((8, 6, 5, 7), 3, True, torch.float32, 3.0, "mish", True, True),
    "elu_not_affine": ((2, 6, 5, 7), 3, False, torch.float32, 3.0, "elu:0.5", False, False),
    "tanh_fp16_res": ((2, 6, 5, 7), 3, False, torch.float16, 3.0, "tanh", True, True),
    "sigmoid_bf16_cl": ((2, 6, 5, 7), 3, True, torch.bfloat16, 3.0, "sigmoid", False, True),
    "silu_fp64_cl_n8": ((8, 6, 5, 7), 3, True, torch.float64, 3.0, "silu", True, True),
    "gelu_fp64": ((2, 6, 5, 7), 2, False, torch.float64, 3.0, "gelu", False, True),
    "mish_bf16_cl_n8": ((8, 6, 5, 7), 3, True, torch.bfloat16, 3.0, "mish", True, True),
}


@pytest.mark.parametrize("case", GROUP_CASES)
def test_group_forward_backward(case):
    shape, groups, cl, dtype, offset, act, has_res, affine = GROUP_CASES[case]
    x = _tensor(shape, cl, dtype, offset, 8)
    dy = _tensor(shape, cl, dtype, 0.0, 9)
    res = _tensor(shape, cl, dtype, 0.0, 10) if has_res else None
    c = shape[1]
    g = torch.Generator().manual_seed(11)
    w = (1 + 0.3 * torch.randn(c, generator=g)).to(dtype) if affine else None
    b = (0.3 * torch.randn(c, generator=g)).to(dtype) if affine else None
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    y, mean, var = CPU.group_forward(x, groups, w, b, 1e-5, res, act)
    ry, rmean, rvar = _want(REF.group_forward, x, groups, w, b, 1e-5, res, act)
    ry = ry.to(dtype)
    _close(y, ry, dtype, f"{case} y", large=offset > 100)
    exact = REF.group_forward(x.double(), groups, None if w is None else w.double(), None, 1e-5, None, "")
    _close(mean, exact[1].to(sd), sd, f"{case} mean")
    _close(var, exact[2].to(sd), sd, f"{case} var")
    assert y.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    rstd = torch.rsqrt(rvar + 1e-5)
    got = CPU.group_backward(x, dy, rmean, rstd, groups, w, b, res, act, True, has_res)
    want = _want(REF.group_backward, x, dy, rmean, rstd, groups, w, b, res, act, True, has_res)
    want = (want[0].to(dtype), want[1], want[2], None if want[3] is None else want[3].to(dtype))
    _close(got[0], want[0], dtype, f"{case} dx", large=offset > 100)
    per = x.numel() // c
    _close(got[1] / per, want[1] / per, sd, f"{case} dweight", large=offset > 100)
    _close(got[2] / per, want[2] / per, sd, f"{case} dbias")
    if has_res:
        _close(got[3], want[3], dtype, f"{case} dresidual")
    else:
        assert got[3] is None


# ----------------------------------------------------------------------------- properties
class _ResidualBlockTail(torch.nn.Module):
    """relu(bn(x) + x·0.5): the fused layer with a residual that depends on x."""

    def __init__(self, c):
        super().__init__()
        self.bn = normkit.BatchNormAct2d(c, act="relu")

    def forward(self, x):
        return self.bn(x, residual=x * 0.5)


LAYER_CASES = {
    "bn2d_nchw": (lambda: normkit.BatchNorm2d(7), (4, 7, 5, 7), False),
    "bn2d_cl": (lambda: normkit.BatchNorm2d(7), (4, 7, 5, 7), True),
    "bn2d_nchw_c9": (lambda: normkit.BatchNorm2d(9), (4, 9, 5, 7), False),  # the blocked kernels (C >= 8)
    "bn_add_relu_c9": (lambda: _ResidualBlockTail(9), (4, 9, 5, 7), False),
    "bn1d": (lambda: normkit.BatchNorm1d(33), (9, 33), False),
    "gn_cl": (lambda: normkit.GroupNorm(3, 6), (2, 6, 5, 7), True),
    "ln": (lambda: normkit.LayerNorm(33), (7, 33), False),
    "rms": (lambda: normkit.RMSNorm(33), (7, 33), False),
}


def _layer_grads(make, shape, cl, backend, threads=None):
    torch.manual_seed(0)
    layer = make()
    x = _tensor(shape, cl, torch.float32, 3.0, 12).requires_grad_(True)
    dy = _tensor(shape, cl, torch.float32, 0.0, 13)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with normkit.backend(backend):
            y = layer(x)
            y.backward(dy)
    finally:
        torch.set_num_threads(old)
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layers_on_cpu_backend_match_reference(case):
    make, shape, cl = LAYER_CASES[case]
    for got, want in zip(_layer_grads(make, shape, cl, "cpu"), _layer_grads(make, shape, cl, "reference"),
                         strict=True):
        _close(got, want, torch.float32, case)


@pytest.mark.parametrize("case", LAYER_CASES)
def test_deterministic_across_runs_and_thread_counts(case):
    make, shape, cl = LAYER_CASES[case]
    first = _layer_grads(make, shape, cl, "cpu", threads=2)
    for threads in (2, 1):
        again = _layer_grads(make, shape, cl, "cpu", threads=threads)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b), f"{case}: not bit-identical with {threads} thread(s)"


def test_auto_picks_cpu_backend_for_cpu_tensors():
    from normkit import backends

    assert backends.resolve("channel_stats", torch.zeros(2, 3)).name == "cpu"


def test_non_contiguous_input_is_handled():
    x = _tensor((4, 14, 5, 7), False, torch.float32, 3.0, 14)[:, ::2]  # a strided view
    assert not x.is_contiguous()
    outs = []
    for backend in ("cpu", "reference"):
        with normkit.backend(backend):
            outs.append(normkit.functional.batch_norm(x, None, None, training=True))
    _close(outs[0], outs[1], torch.float32, "strided view")


def test_non_dense_tensor_given_straight_to_the_backend_is_refused_clearly():
    x = torch.randn(4, 14, 5, 7)[:, ::2]
    with pytest.raises(ValueError, match="expected a dense tensor"):
        CPU.channel_stats(x)


UNSUPPORTED = {
    "meta_device": (torch.empty(2, 3, device="meta"), "CPU tensors"),
    "int_dtype": (torch.zeros(2, 3, dtype=torch.int32), "not one of"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_names_the_reason(case):
    x, words = UNSUPPORTED[case]
    assert words in CPU.unsupported("channel_stats", x)
    assert CPU.unsupported("channel_stats", torch.zeros(2, 3)) is None


# ----------------------------------------------------------------------------- thread counts
# Shapes big enough that at::parallel_for splits the work (> 32K elements), in every path: NCHW
# BatchNorm with few channels (row-parallel at 2 threads, channel blocks at 1) and many, channels_last
# BatchNorm, channels_last GroupNorm with N = 2 (chunk-parallel at 2 threads, per sample at 1) and
# N = 8, NCHW GroupNorm, LayerNorm/RMSNorm rows with a blocked weight gradient.
def _entry_outputs(case):
    def t(shape, cl=False, offset=3.0, seed=20):
        return _tensor(shape, cl, torch.float32, offset, seed)

    if case.startswith("bn"):
        # bn_cl_c19_nores: channels_last with vector lanes and a scalar tail per position, ReLU
        # without a residual (the fused BN+ReLU training path), no dz output
        # bn_nchw_c3_*: three channels, blocked NCHW passes on one thread and row-parallel ones on two (the
        # kept-gradient kinds: a per-value coefficient run against spans); bn_nchw_c16_3x3: short maps
        shape, cl = {"bn_nchw_c3": ((4, 3, 70, 70), False), "bn_nchw_c16": ((4, 16, 33, 35), False),
                     "bn_cl_c16": ((8, 16, 33, 35), True), "bn_cl_c19_nores": ((8, 19, 33, 35), True),
                     "bn1d": ((1500, 64), False), "bn_nchw_c3_silu": ((4, 3, 70, 70), False),
                     "bn_nchw_c16_3x3_gelu": ((64, 16, 3, 3), False), "bn_cl_c19_mish": ((8, 19, 33, 35), True),
                     "bn_nchw_c3_tanh_fp16": ((4, 3, 70, 70), False)}[case]
        dtype = torch.float16 if case.endswith("fp16") else torch.float32
        x, dy, res = (_tensor(shape, cl, dtype, offset, seed) for offset, seed in ((3.0, 20), (0.0, 21), (0.0, 22)))
        res = None if case.endswith("nores") else res
        act = next((a for a in ("silu", "gelu", "mish", "tanh") if f"_{a}" in case), "relu")
        c = shape[1]
        w, b = torch.linspace(0.5, 1.5, c), torch.linspace(-1, 1, c)
        y, mean, var = CPU.channel_forward(x, w, b, 1e-5, res, act)
        rstd = torch.rsqrt(var + 1e-5)
        scale, shift = w * rstd, b - mean * w * rstd
        back = CPU.channel_backward(x, dy, mean, rstd, scale, shift, res, act, True, res is not None)
        back = [o for o in back if o is not None]
        stats = CPU.channel_stats(x)
        red = CPU.channel_backward_reduce(x, dy, mean, rstd, scale, shift, res, "silu")
        dx = CPU.channel_backward_dx(x, dy, mean, rstd, scale, shift, res, "silu", red[0], red[1], True)
        return [y, mean, var, *back, *stats, *red, *dx, CPU.channel_apply(x, scale, shift, None, "gelu")]
    if case.startswith("gn"):
        shape, cl, groups = {"gn_cl_n2": ((2, 32, 40, 41), True, 8), "gn_cl_n8": ((8, 32, 15, 17), True, 4),
                             "gn_nchw": ((4, 32, 30, 31), False, 8),
                             "gn_nchw_plain": ((64, 32, 7, 7), False, 8),
                             "gn_cl_n2_silu": ((2, 32, 40, 41), True, 8), "gn_cl_n8_gelu": ((8, 36, 15, 17), True, 4),
                             "gn_nchw_elu": ((4, 32, 30, 31), False, 8)}[case]
        x, dy, res = t(shape, cl), t(shape, cl, 0.0, 21), t(shape, cl, 0.0, 22)
        c = shape[1]
        w, b = torch.linspace(0.5, 1.5, c), torch.linspace(-1, 1, c)
        # plain: the vectorised identity loops, no residual
        act = "" if case.endswith("plain") else next((a for a in ("silu", "gelu", "elu") if case.endswith(a)), "relu")
        res = None if case.endswith("plain") else res
        y, mean, var = CPU.group_forward(x, groups, w, b, 1e-5, res, act)
        back = CPU.group_backward(x, dy, mean, torch.rsqrt(var + 1e-5), groups, w, b, res, act, True, res is not None)
        return [o for o in (y, mean, var, *back) if o is not None]
    rms = case.startswith("rms")
    # (700, 300): 44 weight-gradient blocks of 16 rows, K not a multiple of the vector width;
    # (64, 768): the fewest rows that still make 4 blocks
    m, k = (64, 768) if case.endswith("short") else (700, 300)
    x, dy = t((m, k)), t((m, k), False, 0.0, 21)
    w, b = torch.linspace(0.5, 1.5, k), None if rms else torch.linspace(-1, 1, k)
    y, mean, rstd = CPU.row_forward(x, w, b, 1e-5, rms)
    back = CPU.row_backward(x, dy, mean, rstd, w, rms, True)
    return [o for o in (y, mean, rstd, *back) if o is not None]


THREAD_CASES = ["bn_nchw_c3", "bn_nchw_c16", "bn_cl_c16", "bn_cl_c19_nores", "bn1d", "bn_nchw_c3_silu",
                "bn_nchw_c16_3x3_gelu", "bn_cl_c19_mish", "bn_nchw_c3_tanh_fp16", "gn_cl_n2", "gn_cl_n8", "gn_nchw",
                "gn_nchw_plain", "gn_cl_n2_silu", "gn_cl_n8_gelu", "gn_nchw_elu", "ln", "rms", "ln_short"]


@pytest.mark.parametrize("case", THREAD_CASES)
def test_bit_identical_for_any_thread_count(case):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _entry_outputs(case)
        torch.set_num_threads(2)
        two = _entry_outputs(case)
    finally:
        torch.set_num_threads(old)
    assert len(one) == len(two)
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        assert torch.equal(a, b), f"{case}: output {i} differs between 1 and 2 threads"


# ----------------------------------------------------------------------------- streamed outputs
# channels_last outputs of 8 MiB or more (float32/float64) are written with non-temporal stores:
# the same values as the cached stores that write a smaller tensor. The element passes are
# per-position functions, so the big tensor's output must equal, bit for bit, the outputs of its
# (small, not streamed) slices along N.
@pytest.mark.parametrize("dtype, n", [(torch.float32, 40), (torch.float64, 20)])
@pytest.mark.parametrize("act", ["", "relu", "silu"])
@pytest.mark.parametrize("with_res", [False, True])
def test_streamed_outputs_equal_cached_outputs(dtype, n, act, with_res):
    shape = (n, 64, 32, 32)  # 10.5 MB
    x, dy = _tensor(shape, True, dtype, 3.0, 40), _tensor(shape, True, dtype, 0.0, 41)
    res = _tensor(shape, True, dtype, 0.0, 42) if with_res else None
    g = torch.Generator().manual_seed(43)
    scale, shift = 1 + 0.1 * torch.randn(64, generator=g, dtype=dtype), 0.1 * torch.randn(64, generator=g, dtype=dtype)
    mean, rstd = 3 + 0.1 * torch.randn(64, generator=g, dtype=dtype), 2 + torch.rand(64, generator=g, dtype=dtype)
    mdz, mdzx = 0.1 * torch.randn(64, generator=g, dtype=dtype), 0.1 * torch.randn(64, generator=g, dtype=dtype)
    y = CPU.channel_apply(x, scale, shift, res, act)
    dx = CPU.channel_backward_dx(x, dy, mean, rstd, scale, shift, res, act, mdz, mdzx, False)[0]
    for lo in range(0, n, 8):
        part = slice(lo, lo + 8)
        r = res[part] if with_res else None
        assert torch.equal(y[part], CPU.channel_apply(x[part], scale, shift, r, act)), f"y, samples {lo}.."
        want = CPU.channel_backward_dx(x[part], dy[part], mean, rstd, scale, shift, r, act, mdz, mdzx, False)[0]
        assert torch.equal(dx[part], want), f"dx, samples {lo}.."
    assert y.is_contiguous(memory_format=CL) and dx.is_contiguous(memory_format=CL)


# ----------------------------------------------------------------------------- long reductions
# Whole-row float32 sums drift with the length (BatchNorm2d on 2x4x2048x2048 had 180x torch's
# output error); blocked sums merged in float64 must stay within twice torch's own error.
def _max_err(got, truth):
    return (got.double() - truth).abs().max().item()


@pytest.mark.slow
def test_batch_norm_long_channels_do_not_drift():
    g = torch.Generator().manual_seed(30)
    x = 3 + torch.randn((2, 4, 2048, 2048), generator=g)
    truth = REF.channel_forward(x.double(), None, None, 1e-5, None, "")[0]
    y = CPU.channel_forward(x, None, None, 1e-5, None, "")[0]
    torch_y = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    assert _max_err(y, truth) <= 2 * _max_err(torch_y, truth) + 1e-7


@pytest.mark.slow
def test_group_norm_long_group_does_not_drift():
    g = torch.Generator().manual_seed(31)
    x = 3 + torch.randn((1, 2, 2**25), generator=g)  # one group of 2**26 values
    truth = REF.group_forward(x.double(), 1, None, None, 1e-5, None, "")[0]
    y, mean, var = CPU.group_forward(x, 1, None, None, 1e-5, None, "")
    torch_y = torch.nn.functional.group_norm(x, 1, eps=1e-5)
    assert _max_err(y, truth) <= 2 * _max_err(torch_y, truth) + 1e-7
    xd = x.double()
    assert abs(mean.item() - xd.mean().item()) < 1e-6
    assert abs(var.item() - xd.var(unbiased=False).item()) < 1e-6


@pytest.mark.slow
def test_layer_norm_long_row_does_not_drift():
    g = torch.Generator().manual_seed(32)
    x = 3 + torch.randn((2, 2**24), generator=g)
    truth = REF.row_forward(x.double(), None, None, 1e-5, False)[0]
    y = CPU.row_forward(x, None, None, 1e-5, False)[0]
    torch_y = torch.nn.functional.layer_norm(x, (2**24,), eps=1e-5)
    assert _max_err(y, truth) <= 2 * _max_err(torch_y, truth) + 1e-7


@pytest.mark.slow
def test_layer_norm_weight_gradient_over_many_rows_does_not_drift():
    # dw, db sum 2**20 rows: fp32 blocks of at most 1024 rows merged in float64 stay within one
    # float32 ulp of the output plus 1e-8 of Σ|terms|; one fp32 sum over all rows (aten's db is
    # off by ~50 here) does not
    g = torch.Generator().manual_seed(33)
    m, k = 2**20, 8
    x = 3 + torch.randn((m, k), generator=g)
    dy = 3 + 0.5 * torch.randn((m, k), generator=g)  # a common mean: Σ dy grows like the row count
    w = torch.linspace(0.5, 1.5, k)
    _, mean, rstd = CPU.row_forward(x, w, None, 1e-5, False)
    _, dw, db = CPU.row_backward(x, dy, mean, rstd, w, False, True)
    xd, dyd = x.double(), dy.double()
    xhat = (xd - mean.double()[:, None]) * rstd.double()[:, None]
    for got, terms, what in ((dw, dyd * xhat, "dweight"), (db, dyd, "dbias")):
        truth = terms.sum(0)
        ulp = torch.finfo(torch.float32).eps * truth.abs()
        bound = ulp + 1e-8 * terms.abs().sum(0)
        err = (got.double() - truth).abs()
        assert (err <= bound).all(), f"{what}: error {err.max().item():.3g} over bound {bound.min().item():.3g}"


# ----------------------------------------------------------------------------- processes, build
# torch's CPU wheels run at::parallel_for on GNU OpenMP, whose pool does not survive fork(): a forked
# child entering a parallel region after its parent did hangs, torch's own ops included (hence one
# thread in DataLoader workers). normkit's kernels run inline in a forked child instead. The child
# here gets its inputs from the parent and does no big torch op of its own (numpy sums the result);
# the tensors are big enough that the parent splits them over its threads.
def _fork_checksum(x, dy):
    layer = normkit.BatchNorm2d(16)
    x = x.detach().requires_grad_(True)
    with normkit.backend("cpu"):
        y = layer(x)
        (dx,) = torch.autograd.grad(y, x, dy)
    return float(abs(y.detach().numpy()).sum()), float(abs(dx.numpy()).sum())


def _forked_child(queue, x, dy):
    queue.put(_fork_checksum(x, dy))


def test_forked_child_runs_layers_after_the_parent_did():
    import multiprocessing

    x = _tensor((8, 16, 33, 35), False, torch.float32, 3.0, 40)
    dy = _tensor((8, 16, 33, 35), False, torch.float32, 0.0, 41)
    want = _fork_checksum(x, dy)  # the parent's thread pool has run
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(queue, x, dy), daemon=True)
    child.start()
    child.join(120)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail("the forked child did not finish within 120 s (a thread pool that did not survive fork?)")
    assert child.exitcode == 0, f"forked child exited with {child.exitcode}"
    assert queue.get(timeout=10) == want


def test_missing_extension_makes_the_backend_unavailable_with_the_reason(monkeypatch):
    import sys

    from normkit import cpu_backend

    monkeypatch.setitem(sys.modules, "normkit._C", None)  # as if it had not been built
    with pytest.raises(ImportError, match="not built"):
        cpu_backend.CpuBackend()


MISMATCHED = {
    "short_scale": lambda x: CPU.channel_apply(x, torch.ones(6), torch.zeros(7), None, ""),
    "residual_shape": lambda x: CPU.channel_apply(x, torch.ones(7), torch.zeros(7), x[:1], "relu"),
    "short_mean": lambda x: CPU.channel_backward(x, x, torch.zeros(3), torch.ones(7), torch.ones(7),
                                                 torch.zeros(7), None, "", True, False),
    "group_stats": lambda x: CPU.group_backward(x, x, torch.zeros(2), torch.ones(2), 7, None, None, None, "",
                                                True, False),
    "groups_divide": lambda x: CPU.group_forward(x, 3, None, None, 1e-5, None, ""),
}


@pytest.mark.parametrize("case", MISMATCHED)
def test_mismatched_vectors_raise_instead_of_reading_out_of_bounds(case):
    x = _tensor((2, 7, 5, 7), False, torch.float32, 3.0, 41)
    with pytest.raises(ValueError, match="normkit cpu backend"):
        MISMATCHED[case](x)


# ----------------------------------------------------------------------------- the activations' vector paths
# On a CPU with AVX-512 the float activations with a transcendental function run 16 lanes a call (csrc/act.h);
# NORMKIT_AVX512=0 (read once per process) keeps them on the AVX2 forms. Both paths against the reference.
_PATH_SCRIPT = r"""
import sys, torch
from normkit.cpu_backend import CpuBackend
from normkit.reference import ReferenceBackend
cpu, ref = CpuBackend(), ReferenceBackend()
g = torch.Generator().manual_seed(0)
worst = 0.0
for act in ("silu", "gelu", "gelu_tanh", "mish", "elu:0.5", "tanh", "sigmoid", "hardswish"):
    for shape, cl in (((4, 21, 3, 3), False), ((3, 21, 5, 7), True), ((2, 6, 5, 7), False)):
        x = 3 + 0.5 * torch.randn(shape, generator=g)
        dy = torch.randn(shape, generator=g)
        if cl:
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        c = shape[1]
        w, b = 1 + 0.3 * torch.randn(c, generator=g), 0.3 * torch.randn(c, generator=g)
        y, mean, var = cpu.channel_forward(x, w, b, 1e-5, None, act)
        ry = ref.channel_forward(x.double(), w.double(), b.double(), 1e-5, None, act)[0]
        rstd = torch.rsqrt(var + 1e-5)
        scale = w * rstd
        shift = b - mean * scale
        dx = cpu.channel_backward(x, dy, mean, rstd, scale, shift, None, act, True, False)[0]
        rdx = ref.channel_backward(x.double(), dy.double(), mean.double(), rstd.double(), scale.double(),
                                   shift.double(), None, act, True, False)[0]
        gy, gm, gv = cpu.group_forward(x, 3, w, b, 1e-5, None, act)
        gry = ref.group_forward(x.double(), 3, w.double(), b.double(), 1e-5, None, act)[0]
        gdx = cpu.group_backward(x, dy, gm, torch.rsqrt(gv + 1e-5), 3, w, b, None, act, True, False)[0]
        grdx = ref.group_backward(x.double(), dy.double(), gm.double(), torch.rsqrt(gv.double() + 1e-5), 3,
                                  w.double(), b.double(), None, act, True, False)[0]
        for got, want in ((y, ry), (dx, rdx), (gy, gry), (gdx, grdx)):
            worst = max(worst, ((got.double() - want).abs().max() / want.abs().max().clamp_min(1)).item())
print(worst)
"""


@pytest.mark.parametrize("avx512", ["0", "1"])
def test_both_activation_vector_paths_match_the_reference(avx512):
    import os
    import subprocess
    import sys

    env = dict(os.environ, NORMKIT_AVX512=avx512)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _PATH_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) < 2e-5
