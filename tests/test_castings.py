"""The model families' own forwards (docs/ecosystem.md) against normkit's ``casting`` / ``offset`` / ``layout``.

Each ``*_forward`` below is the family's forward as the library writes it (transformers' Llama, Gemma and T5
RMSNorms, DeBERTa's and NVIDIA's LayerNorms, timm's LayerNormFp32 and RmsNorm2d, the permute form of
LayerNorm2d), written here so the tests need neither library. normkit's layer must give its output dtype,
its values (bit for bit where the family rounds where normkit's kernels round; else to rounding) and its
gradients, on every path (the C++ kernels, the reference backend, torch.compile).
"""

from __future__ import annotations

import pytest
import torch

import normkit
from normkit.nn.layernorm2d import RMSNorm2d

PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
         (torch.float16, torch.float16)]
PAIR_IDS = ["f32", "bf16", "bf16_f32w", "f16"]


def llama_forward(x, weight, eps):
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def gemma_forward(x, weight, eps):
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


def t5_forward(x, weight, eps):
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(weight.dtype)
    return weight * h


def deberta_forward(x, weight, bias, eps):
    input_type = x.dtype
    h = x.float()
    mean = h.mean(-1, keepdim=True)
    variance = (h - mean).pow(2).mean(-1, keepdim=True)
    h = (h - mean) / torch.sqrt(variance + eps)
    h = h.to(input_type)
    return weight * h + bias


def layer_norm_fp32_forward(x, weight, bias, eps):
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def layer_norm_1p_forward(x, weight, bias, eps):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight + 1, bias, eps)


def convnext_channels_first_forward(x, weight, bias, eps):
    input_dtype = x.dtype
    x = x.float()
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    x = x.to(dtype=input_dtype)
    return weight[:, None, None] * x + bias[:, None, None]


def permute_layer_norm_2d(x, weight, bias, eps):
    return torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)


def timm_rms_norm_2d_forward(x, weight, eps):
    v = torch.mean(x.pow(2), dim=1, keepdim=True)
    return x * torch.rsqrt(v + eps) * weight.reshape(1, -1, 1, 1)


def _data(shape, xdt, wdt, seed=0, weight_offset=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (0.5 + torch.randn(shape, generator=g, dtype=torch.float64)).to(xdt)
    w = (weight_offset + 0.1 * torch.randn(shape[-1] if len(shape) < 4 else shape[1], generator=g,
                                          dtype=torch.float64)).to(wdt)
    b = (0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64)).to(wdt)
    return x, w, b


def _check(got, want, exact):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if exact:
        assert torch.equal(got, want), float((got.double() - want.double()).abs().max())
    else:
        tol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}[want.dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _grads(fn, *tensors):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*ts)
    dy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.dtype)
    return y, torch.autograd.grad(y, ts, dy)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("xdt,wdt", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("family", ["llama", "gemma", "t5"])
def test_rms_norm_families(family, xdt, wdt, backend):
    x, w, _ = _data((3, 5, 64), xdt, wdt, weight_offset=0.0 if family == "gemma" else 1.0)
    eps = 1e-6
    want_fn = {"llama": llama_forward, "gemma": gemma_forward, "t5": t5_forward}[family]
    layer = normkit.RMSNorm(64, eps=eps, dtype=wdt, casting="torch" if family == "gemma" else family,
                            offset=1.0 if family == "gemma" else 0.0)
    with torch.no_grad():
        layer.weight.copy_(w)
    with normkit.backend(backend):
        got, g_got = _grads(lambda t, p: torch.func.functional_call(layer, {"weight": p}, (t,)), x, w)
    want, g_want = _grads(lambda t, p: want_fn(t, p, eps), x, w)
    # the families round where normkit's kernels round: equal bits but for the order of the sum of squares
    _check(got, want, exact=False)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=3e-2 if xdt != torch.float32 else 1e-5,
                                   atol=3e-2 if xdt != torch.float32 else 1e-5)


@pytest.mark.parametrize("xdt,wdt", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("family", ["llama", "gemma", "t5"])
def test_rms_norm_families_are_nearer_fp64_truth_than_or_as_near_as_the_family(family, xdt, wdt):
    """In half precision normkit's result is as near the float64 truth of the family's formula as the
    family's own (at most one ulp of the output dtype further on any element)."""
    x, w, _ = _data((4, 7, 128), xdt, wdt, seed=3, weight_offset=0.0 if family == "gemma" else 1.0)
    want_fn = {"llama": llama_forward, "gemma": gemma_forward, "t5": t5_forward}[family]
    xd, wd = x.double(), w.double() + (1.0 if family == "gemma" else 0.0)  # (the family code casts to float32)
    truth = wd * xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6)
    theirs = want_fn(x, w, 1e-6)
    ours = normkit.functional.rms_norm(x, (128,), w, 1e-6, casting="torch" if family == "gemma" else family,
                                       offset=1.0 if family == "gemma" else 0.0)
    assert ours.dtype == theirs.dtype
    ulp = 2 * torch.finfo(ours.dtype).eps * truth.abs().clamp(min=1e-3)  # two ulps: the rule of tests/test_numerics.py
    assert ((ours.double() - truth).abs() <= (theirs.double() - truth).abs() + ulp).all()


