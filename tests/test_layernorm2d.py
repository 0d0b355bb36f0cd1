"""LayerNorm2d against torch's permute → LayerNorm → permute (the form timm and ConvNeXt use).

Every backend that runs on CPU, NCHW and channels_last, odd channel counts and a large mean;
float64 compared tightly, fp16/bf16 by DESIGN.md's rule (at most twice torch's own error against
the float64 truth); gradcheck in float64; opcheck of the op; state_dict and convert compatibility.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normkit
from normkit import backends

SHAPES = {"c7": (2, 7, 5, 3), "c33": (3, 33, 4, 6), "c1023": (2, 1023, 2, 3), "pixel": (5, 8, 1, 1)}


def torch_ln2d(x, weight, bias, eps):
    """The permute form (timm's LayerNorm2d.forward)."""
    y = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps)
    return y.permute(0, 3, 1, 2)


def _input(shape, dtype=torch.float64, layout="nchw", offset=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = offset + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _params(c, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(c, generator=gen, dtype=torch.float64)).to(dtype), \
        (torch.rand(c, generator=gen, dtype=torch.float64) - 0.5).to(dtype)


def runnable(layout):
    """Backends that run the given layout on CPU tensors here (cpu: channels_last only, for now)."""
    names = ["reference"]
    if backends.available().get("cpu") == "available":
        probe = _input((1, 2, 2, 2), layout=layout)
        if backends._instance("cpu").unsupported("ln2d_forward", probe) is None:
            names.append("cpu")
    return names


CASES = [(b, lay) for lay in ("nchw", "channels_last") for b in runnable(lay)]


@pytest.mark.parametrize("affine", ["affine", "no_bias", "none"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("backend_name,layout", CASES)
def test_float64_values_and_grads_match_permute_form(backend_name, layout, shape_name, affine):
    shape = SHAPES[shape_name]
    x = _input(shape, layout=layout, offset=1e4 if shape_name == "c33" else 3.0)
    w, b = _params(shape[1])
    w = None if affine == "none" else w.requires_grad_()
    b = b.requires_grad_() if affine == "affine" else None
    dy = _input(shape, offset=0.0, seed=2)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    with normkit.backend(backend_name):
        ours = normkit.nn.layernorm2d.layer_norm_2d(xs[0], w, b, 1e-6)
        assert ours.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                  else torch.contiguous_format), "layout not kept"
        grads_ours = torch.autograd.grad(ours, [xs[0]] + [p for p in (w, b) if p is not None], dy)
    theirs = torch_ln2d(xs[1], w, b, 1e-6)
    grads_theirs = torch.autograd.grad(theirs, [xs[1]] + [p for p in (w, b) if p is not None], dy)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    for g0, g1 in zip(grads_ours, grads_theirs, strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("backend_name,layout", CASES)
def test_gradcheck_float64(backend_name, layout):
    x = _input((2, 5, 3, 4), layout=layout).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(5))

    def fn(x, w, b):
        return torch.ops.normkit.layer_norm_2d(x, w, b, 1e-5)[0]

    with normkit.backend(backend_name):
        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name,layout", CASES)
def test_gradgradcheck_float64(backend_name, layout):
    """Double backward (gradient penalties, Hessian-vector products) through the op."""
    x = _input((2, 4, 3, 2), layout=layout).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(4))

    def fn(x, w, b):
        return torch.ops.normkit.layer_norm_2d(x, w, b, 1e-5)[0]

    with normkit.backend(backend_name):
        assert torch.autograd.gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("backend_name,layout", CASES)
def test_low_precision_within_twice_torchs_error(backend_name, layout, dtype):
    shape = (4, 96, 7, 9)
    x64 = _input(shape, layout=layout)
    w64, b64 = _params(shape[1])
    dy64 = _input(shape, offset=0.0, seed=3)
    x = x64.to(dtype).requires_grad_()
    w, b = w64.to(dtype).requires_grad_(), b64.to(dtype).requires_grad_()
    with normkit.backend(backend_name):
        y = normkit.nn.layernorm2d.layer_norm_2d(x, w, b, 1e-6)
        got = (y, *torch.autograd.grad(y, (x, w, b), dy64.to(dtype)))
    xt = x.detach().clone().requires_grad_()
    wt, bt = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    yt = torch_ln2d(xt, wt, bt, 1e-6)
    theirs = (yt, *torch.autograd.grad(yt, (xt, wt, bt), dy64.to(dtype)))
    xr = x.detach().double().requires_grad_()
    wr, br = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    yr = torch_ln2d(xr, wr, br, 1e-6)
    truth = (yr, *torch.autograd.grad(yr, (xr, wr, br), dy64))
    for name, o, t, r in zip(("y", "dx", "dweight", "dbias"), got, theirs, truth, strict=True):
        assert o.dtype == dtype, name
        err_ours = (o.double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        floor = 4 * torch.finfo(dtype).eps * max(r.abs().max().item(), 1.0)
        assert err_ours <= 2 * err_torch + floor, f"{name}: normkit {err_ours:.3g} vs torch {err_torch:.3g}"


def test_module_state_dict_is_layer_norms_and_defaults():
    ours = normkit.LayerNorm2d(6)
    theirs = nn.LayerNorm(6)
    assert ours.eps == 1e-6 and ours.elementwise_affine and ours.bias is not None
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    nn.LayerNorm(6).load_state_dict(ours.state_dict(), strict=True)
    assert isinstance(ours, nn.LayerNorm)
    assert normkit.LayerNorm2d(6, bias=False).bias is None
    assert normkit.LayerNorm2d(6, elementwise_affine=False).weight is None
    x = _input((2, 6, 5, 4), torch.float32)
    torch.testing.assert_close(ours(x), torch_ln2d(x, theirs.weight, theirs.bias, 1e-6))


def test_bad_input_is_refused():
    layer = normkit.LayerNorm2d(4)
    with pytest.raises(normkit.NormInputError, match="input"):
        layer(torch.randn(2, 4, 5))
    with pytest.raises(normkit.NormInputError, match="channel"):
        layer(torch.randn(2, 3, 5, 5))
    with pytest.raises(normkit.NormInputError, match="weight"):
        torch.ops.normkit.layer_norm_2d(torch.randn(2, 4, 3, 3), torch.randn(3), None, 1e-5)


def test_opcheck():
    x = _input((2, 5, 3, 4), torch.float32).requires_grad_()
    w, b = (t.float().requires_grad_() for t in _params(5))
    for xx in (x, x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()):
        torch.library.opcheck(torch.ops.normkit.layer_norm_2d.default, (xx, w, b, 1e-5))


def test_auto_falls_back_for_what_cpu_cannot_run():
    x = _input((2, 5, 3, 4), torch.float32)
    w, b = _params(5, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto may say once that it falls back to the reference
        y = normkit.nn.layernorm2d.layer_norm_2d(x, w, b, 1e-6)
    torch.testing.assert_close(y, torch_ln2d(x, w, b, 1e-6).contiguous(), rtol=1e-5, atol=1e-5)


def test_torch_func_grad_and_vmap_take_the_permute_path():
    layer = normkit.LayerNorm2d(5).double()
    x = _input((3, 5, 4, 2))
    params = dict(layer.named_parameters())

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x,)).square().sum()

    g = torch.func.grad(loss)(params, x)
    ref = nn.LayerNorm(5).double()

    def loss_ref(p, x):
        return torch_ln2d(x, p["weight"], p["bias"], 1e-6).square().sum()

    g_ref = torch.func.grad(loss_ref)({k: v.detach() for k, v in params.items()}, x)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-10, atol=1e-12)
    per_sample = torch.func.vmap(lambda xi: layer(xi.unsqueeze(0)).squeeze(0))(x)
    torch.testing.assert_close(per_sample, layer(x), rtol=1e-12, atol=1e-12)
    del ref


