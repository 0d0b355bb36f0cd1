"""Fused norm + activation layers against the unfused torch.nn compositions, with gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit

CL = torch.channels_last
TORCH_ACT = {"relu": nn.ReLU(), "silu": nn.SiLU(), "gelu": nn.GELU(), None: nn.Identity()}
# every fused activation (leaky ReLU and ELU with a parameter of their own)
ALL_ACTS = tuple(a for a in normkit.activations.names() if a) + ("leaky_relu:0.2", "elu:0.5")

# name: (fused factory, unfused torch factory, shape, channels_last, act, residual, train, backend)
CASES = {
    "bn_relu": ("bn", (4, 7, 5, 7), False, "relu", False, True, "cpu"),
    "bn_relu_cl": ("bn", (4, 7, 5, 7), True, "relu", False, True, "cpu"),
    "bn_add_relu": ("bn", (4, 7, 5, 7), False, "relu", True, True, "cpu"),
    "bn_add_relu_cl": ("bn", (4, 7, 5, 7), True, "relu", True, True, "cpu"),
    "bn_silu_res_1x1": ("bn", (6, 3, 1, 1), False, "silu", True, True, "cpu"),
    "bn_gelu_cl": ("bn", (4, 33, 5, 7), True, "gelu", False, True, "cpu"),
    "bn_none": ("bn", (4, 7, 5, 7), False, None, True, True, "cpu"),
    "bn_relu_eval": ("bn", (4, 7, 5, 7), False, "relu", True, False, "cpu"),
    "bn_relu_eval_cl": ("bn", (4, 7, 5, 7), True, "relu", False, False, "cpu"),
    "bn_relu_reference": ("bn", (4, 7, 5, 7), False, "relu", True, True, "reference"),
    "gn_relu": ("gn", (2, 6, 5, 7), False, "relu", False, True, "cpu"),
    "gn_add_relu_cl": ("gn", (2, 6, 5, 7), True, "relu", True, True, "cpu"),
    "gn_silu": ("gn", (2, 6, 5, 7), False, "silu", True, True, "cpu"),
    "gn_gelu_cl": ("gn", (2, 6, 5, 7), True, "gelu", False, True, "cpu"),
}


def _pair(kind, c, act):
    torch.manual_seed(0)
    if kind == "bn":
        ref = nn.BatchNorm2d(c)
        fused = normkit.BatchNormAct2d(c, act=act)
    else:
        ref = nn.GroupNorm(3 if c % 3 == 0 else 1, c)
        fused = normkit.GroupNormAct(ref.num_groups, c, act=act)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(c))
        ref.bias.copy_(0.3 * torch.randn(c))
    fused.load_state_dict(ref.state_dict())
    return fused, ref


@pytest.mark.parametrize("case", CASES)
def test_fused_matches_unfused(case):
    kind, shape, cl, act, has_res, train, backend = CASES[case]
    fused, ref = _pair(kind, shape[1], act)
    fused.train(train)
    ref.train(train)
    if not train:  # non-trivial running statistics
        with torch.no_grad():
            ref.running_mean.uniform_(2.5, 3.5)
            ref.running_var.uniform_(0.2, 0.4)
        fused.load_state_dict(ref.state_dict())
    fmt = CL if cl else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    x0 = (3 + 0.5 * torch.randn(shape, generator=g)).contiguous(memory_format=fmt)
    r0 = (0.5 * torch.randn(shape, generator=g)).contiguous(memory_format=fmt) if has_res else None
    dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)

    # the unfused oracle runs in float64 (torch's own float32 GroupNorm on channels_last is off
    # by ~4e-5 in dx, more than normkit is)
    ref.double()
    xs = [x0.clone().requires_grad_(True), x0.double().requires_grad_(True)]
    rs = [r0.clone().requires_grad_(True), r0.double().requires_grad_(True)] if has_res else [None, None]
    with normkit.backend(backend):
        y = fused(xs[0], rs[0])
    z = ref(xs[1]) + (rs[1] if has_res else 0)
    want = TORCH_ACT[act](z)
    torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=fmt)
    with normkit.backend(backend):
        y.backward(dy)
    want.backward(dy.double())
    torch.testing.assert_close(xs[0].grad, xs[1].grad.float(), rtol=1e-5, atol=1e-5)
    if has_res:
        torch.testing.assert_close(rs[0].grad, rs[1].grad.float(), rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias"):
        got, exp = getattr(fused, name).grad, getattr(ref, name).grad.float()
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-4)
    for name, buf in ref.named_buffers():
        mine = dict(fused.named_buffers())[name]
        torch.testing.assert_close(mine, buf.to(mine.dtype), rtol=1e-5, atol=1e-6)


GRADCHECK = {
    "bn_silu_res": ("bn", "silu", True),
    "bn_relu": ("bn", "relu", False),
    "bn_relu_res": ("bn", "relu", True),
    "gn_gelu_res": ("gn", "gelu", True),
    "gn_relu_res": ("gn", "relu", True),
}


@pytest.mark.parametrize("case", GRADCHECK)
def test_gradcheck_and_gradgradcheck_float64_on_cpu_backend(case):
    kind, act, has_res = GRADCHECK[case]
    c = 3
    layer = normkit.BatchNormAct2d(c, act=act) if kind == "bn" else normkit.GroupNormAct(3, c, act=act)
    layer.double()
    g = torch.Generator().manual_seed(2)
    x = (3 + 0.5 * torch.randn(2, c, 2, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    # keep ReLU's kink away from the finite-difference steps
    r = (0.7 * torch.randn(2, c, 2, 3, generator=g, dtype=torch.float64)).requires_grad_(has_res)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64))
    with normkit.backend("cpu"):
        def f(x, r, w):
            return layer(x, r if has_res else None)

        assert torch.autograd.gradcheck(f, (x, r, layer.weight), eps=1e-6, atol=1e-6)
        assert torch.autograd.gradgradcheck(f, (x, r, layer.weight), eps=1e-6, atol=1e-5)


def _saved_storages(fn):
    """The storages autograd saves for backward while fn() runs, and fn's result."""
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind,train", [("bn", True), ("bn", False), ("gn", True)])
@pytest.mark.parametrize("cl", [False, True])
def test_relu_after_a_residual_keeps_the_output_not_the_residual(kind, train, cl, backend):
    """relu(norm(x) + r) keeps x and y, as torch's norm → add → ReLU does (ReLU keeps its output), never r:
    a shortcut's own tensor (a downsampling BatchNorm's output) would otherwise stay alive for backward.
    The gradients are torch's, r's included: dz = dy·[y > 0], a NaN output passing dy on as torch's ReLU."""
    fused, ref = _pair(kind, 6, "relu")
    fused.train(train)
    ref.train(train)
    fmt = CL if cl else torch.contiguous_format
    g = torch.Generator().manual_seed(4)
    x0 = (3 + 0.5 * torch.randn(2, 6, 5, 7, generator=g)).contiguous(memory_format=fmt)
    r0 = (0.5 * torch.randn(2, 6, 5, 7, generator=g)).contiguous(memory_format=fmt)
    r0[1, 2, 3, 4] = float("nan")  # a NaN output: torch's ReLU passes dy there
    x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
    with normkit.backend(backend):
        saved, y = _saved_storages(lambda: fused(x, r))
    assert r.untyped_storage().data_ptr() not in saved
    assert {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()} <= saved
    xr, rr = x0.clone().requires_grad_(), r0.clone().requires_grad_()
    want = torch.relu(ref(xr) + rr)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(r.grad, rr.grad, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize("kind,train", [("bn", True), ("bn", False), ("gn", True)])
@pytest.mark.parametrize("residual", [False, True])
def test_tanh_and_sigmoid_keep_the_output(act, kind, train, residual):
    """tanh and sigmoid keep their output for backward, as torch's modules do (the C++ eager nodes): dz is torch's
    tanh_backward / sigmoid_backward of the kept output (no transcendental function again); a residual is not
    kept (its gradient is dz)."""
    fused, ref = _pair(kind, 6, act)
    fused.train(train)
    ref.train(train)
    g = torch.Generator().manual_seed(8)
    x0 = 3 + 0.5 * torch.randn(2, 6, 5, 7, generator=g)
    r0 = 0.5 * torch.randn(2, 6, 5, 7, generator=g) if residual else None
    x = x0.clone().requires_grad_()
    r = r0.clone().requires_grad_() if residual else None
    with normkit.backend("cpu"):
        saved, y = _saved_storages(lambda: fused(x, r))
    assert {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()} <= saved
    if residual:
        assert r.untyped_storage().data_ptr() not in saved
    xr = x0.clone().requires_grad_()
    rr = r0.clone().requires_grad_() if residual else None
    want = normkit.activations.to_module(act)(ref(xr) + (rr if residual else 0))
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    if residual:
        torch.testing.assert_close(r.grad, rr.grad, rtol=1e-5, atol=1e-6)


def test_state_dict_is_batchnorm2d_and_groupnorm():
    tb, fb = nn.BatchNorm2d(5), normkit.BatchNormAct2d(5, act="silu")
    assert list(tb.state_dict()) == list(fb.state_dict())
    fb.load_state_dict(tb.state_dict())
    tb.load_state_dict(fb.state_dict())
    tg, fg = nn.GroupNorm(2, 6), normkit.GroupNormAct(2, 6, act=None)
    assert list(tg.state_dict()) == list(fg.state_dict())
    tg.load_state_dict(fg.state_dict())
    assert isinstance(fb, nn.BatchNorm2d) and isinstance(fg, nn.GroupNorm)


BAD = {
    "bn_prelu": (lambda: normkit.BatchNormAct2d(4, act="prelu"), "act"),
    "bn_leaky_bad_slope": (lambda: normkit.BatchNormAct2d(4, act="leaky_relu:x"), "act"),
    "gn_int": (lambda: normkit.GroupNormAct(2, 4, act=1), "act"),
    "residual_shape": (lambda: normkit.BatchNormAct2d(4)(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2)),
                       "residual"),
    # the forward's fast path (no detailed checks) must still refuse these
    "gn_residual_shape": (lambda: normkit.GroupNormAct(2, 4)(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3)),
                          "residual"),
    "bn_integer_residual": (lambda: normkit.BatchNormAct2d(4)(torch.randn(2, 4, 3, 3),
                                                              torch.ones(2, 4, 3, 3, dtype=torch.long)), "residual"),
    "bn_act_set_later": (lambda: _with_act(normkit.BatchNormAct2d(4), "celu")(torch.randn(2, 4, 3, 3)), "act"),
    "gn_act_set_later": (lambda: _with_act(normkit.GroupNormAct(2, 4), "selu")(torch.randn(2, 4, 3, 3)), "act"),
}


