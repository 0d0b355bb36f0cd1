"""InPlaceABN on the Triton backend (kernels/triton/inplace_abn.py), against the reference backend.

Without CUDA the kernels run on CPU tensors under the Triton interpreter, set up by tests/triton_interpreter.py:
``TRITON_INTERPRET=1`` must be set before triton is first imported, so if another test module imported triton
for the GPU first, this module's tests run in a fresh process (test_interpreter_suite_in_fresh_process).
Accuracy rule (DESIGN.md §4): against the float64 reference, at most twice the reference backend's own error
in the same dtype, plus a floor of a few units in the last place.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import CUDA, fresh_process_test, import_for_interpreter, interpreter_fixture, skip_when_fresh

FRESH_PROCESS = import_for_interpreter("normkit.kernels.triton", "normkit.kernels.triton.inplace_abn")
here = skip_when_fresh(FRESH_PROCESS)

import normkit  # noqa: E402
from normkit import backends  # noqa: E402
from normkit.reference import ReferenceBackend  # noqa: E402
from normkit.triton_backend import TritonBackend, tuning  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
FLOOR = {torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

_interpreter = interpreter_fixture(FRESH_PROCESS, lambda: backends.register_backend("triton", TritonBackend))
test_interpreter_suite_in_fresh_process = fresh_process_test(FRESH_PROCESS, __file__)


def _inputs(shape, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = 3.0 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = 0.5 + torch.rand(shape[1], generator=gen, dtype=torch.float64)
    b = torch.rand(shape[1], generator=gen, dtype=torch.float64) - 0.5
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt), w, b


def _entry_points(be, x, dy, w, b, kind, param):
    """y (in place), mean, var, and from y and from x: dx, Σdz, Σdz·x̂ — the backend's iabn_* entry points."""
    y, mean, var = be.iabn_forward(x.clone(), w, b, 1e-5, kind, param, True)
    rstd = torch.rsqrt(var + 1e-5)
    out = [y, mean, var]
    for src, from_y in ((y, True), (x, False)):
        dx, s1, s2 = be.iabn_backward(src, dy, mean, rstd, w, b, kind, param, from_y, True)
        out += [dx, s1, s2]
    return out


CASES = [
    # name, shape, dtype, layout, kind, param, channel tile
    ("leaky_nchw_split_fp32", (3, 5, 6, 7), torch.float32, "nchw", 1, 0.1, 16),
    ("elu_cl_fp32", (2, 7, 5, 3), torch.float32, "channels_last", 2, 0.8, None),
    ("identity_2d_fp32", (33, 6), torch.float32, "nchw", 0, 0.0, 64),
    ("leaky_fp16", (2, 6, 4, 5), torch.float16, "nchw", 1, 0.2, None),
    ("elu_split_bf16", (3, 4, 5, 4), torch.bfloat16, "channels_last", 2, 1.0, 16),
]


@here
@pytest.mark.parametrize("name,shape,dtype,layout,kind,param,tile", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, shape, dtype, layout, kind, param, tile):
    x, dy, w, b = _inputs(shape, layout)
    ref = ReferenceBackend()
    truth = _entry_points(ref, x, dy, w, b, kind, param)
    xs, dys, ws, bs = (t.to(DEVICE) for t in (x.to(dtype), dy.to(dtype), w.float(), b.float()))
    own = _entry_points(ref, xs, dys, ws, bs, kind, param)
    with tuning(channel_tile=tile or 2048, programs=3):
        got = _entry_points(backends._instance("triton"), xs, dys, ws, bs, kind, param)
    what = ("y", "mean", "var", "dx(y)", "sum_dz(y)", "sum_dz_xhat(y)", "dx(x)", "sum_dz(x)", "sum_dz_xhat(x)")
    for label, g, r, t in zip(what, got, own, truth, strict=True):
        err = (g.double().cpu() - t).abs().max().item()
        err_ref = (r.double().cpu() - t).abs().max().item()
        floor = FLOOR[dtype] * max(t.abs().max().item(), 1.0)
        assert err <= 2 * err_ref + floor, f"{label}: triton {err:.3g} vs reference {err_ref:.3g}"


@here
def test_apply_in_place_and_deterministic():
    x, dy, w, b = _inputs((3, 6, 5, 7), "nchw")
    xs = x.float().to(DEVICE)
    tri = backends._instance("triton")
    scale, shift = w.float().to(DEVICE), b.float().to(DEVICE)
    y = tri.iabn_apply(xs, scale, shift, 1, 0.1, True)
    assert y.data_ptr() == xs.data_ptr()
    with tuning(channel_tile=16, programs=5):
        first = _entry_points(tri, x.float().to(DEVICE), dy.float().to(DEVICE), scale, shift, 2, 0.5)
        second = _entry_points(tri, x.float().to(DEVICE), dy.float().to(DEVICE), scale, shift, 2, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@here
def test_layer_on_triton_equals_torch():
    x, dy, w, b = _inputs((2, 5, 4, 3), "nchw")
    layer = normkit.InPlaceABN(5, activation="leaky_relu", activation_param=0.05).to(DEVICE)
    bn = torch.nn.BatchNorm2d(5).to(DEVICE)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    bn.load_state_dict(layer.state_dict())
    xs, dys = x.float().to(DEVICE), dy.float().to(DEVICE)
    outs = []
    for model in (layer, torch.nn.Sequential(bn, torch.nn.LeakyReLU(0.05))):
        xl = xs.clone().requires_grad_()
        with normkit.backend("triton"):
            y = model(xl * 1.0)
            y.backward(dys)
        outs.append([y.detach(), xl.grad, model.weight.grad if model is layer else bn.weight.grad])
    for a, r in zip(*outs, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-6, atol=1e-7)
