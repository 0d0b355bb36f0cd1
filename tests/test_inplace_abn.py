"""InPlaceABN: exactly BatchNorm → activation, saving only the output, written over the input.

Against torch.nn's BatchNorm → LeakyReLU / ELU / Identity on the same weights: outputs, input and parameter
gradients and running statistics (float64 to 1e-12; float32 within 3x torch's own error against the float64
truth — the measured bound of INVERT_LIMIT; float16/bfloat16 within 2x torch's own for y, dx and dβ, and dγ
to the dtype's rounding, see docs/inplace-abn.md), with the inversion and with the fallback that keeps x;
gradcheck / gradgradcheck; what is saved for backward and where the input is overwritten; autograd's error
for a misuse; the kernels' thread-count bit identity; running-statistics rules; eval; torch.compile / trace /
torch.func; the reference backend.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import normkit
import normkit.functional as F
from normkit import ops_inplace

ACTS = {"leaky_relu": 0.01, "elu": 1.0, "identity": 0.01}


def torch_act(activation: str, param: float) -> nn.Module:
    return {"leaky_relu": nn.LeakyReLU(param), "elu": nn.ELU(param), "identity": nn.Identity()}[activation]


def make(activation="leaky_relu", param=None, c=6, dtype=torch.float64, gamma=(0.5, 1.5), beta=(-0.5, 0.5),
         **kwargs):
    """An InPlaceABN and torch's BatchNorm2d → activation with the same (non-trivial) state."""
    param = ACTS[activation] if param is None else param
    layer = normkit.InPlaceABN(c, activation=activation, activation_param=param, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.weight.copy_(torch.empty(c, dtype=torch.float64).uniform_(*gamma, generator=gen))
        layer.bias.copy_(torch.empty(c, dtype=torch.float64).uniform_(*beta, generator=gen))
        if layer.running_var is not None:
            layer.running_var.uniform_(0.5, 2.0, generator=gen)
    bn = nn.BatchNorm2d(c, dtype=dtype, **{k: v for k, v in kwargs.items() if k != "inplace"})
    bn.load_state_dict(layer.state_dict())
    return layer, nn.Sequential(bn, torch_act(activation, param))


def data(shape=(3, 6, 5, 7), dtype=torch.float64, fmt=torch.contiguous_format, seed=0, offset=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = offset + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(dtype).contiguous(memory_format=fmt), dy.to(dtype).contiguous(memory_format=fmt)


def run(module, x, dy, intermediate=True):
    """(y, dx, dγ, dβ) of ``module`` on ``x`` (an intermediate of the graph, as after a convolution)."""
    xl = x.clone().requires_grad_()
    h = xl * 1.0 if intermediate else xl
    y = module(h)
    y.backward(dy)
    bn = module if isinstance(module, normkit.InPlaceABN) else module[0]
    return y.detach(), xl.grad, bn.weight.grad, bn.bias.grad


def saved(module, x):
    """The tensors autograd saves during ``module(x·1)``: list of (shape, data_ptr)."""
    got = []

    def pack(t):
        got.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    xl = x.clone().requires_grad_()
    h = xl * 1.0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(h)
    return got, h, y


# ----------------------------------------------------------------------------- equal to BN → activation
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_float64_equals_batchnorm_activation(activation, fmt):
    layer, ref = make(activation)
    x, dy = data(fmt=fmt)
    got, want = run(layer, x, dy), run(ref, x, dy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert got[0].is_contiguous(memory_format=fmt)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(ref[0], name), rtol=0, atol=1e-15)


@pytest.mark.parametrize("activation", list(ACTS))
def test_saves_only_the_output_and_writes_over_the_input(activation):
    layer, _ = make(activation, c=4)
    x, _ = data((2, 4, 3, 3))
    got, h, y = saved(layer, x)
    assert y.data_ptr() == h.data_ptr()  # written over its input
    big = [s for s in got if s[0] == tuple(x.shape)]
    assert big == [(tuple(x.shape), y.untyped_storage().data_ptr())]  # the output only


def test_fallback_gamma_near_zero_keeps_x_warns_once_and_is_exact():
    layer, ref = make("leaky_relu", c=4)
    with torch.no_grad():
        layer.weight[2] = 1e-4  # |β|/|γ| ≫ INVERT_LIMIT
        ref[0].weight[2] = 1e-4
    x, dy = data((2, 4, 3, 3))
    with pytest.warns(RuntimeWarning, match="keeps its input.*channel 2"):
        got = run(layer, x, dy)
    for g, w in zip(got, run(ref, x, dy), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    saves, h, y = saved(layer, x)
    assert y.data_ptr() != h.data_ptr()
    assert [s for s in saves if s[0] == tuple(x.shape)] == [(tuple(x.shape), h.untyped_storage().data_ptr())]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer
        run(layer, x, dy)


@pytest.mark.parametrize("activation,param", [("leaky_relu", 0.0), ("leaky_relu", -0.2), ("elu", 1.0)])
def test_fallback_not_invertible(activation, param):
    """A zero or negative slope, and ELU saturating (β ≪ 0): keep x, exact, warned."""
    beta = (-12.0, -10.0) if activation == "elu" else (-0.5, 0.5)
    layer, ref = make(activation, param, c=4, dtype=torch.float32, gamma=(1.0, 1.5), beta=beta)
    with torch.no_grad():  # (β ≤ 2|γ|: the ELU case fails on saturation alone)
        layer.bias.clamp_(min=-2.0 * float(layer.weight.min()))
        ref[0].bias.copy_(layer.bias)
        if activation == "elu":
            layer.weight.mul_(6.0)
            ref[0].weight.mul_(6.0)
    x, dy = data((2, 4, 3, 3), torch.float32)
    with pytest.warns(RuntimeWarning, match="keeps its input"):
        got = run(layer, x, dy)
    for g, w in zip(got, run(ref, x, dy), strict=True):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", ["inverted", "fallback", "elu", "identity_not_affine"])
def test_gradcheck_and_gradgradcheck(case):
    activation, param, scale = {"inverted": ("leaky_relu", 0.1, 0.5), "fallback": ("leaky_relu", 0.1, 40.0),
                                "elu": ("elu", 0.7, 0.5), "identity_not_affine": ("identity", 0.0, 0.0)}[case]
    gen = torch.Generator().manual_seed(1)
    x = (3 + 0.5 * torch.randn(3, 4, 3, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    w = (0.5 + torch.rand(4, generator=gen, dtype=torch.float64)).requires_grad_()
    b = (scale * torch.randn(4, generator=gen, dtype=torch.float64)).requires_grad_()
    affine = case != "identity_not_affine"

    def f(x, w, b):
        return F.inplace_abn(x * 1.0, w if affine else None, b if affine else None, None, None, True, 0.1, 1e-5,
                             activation, param)

    refusal = ops_inplace.refusal(ops_inplace.KINDS[activation], param, w if affine else None, b if affine else None)
    assert (refusal is None) == (case != "fallback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert gradcheck(f, (x, w, b))
        assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_low_precision_error_rule(dtype, fmt):
    """y, dx, dβ: at most 2x torch's own error against the float64 truth (+ a floor of 2 ulps); dγ, which the
    inversion reads from the rounded output: within the dtype's unit roundoff of its largest value."""
    layer, ref = make("leaky_relu", c=8, dtype=torch.float32, beta=(-1.0, 1.0))
    layer, ref = layer.to(dtype), ref.to(dtype)
    layer.weight.data, layer.bias.data = layer.weight.float(), layer.bias.float()  # fp32 parameters (autocast's)
    ref[0].weight.data, ref[0].bias.data = layer.weight.data.clone(), layer.bias.data.clone()
    ref[0].running_mean.data, ref[0].running_var.data = ref[0].running_mean.float(), ref[0].running_var.float()
    layer.running_mean.data, layer.running_var.data = layer.running_mean.float(), layer.running_var.float()
    x, dy = data((8, 8, 6, 6), dtype, fmt)
    truth_layer, _ = make("leaky_relu", c=8, beta=(-1.0, 1.0))
    truth = run(truth_layer, x.double(), dy.double())
    got, own = run(layer, x, dy), run(ref, x, dy)
    u = torch.finfo(dtype).eps
    for what, g, o, t in zip(("y", "dx", "dgamma", "dbeta"), got, own, truth, strict=True):
        err = (g.double() - t).abs().max().item()
        scale = t.abs().max().item()
        if what == "dgamma":
            assert err <= u * scale, f"{what}: {err:.3g} > u·max = {u * scale:.3g}"
        else:
            err_own = (o.double() - t).abs().max().item()
            assert err <= 2 * err_own + 2 * u * scale, f"{what}: {err:.3g} vs torch's {err_own:.3g}"


def test_float32_within_measured_bound():
    """float32 with |β|/|γ| up to INVERT_LIMIT: gradients within 3x torch's own error (the measured bound)."""
    layer, ref = make("leaky_relu", c=8, dtype=torch.float32, gamma=(0.5, 1.5), beta=(-0.5, 0.5))
    with torch.no_grad():
        layer.bias.copy_(ops_inplace.INVERT_LIMIT * layer.weight.abs() * torch.tensor([1, -1] * 4))
        ref[0].bias.copy_(layer.bias)
    x, dy = data((8, 8, 8, 8), torch.float32)
    truth_layer, _ = make("leaky_relu", c=8)
    truth_layer.load_state_dict(layer.state_dict())
    truth = run(truth_layer, x.double(), dy.double())
    got, own = run(layer, x, dy), run(ref, x, dy)
    for what, g, o, t in zip(("y", "dx", "dgamma", "dbeta"), got, own, truth, strict=True):
        err, err_own = ((a.double() - t).abs().max().item() for a in (g, o))
        assert err <= 3 * err_own + 4e-7 * t.abs().max().item(), f"{what}: {err:.3g} vs torch's {err_own:.3g}"


# ----------------------------------------------------------------------------- in place, autograd
def test_leaf_and_plain_data_are_not_overwritten():
    layer, ref = make(c=4)
    x, dy = data((2, 4, 3, 3))
    for requires_grad in (True, False):
        xl = x.clone().requires_grad_(requires_grad)
        before = xl.detach().clone()
        y = layer(xl)
        assert y.data_ptr() != xl.data_ptr() and torch.equal(xl.detach(), before)
    got = run(layer, x, dy, intermediate=False)
    for g, w in zip(got, run(ref, x, dy), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_input_saved_elsewhere_raises_torchs_error():
    """The input is saved by another node (sigmoid keeps its output): overwriting it must make autograd raise
    its version-counter error at backward, not compute a wrong gradient."""
    layer, _ = make(c=4)
    x, dy = data((2, 4, 3, 3))
    h = torch.sigmoid(x.clone().requires_grad_())
    y = layer(h)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


def test_inplace_false_never_writes_but_saves_only_the_output():
    layer, ref = make(c=4, inplace=False)
    x, dy = data((2, 4, 3, 3))
    saves, h, y = saved(layer, x)
    assert y.data_ptr() != h.data_ptr()
    assert [s for s in saves if s[0] == tuple(x.shape)] == [(tuple(x.shape), y.untyped_storage().data_ptr())]
    for g, w in zip(run(layer, x, dy), run(ref, x, dy), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_no_grad_and_eval():
    layer, ref = make("elu", c=4)
    x, _ = data((2, 4, 3, 3))
    with torch.no_grad():
        torch.testing.assert_close(layer(x.clone()), ref(x.clone()), rtol=0, atol=1e-12)
    layer.eval()
    ref.eval()
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-12)  # (the statistics moved once above)
    x2, dy = data((2, 4, 3, 3), seed=1)
    for g, w in zip(run(layer, x2, dy), run(ref, x2, dy), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("shape,fmt", [((4, 64, 6, 6), torch.contiguous_format),  # blocked channels
                                       ((3, 5, 33, 9), torch.contiguous_format),  # rows in parallel
                                       ((4, 37, 5, 7), torch.channels_last), ((257, 19), torch.contiguous_format)])
def test_bit_identical_for_any_thread_count(shape, fmt):
    k = torch.ops.normkit_cpu
    x, dy = data(shape, torch.float32, fmt)
    w, b = torch.rand(shape[1]) + 0.5, torch.rand(shape[1]) - 0.5
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, mean, var = k.iabn_forward(x.clone(), w, b, 1e-5, 1, 0.01, True)
            rstd = torch.rsqrt(var + 1e-5)
            back = [k.iabn_backward(src, dy, mean, rstd, w, b, 1, 0.01, src is y, True) for src in (y, x)]
            results.append([y, mean, var] + [t for trio in back for t in trio])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@pytest.mark.parametrize("kind,param", [(0, 0.0), (1, 0.2), (2, 0.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_match_reference_backend(kind, param, dtype):
    """The C++ entry points against the reference backend's torch formulas (from y and from x, split halves)."""
    from normkit.cpu_backend import CpuBackend
    from normkit.reference import ReferenceBackend

    cpu, ref = CpuBackend(), ReferenceBackend()
    x, dy = data((3, 9, 5, 4), dtype, torch.channels_last)
    w, b = torch.rand(9) + 0.5, torch.rand(9) - 0.5
    outs = []
    for be in (cpu, ref):
        y, mean, var = be.iabn_forward(x.clone(), w, b, 1e-5, kind, param, False)
        rstd = torch.rsqrt(var + 1e-5)
        res = [y, mean, var]
        for src, from_y in ((y, True), (x, False)):
            dx, s1, s2 = be.iabn_backward(src, dy, mean, rstd, w, b, kind, param, from_y, True)
            dx2 = be.iabn_backward_dx(src, dy, mean, rstd, w, b, kind, param, from_y,
                                      s1.double() / 60, s2.double() / 60)
            res += [dx, s1, s2, dx2]
        outs.append(res)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, r in zip(*outs, strict=True):
        torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol * max(1.0, r.abs().max().item()))


# ----------------------------------------------------------------------------- running statistics
def test_checkpoint_safe_and_nonfinite_skip():
    from torch.utils.checkpoint import checkpoint

    layer, ref = make(c=4, momentum=None)
    conv = nn.Conv2d(4, 4, 1).double()
    x, dy = data((2, 4, 3, 3))
    checkpoint(lambda t: layer(conv(t)), x.clone().requires_grad_(), use_reentrant=False).backward(dy)
    ref(conv(x)).backward(dy)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(ref[0], name), rtol=0, atol=1e-15)
    before = [t.clone() for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]
    bad = x.clone()
    bad[0, 1, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(bad * 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, (layer.running_mean, layer.running_var,
                                                           layer.num_batches_tracked), strict=True))
    assert int(layer.skipped_batches) == 1


# ----------------------------------------------------------------------------- the other paths
def test_torch_path_compile_trace_func():
    layer, ref = make("leaky_relu", c=4)
    x, _ = data((2, 4, 3, 3))
    want = ref(x.clone())
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x.clone()), want, rtol=0, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # one training forward each
        torch.testing.assert_close(getattr(layer, name), getattr(ref[0], name), rtol=0, atol=1e-12)
    exported = torch.export.export(layer, (x.clone(),)).module()  # training: statistics written out
    torch.testing.assert_close(exported(x.clone()), want, rtol=0, atol=1e-12)
    ref[0].load_state_dict(layer.state_dict())  # (the exported module may have moved the shared statistics)
    traced = torch.jit.trace(layer.eval(), (x.clone(),), check_trace=False)
    torch.testing.assert_close(traced(x.clone()), ref.eval()(x.clone()), rtol=0, atol=1e-12)
    free, free_ref = make("elu", c=4, track_running_stats=False)  # (torch.func refuses buffer updates, as torch's)
    g = torch.func.grad(lambda t: free(t).square().sum())(x.clone())
    g_ref = torch.func.grad(lambda t: free_ref(t).square().sum())(x.clone())
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
    layer.train()
    ref.train()
    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):  # as torch.nn's
        torch.func.grad(lambda t: ref(t).square().sum())(x.clone())
    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
        torch.func.grad(lambda t: layer(t).square().sum())(x.clone())


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_reference_backend(activation):
    layer, ref = make(activation, c=4, dtype=torch.float32)
    x, dy = data((2, 4, 3, 3), torch.float32)
    with normkit.backend("reference"):
        got = run(layer, x, dy)
    for g, w in zip(got, run(ref, x, dy), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_state_dict_and_errors():
    layer = normkit.InPlaceABN(5)
    assert set(layer.state_dict()) == set(nn.BatchNorm2d(5).state_dict())
    nn.BatchNorm2d(5).load_state_dict(layer.state_dict())
    layer.load_state_dict(nn.BatchNorm2d(5).state_dict())
    assert "activation=leaky_relu[0.01]" in repr(layer)
    with pytest.raises(normkit.NormInputError, match="activation"):
        normkit.InPlaceABN(5, activation="relu")
    with pytest.raises(normkit.NormInputError):
        layer(torch.randn(2, 4, 3))  # 4 channels, 5 expected
    layer.activation_param = 0.3
    assert isinstance(layer.act, nn.LeakyReLU) and layer.act.negative_slope == 0.3