def _with_act(layer, act):
    layer.act = act
    return layer


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_are_named(case):
    call, word = BAD[case]
    with pytest.raises(normkit.NormInputError, match=word):
        call()


def test_failed_forward_changes_no_state():
    layer = normkit.BatchNormAct2d(4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(normkit.NormInputError):
        layer(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- convert(fuse=True)
def _model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.GELU(),
        nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.SiLU(),
        nn.BatchNorm2d(6), nn.PReLU(),                      # a learnable activation: left alone
        nn.BatchNorm2d(6), nn.CELU(),                       # not a fusable activation
        nn.Sequential(nn.BatchNorm2d(6), nn.ReLU()),        # nested Sequential
        nn.BatchNorm2d(6), nn.GELU(approximate="tanh"),
        nn.GroupNorm(2, 6), nn.LeakyReLU(0.2),
    )


def test_convert_fuse_matches_and_keeps_state():
    ref, model = _model(), _model()
    keys = list(model.state_dict())
    normkit.convert(model, fuse=True)
    kinds = [type(m).__name__ for m in model]
    assert kinds[1:3] == ["BatchNormAct2d", "Identity"]
    assert kinds[4:6] == ["GroupNormAct", "Identity"]
    assert kinds[7:9] == ["BatchNormAct2d", "Identity"]
    assert kinds[9:13] == ["BatchNorm2d", "PReLU", "BatchNorm2d", "CELU"]
    assert [type(m).__name__ for m in model[13]] == ["BatchNormAct2d", "Identity"]
    assert kinds[14:18] == ["BatchNormAct2d", "Identity", "GroupNormAct", "Identity"]
    assert [model[1].act, model[4].act, model[7].act, model[14].act, model[16].act] == [
        "relu", "gelu", "silu", "gelu_tanh", "leaky_relu:0.2"]
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = model(x), ref(xr)
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    yr.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)