@pytest.mark.parametrize("xdt,wdt", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("family", ["deberta", "fp32", "1p"])
def test_layer_norm_families(family, xdt, wdt):
    x, w, b = _data((3, 5, 48), xdt, wdt, weight_offset=0.0 if family == "1p" else 1.0)
    eps = 1e-5

    want_fn = {"deberta": deberta_forward, "fp32": layer_norm_fp32_forward, "1p": layer_norm_1p_forward}[family]
    casting = {"deberta": "llama", "fp32": "fp32", "1p": "torch"}[family]
    got, g_got = _grads(lambda t, p, q: normkit.functional.layer_norm(t, (48,), p, q, eps, casting=casting,
                                                                       offset=1.0 if family == "1p" else 0.0),
                        x, w, b)
    want, g_want = _grads(lambda t, p, q: want_fn(t, p, q, eps), x, w, b)
    _check(got, want, exact=False)
    for a, c in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a.double(), c.double(), rtol=3e-2 if xdt != torch.float32 else 1e-4,
                                   atol=3e-2 if xdt != torch.float32 else 1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("xdt,wdt", PAIRS[:2], ids=PAIR_IDS[:2])
def test_layer_norm_2d_castings_and_layout(xdt, wdt, channels_last):
    x, w, b = _data((2, 16, 5, 7), xdt, wdt)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    permuted = permute_layer_norm_2d(x, w, b, 1e-6)
    layer = normkit.LayerNorm2d(16, dtype=wdt, layout="channels_last")
    with torch.no_grad():
        layer.weight.copy_(w), layer.bias.copy_(b)
    got = layer(x)
    # the permute form's layout: channels_last, whatever the input's
    assert got.stride() == permuted.stride() and got.is_contiguous(memory_format=torch.channels_last)
    _check(got, permuted, exact=False)
    assert normkit.LayerNorm2d(16, dtype=wdt)(x).is_contiguous(memory_format=torch.channels_last) == channels_last
    llama = normkit.LayerNorm2d(16, dtype=wdt, casting="llama")
    with torch.no_grad():
        llama.weight.copy_(w), llama.bias.copy_(b)
    _check(llama(x), convnext_channels_first_forward(x, w, b, 1e-6), exact=False)


@pytest.mark.parametrize("layout", ["input", "channels_last"])
def test_rms_norm_2d(layout):
    x, w, _ = _data((2, 12, 4, 6), torch.float32, torch.float32)
    layer = RMSNorm2d(12, eps=1e-6, layout=layout)
    with torch.no_grad():
        layer.weight.copy_(w)
    got, g_got = _grads(lambda t, p: torch.func.functional_call(layer, {"weight": p}, (t,)), x, w)
    want, g_want = _grads(lambda t, p: timm_rms_norm_2d_forward(t, p, 1e-6), x, w)
    _check(got, want, exact=False)
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)
    for a, c in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_castings_compile_to_the_same_values():
    x, w, b = _data((4, 6, 32), torch.bfloat16, torch.bfloat16)
    layer = normkit.RMSNorm(32, eps=1e-6, dtype=torch.bfloat16, casting="llama")
    ln = normkit.LayerNorm(32, dtype=torch.bfloat16, casting="llama")
    with torch.no_grad():
        layer.weight.copy_(w), ln.weight.copy_(w), ln.bias.copy_(b)
    model = torch.nn.Sequential(layer, ln)
    torch._dynamo.reset()
    _check(torch.compile(model, backend="aot_eager")(x), model(x), exact=False)


def test_bad_options_are_refused_with_their_name():
    with pytest.raises(normkit.NormInputError, match="casting"):
        normkit.RMSNorm(8, casting="fp32")
    with pytest.raises(normkit.NormInputError, match="layout"):
        normkit.LayerNorm2d(8, layout="nhwc")
    with pytest.raises(normkit.NormInputError, match="casting"):
        normkit.functional.layer_norm(torch.randn(2, 8), (8,), casting="t5")