class LayerNorm2d(nn.LayerNorm):
    """A stand-in for timm.layers.LayerNorm2d (timm is not installed here): same class name, base and forward."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def test_convert_recognises_timms_layer_norm_2d():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), LayerNorm2d(8), nn.GELU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = _input((2, 3, 9, 7), torch.float32)
    before = model(x)
    weight = model[1].weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recognised: no "left alone" warning
        normkit.convert(model)
    assert type(model[1]) is normkit.LayerNorm2d
    assert model[1].weight is weight  # the same tensors: an optimizer built before still works
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_forward_ad_and_jvp_give_torchs_tangent():
    layer = normkit.LayerNorm2d(5).double()
    x, t = _input((2, 5, 3, 4)), _input((2, 5, 3, 4), offset=0.0, seed=7)
    _, tangent = torch.func.jvp(layer, (x,), (t,))
    _, expected = torch.func.jvp(lambda x: torch_ln2d(x, layer.weight, layer.bias, 1e-6), (x,), (t,))
    torch.testing.assert_close(tangent, expected, rtol=1e-10, atol=1e-12)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = layer(fwAD.make_dual(x, t))
        assert fwAD.unpack_dual(out).tangent is not None
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, expected, rtol=1e-10, atol=1e-12)


def test_jit_script_trace_and_export():
    layer = normkit.LayerNorm2d(6)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = _input((2, 6, 5, 4), torch.float32)
    expected = torch_ln2d(x, layer.weight, layer.bias, 1e-6)
    scripted = torch.jit.script(nn.Sequential(layer))
    torch.testing.assert_close(scripted(x), expected)
    assert scripted.state_dict().keys() == {"0.weight", "0.bias"}
    traced = torch.jit.trace(layer, (x,))
    torch.testing.assert_close(traced(x + 1), torch_ln2d(x + 1, layer.weight, layer.bias, 1e-6))
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    assert not any("normkit" in str(n.target) for n in exported.graph.nodes)  # runs without normkit


@pytest.mark.parametrize("keep_op", [False, True], ids=["composite", "op"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compiles_fullgraph(layout, keep_op, monkeypatch):
    """torch.compile sees torch's permute form (which Inductor fuses) or, where the route keeps it,
    normkit's op — whose compiled graph then gives eager's bits."""
    from normkit import route

    monkeypatch.setattr(route, "COMPILE_KEEPS_OP", frozenset({"layer_norm_2d"} if keep_op else ()))
    torch._dynamo.reset()
    layer = normkit.LayerNorm2d(40)
    x = _input((2, 40, 20, 24), torch.float32, layout=layout).requires_grad_()  # 38,400 values
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    xe = x.detach().clone().requires_grad_()
    ye = layer(xe)
    ye.square().sum().backward()
    if keep_op:  # eager runs the same kernels
        assert torch.equal(y, ye) and torch.equal(x.grad, xe.grad)
    else:
        torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, xe.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, torch_ln2d(x.detach(), layer.weight, layer.bias, 1e-6), rtol=1e-5, atol=1e-5)