def test_convert_fuse_needs_to_normkit():
    with pytest.raises(ValueError, match="fuse"):
        normkit.convert(_model(), to="torch", fuse=True)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", None])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dims,shape", [(1, (16, 7)), (1, (4, 7, 9)), (3, (2, 7, 3, 4, 5))])
@pytest.mark.parametrize("residual", [False, True])
def test_batch_norm_act_1d_3d_match_unfused(dims, shape, act, train, residual):
    torch.manual_seed(0)
    ref = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm3d)(7).double()
    fused = (normkit.BatchNormAct1d if dims == 1 else normkit.BatchNormAct3d)(7, act=act)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(7))
        ref.bias.copy_(0.3 * torch.randn(7))
        ref.running_mean.uniform_(2.5, 3.5)
        ref.running_var.uniform_(0.2, 0.4)
    fused.load_state_dict(ref.state_dict())
    ref.train(train), fused.train(train)
    g = torch.Generator().manual_seed(1)
    x0 = 3 + 0.5 * torch.randn(shape, generator=g)
    r0 = 0.5 * torch.randn(shape, generator=g) if residual else None
    x, xd = x0.clone().requires_grad_(), x0.double().requires_grad_()
    r, rd = (r0.clone().requires_grad_(), r0.double().requires_grad_()) if residual else (None, None)
    y = fused(x, r)
    want = TORCH_ACT[act](ref(xd) + (rd if residual else 0))
    torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-5)
    dy = torch.randn(shape, generator=g)
    y.backward(dy)
    want.backward(dy.double())
    torch.testing.assert_close(x.grad, xd.grad.float(), rtol=1e-5, atol=1e-5)
    if residual:
        torch.testing.assert_close(r.grad, rd.grad.float(), rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(fused, name).grad, getattr(ref, name).grad.float(), rtol=1e-5,
                                   atol=1e-4)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(dict(fused.named_buffers())[name], buf.to(dict(fused.named_buffers())[name].dtype),
                                   rtol=1e-5, atol=1e-6)
    assert isinstance(fused, nn.BatchNorm1d if dims == 1 else nn.BatchNorm3d)
    assert list(fused.state_dict()) == list(ref.state_dict())


def test_convert_fuses_an_mlps_batch_norm_1d_and_scripts():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6),
                        nn.GELU(), nn.Linear(6, 3))
    model = normkit.convert(copy.deepcopy(ref), fuse=True)
    assert [type(m).__name__ for m in model][1:6] == ["BatchNormAct1d", "Identity", "Linear", "BatchNormAct1d",
                                                      "Identity"]
    assert [model[1].act, model[4].act] == ["relu", "gelu"]
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
    scripted = torch.jit.script(model.eval())
    torch.testing.assert_close(scripted(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cl", [False, True])
def test_relu_passes_the_gradient_of_a_nan_on_as_torch(backend, cl):
    """Eval BatchNorm + ReLU with a NaN in x: torch's ReLU backward passes dy at the NaN output, so dx there is
    γ·rstd·dy (finite), not 0; the fused kernels' ReLU'(z) is [not z <= 0] as torch's."""
    fused, ref = _pair("bn", 5, "relu")
    fused.eval()
    ref.eval()
    fmt = CL if cl else torch.contiguous_format
    x0 = (0.5 * torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(5))).contiguous(memory_format=fmt)
    x0[0, 1, 2, 3] = float("nan")
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    with normkit.backend(backend):
        y = fused(x)
        y.backward(torch.ones_like(y))
    want = torch.relu(ref(xr))
    want.backward(torch.ones_like(want))
    assert x.grad[0, 1, 2, 3].isfinite() and x.grad[0, 1, 2, 3] != 0
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("frozen", ["eval_frozen_params", "FrozenBatchNorm2d"])
@pytest.mark.parametrize("act,residual", [("relu", False), ("relu", True), ("silu", True), (None, True)])
@pytest.mark.parametrize("cl", [False, True])
def test_constant_statistics_without_parameter_gradients(frozen, act, residual, cl):
    """Eval BatchNorm whose γ, β want no gradient (FrozenBatchNorm, frozen parameters) takes a backward without
    the dγ/dβ sums: dx and dresidual are torch's, a NaN in x included."""
    fused, ref = _pair("bn", 5, act)
    fused.eval()
    ref.eval()
    with torch.no_grad():
        ref.running_mean.uniform_(-0.5, 0.5)
        ref.running_var.uniform_(0.5, 1.5)
    fused.load_state_dict(ref.state_dict())
    if frozen == "FrozenBatchNorm2d":
        fused = normkit.freeze(fused)
        assert type(fused).__name__ == "FrozenBatchNorm2d"
    else:
        fused.requires_grad_(False)
    ref.requires_grad_(False)
    fmt = CL if cl else torch.contiguous_format
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 5, 3, 4, generator=g).contiguous(memory_format=fmt)
    x0[1, 3, 0, 2] = float("nan")
    r0 = torch.randn(2, 5, 3, 4, generator=g).contiguous(memory_format=fmt) if residual else None
    dy = torch.randn(2, 5, 3, 4, generator=g).contiguous(memory_format=fmt)
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    r, rr = (r0.clone().requires_grad_(), r0.clone().requires_grad_()) if residual else (None, None)
    with normkit.backend("cpu"):
        y = fused(x, r)
        y.backward(dy)
    want = TORCH_ACT[act](ref(xr) + (rr if residual else 0))
    want.backward(dy)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6, equal_nan=True)
    if residual:
        torch.testing.assert_close(r.grad, rr.grad, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_convert_fuses_only_where_it_pays(monkeypatch):
    """convert(fuse=True) reads activations.FUSE_PAYS: a pair measured slower fused stays norm → activation."""
    pays = {name: dict(fams) for name, fams in normkit.activations.FUSE_PAYS.items()}
    pays["silu"]["bn"] = False
    monkeypatch.setattr(normkit.activations, "FUSE_PAYS", pays)
    model = normkit.convert(nn.Sequential(nn.BatchNorm2d(4), nn.SiLU(), nn.GroupNorm(2, 4), nn.SiLU()), fuse=True)
    assert [type(m).__name__ for m in model] == ["BatchNorm2d", "SiLU", "GroupNormAct", "Identity"]
    assert model[2].act == "silu"


# ----------------------------------------------------------------------------- every activation
@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("kind", ["bn", "gn"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_every_activation_matches_torchs_pair(act, kind, cl, residual, train):
    """Each fused activation against torch's norm module → activation module (float64 oracle), forward and
    backward, both layouts, with and without a residual; 21 channels of 3×3 (short runs: the kernels' tails and
    the per-value coefficient runs of NCHW BatchNorm) and 6 groups of a 5×7 map."""
    shape = (4, 21, 3, 3) if kind == "bn" else (2, 12, 5, 7)
    c = shape[1]
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(c) if kind == "bn" else nn.GroupNorm(6, c)
    fused = normkit.BatchNormAct2d(c, act=act) if kind == "bn" else normkit.GroupNormAct(6, c, act=act)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(c))
        ref.bias.copy_(0.5 * torch.randn(c))
        if kind == "bn":
            ref.running_mean.uniform_(2.5, 3.5)
            ref.running_var.uniform_(0.2, 0.4)
    fused.load_state_dict(ref.state_dict())
    ref.train(train), fused.train(train)
    fmt = CL if cl else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    x0 = (3 + 0.5 * torch.randn(shape, generator=g)).contiguous(memory_format=fmt)
    r0 = (torch.randn(shape, generator=g)).contiguous(memory_format=fmt) if residual else None
    dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    x, xd = x0.clone().requires_grad_(), x0.double().requires_grad_()
    r, rd = (r0.clone().requires_grad_(), r0.double().requires_grad_()) if residual else (None, None)
    y = fused(x, r)
    ref.double()
    want = normkit.activations.to_module(act)(ref(xd) + (rd if residual else 0))
    torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=fmt)
    y.backward(dy)
    want.backward(dy.double())
    torch.testing.assert_close(x.grad, xd.grad.float(), rtol=1e-5, atol=1e-5)
    if residual:
        torch.testing.assert_close(r.grad, rd.grad.float(), rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(fused, name).grad, getattr(ref, name).grad.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("kind", ["bn", "gn"])
def test_every_activation_gradcheck_and_gradgradcheck_float64(act, kind):
    """First-order gradients from the kernels, second-order through aten's ops (torch has no double backward
    for hardsigmoid: neither has the fused layer, with torch's error)."""
    c = 3
    layer = normkit.BatchNormAct2d(c, act=act) if kind == "bn" else normkit.GroupNormAct(3, c, act=act)
    layer.double()
    g = torch.Generator().manual_seed(2)
    x = (3 + 0.5 * torch.randn(2, c, 2, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    r = (0.7 * torch.randn(2, c, 2, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64))
        layer.bias.copy_(0.5 * torch.randn(c, generator=g, dtype=torch.float64))
    with normkit.backend("cpu"):
        def f(x, r, w):
            return layer(x, r)

        assert torch.autograd.gradcheck(f, (x, r, layer.weight), eps=1e-6, atol=1e-6)
        if act == "hardsigmoid":
            with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):
                torch.autograd.gradgradcheck(f, (x, r, layer.weight), eps=1e-6, atol=1e-5)
            with pytest.raises(RuntimeError, match="hardsigmoid_backward is not implemented"):  # torch's own
                torch.autograd.gradgradcheck(lambda z: nn.Hardsigmoid()(z), (x,))
        else:
            assert torch.autograd.gradgradcheck(f, (x, r, layer.weight), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("act", ALL_ACTS)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_every_activation_at_a_nan_is_torchs(act, cl):
    """Eval BatchNorm + activation with a NaN (and ±Inf) in x: the output and dx are torch's module's (at a NaN:
    relu6's and hardsigmoid's gradient 0, leaky ReLU's the slope, the others NaN — aten's vector kernels)."""
    fused, ref = _pair("bn", 5, act)
    fused.eval()
    ref.eval()
    fmt = CL if cl else torch.contiguous_format
    x0 = (0.5 * torch.randn(4, 5, 6, 8, generator=torch.Generator().manual_seed(5))).contiguous(memory_format=fmt)
    x0[0, 1, 2, 3] = float("nan")
    x0[1, 2, 0, 1] = float("inf")
    x0[1, 3, 4, 5] = -float("inf")
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    y = fused(x)
    y.backward(torch.ones_like(y))
    want = normkit.activations.to_module(act)(ref(xr))
    want.backward(torch.ones_like(want))
    # (float GELU at ±Inf: torch's oneDNN kernel gives NaN where aten's own vector kernel, as normkit's, gives ±Inf)
    skip = act == "gelu" and x0.isinf()
    torch.testing.assert_close(y[~skip], want[~skip], rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(x.grad[~skip], xr.grad[~skip], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "hardswish", "mish", "elu", "tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bn", "gn"])
def test_low_precision_error_at_most_twice_torchs(act, dtype, kind):
    """float16/bfloat16 input: normkit's fused layer is at most about twice as far from the float64 truth as
    torch's own unfused pair in that dtype (outputs and input gradients; DESIGN.md §4)."""
    shape, c = (4, 16, 6, 6), 16
    fused, ref = _pair(kind, c, act)
    g = torch.Generator().manual_seed(7)
    x0 = 3 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    module = normkit.activations.to_module(act)

    def run(layer, dtype, fused_layer):
        layer = copy.deepcopy(layer).to(torch.float64 if dtype == torch.float64 else torch.float32)
        x = x0.to(dtype).detach().clone().requires_grad_()
        if dtype == torch.float64:
            out = module(layer(x))
        else:  # parameters in float32, as autocast keeps them
            out = layer(x) if fused_layer else module(layer(x))
        out.backward(dy.to(dtype))
        return out.double(), x.grad.double()

    truth = run(ref, torch.float64, False)
    mine = run(fused, dtype, True)
    theirs = run(ref, dtype, False)
    for m, t, w in zip(mine, theirs, truth, strict=True):
        scale = w.abs().max().item()
        floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype] * scale
        assert (m - w).abs().max().item() <= 2 * (t - w).abs().max().item() + floor
