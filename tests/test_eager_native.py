"""The eager path: C++ ops with C++ autograd (csrc/autograd.h) against the custom ops they stand in for.

Plain eager calls on CPU run ``torch.ops.normkit_cpu.{bn_train, bn_infer, gn, ln, rms}`` (forward,
backward and autograd in C++) instead of the ``torch.ops.normkit`` custom ops with Python
autograd. They must be the same function: the same outputs and gradients, bit for bit, since they
call the same kernels with statistics, scale and shift formed by the same tensor operations; and the
same higher-order behaviour (create_graph recomputes through aten). The running-statistics update
in C++ must give the bits of the tensor-op update it replaces.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normkit
from normkit import ops, running_stats

pytestmark = pytest.mark.skipif(ops.native_ops() is None, reason="the C++ extension is not built")

K = torch.ops.normkit_cpu
ACTS = ["", "relu", "silu", "gelu"]


def _x(*shape, dtype=torch.float32, channels_last=False):
    x = 3 + 0.5 * torch.randn(*shape, dtype=torch.float64)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_()


def _grads(fn, inputs, dy):
    """Outputs and gradients of ``fn(*inputs)[0]`` for the inputs that require grad."""
    out = fn(*inputs)
    y = out[0] if isinstance(out, tuple | list) else out
    need = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [y.detach(), *(o.detach() for o in (out[1:] if isinstance(out, tuple | list) else ()))], \
        torch.autograd.grad(y, need, dy)


def _same(a, b):
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(u.isnan(), v.isnan()) and torch.equal(u.nan_to_num(), v.nan_to_num())
        assert u.stride() == v.stride()


def _compare(native, custom, inputs, dy):
    out_n, g_n = _grads(native, inputs, dy)
    out_c, g_c = _grads(custom, inputs, dy)
    _same(out_n, out_c)
    _same(g_n, g_c)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,channels_last", [((8, 7), False), ((4, 6, 33), False), ((3, 5, 7, 9), False),
                                                 ((3, 5, 7, 9), True), ((2, 3, 4, 5, 3), True)])
@pytest.mark.parametrize("residual", [False, True])
def test_batch_norm_train_matches_custom_op(shape, channels_last, act, residual):
    torch.manual_seed(0)
    x = _x(*shape, channels_last=channels_last)
    c = shape[1]
    w = torch.randn(c, requires_grad=True)
    b = torch.randn(c, requires_grad=True)
    r = _x(*shape, channels_last=channels_last) if residual else None
    dy = torch.randn(shape)
    _compare(lambda x, w, b, r: K.bn_train(x, w, b, r, 1e-5, ops._ACT_CODES[act]),
             lambda x, w, b, r: torch.ops.normkit.batch_norm_train(x, w, b, r, 1e-5, act), (x, w, b, r), dy)


@pytest.mark.parametrize("act", ["", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_batch_norm_infer_matches_custom_op(dtype, act):
    torch.manual_seed(1)
    x = _x(4, 6, 5, 3, dtype=dtype)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var = torch.randn(6, dtype=pd), torch.rand(6, dtype=pd) + 0.5
    w = torch.randn(6, dtype=pd, requires_grad=True)
    b = torch.randn(6, dtype=pd, requires_grad=True)
    dy = torch.randn(x.shape).to(dtype)
    _compare(lambda x, w, b: K.bn_infer(x, mean, var, w, b, None, 1e-5, ops._ACT_CODES[act]),
             lambda x, w, b: torch.ops.normkit.batch_norm_infer(x, mean, var, w, b, None, 1e-5, act), (x, w, b), dy)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_matches_custom_op(act, channels_last, affine):
    torch.manual_seed(2)
    x = _x(3, 12, 5, 7, channels_last=channels_last)
    w = torch.randn(12, requires_grad=True) if affine else None
    b = torch.randn(12, requires_grad=True) if affine else None
    r = _x(3, 12, 5, 7, channels_last=channels_last)
    dy = torch.randn(x.shape)
    _compare(lambda x, w, b, r: K.gn(x, 4, w, b, r, 1e-5, ops._ACT_CODES[act]),
             lambda x, w, b, r: torch.ops.normkit.group_norm(x, 4, w, b, r, 1e-5, act), (x, w, b, r), dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,normalized", [((7, 33), [33]), ((2, 5, 6, 4), [6, 4]), ((3, 1023), [1023])])
def test_layer_and_rms_norm_match_custom_ops(shape, normalized, dtype):
    torch.manual_seed(3)
    x = _x(*shape, dtype=dtype)
    pd = torch.float64 if dtype == torch.float64 else dtype
    w = torch.randn(normalized, dtype=pd, requires_grad=True)
    b = torch.randn(normalized, dtype=pd, requires_grad=True)
    dy = torch.randn(shape).to(dtype)
    _compare(lambda x, w, b: K.ln(x, normalized, w, b, 1e-5),
             lambda x, w, b: torch.ops.normkit.layer_norm(x, normalized, w, b, 1e-5), (x, w, b), dy)
    _compare(lambda x, w: K.rms(x, normalized, w, 1e-6),
             lambda x, w: torch.ops.normkit.rms_norm(x, normalized, w, 1e-6), (x, w), dy)


def test_only_requested_gradients_and_none_for_absent_inputs():
    x = _x(4, 6, 5)
    w = torch.randn(6)  # no grad
    b = torch.randn(6, requires_grad=True)
    (gx, gb) = torch.autograd.grad(K.bn_train(x, w, b, None, 1e-5, 0)[0].sum(), (x, b))
    assert gx.shape == x.shape and gb.shape == b.shape
    y, mean, var = K.bn_train(x, None, None, None, 1e-5, 1)
    assert not mean.requires_grad and not var.requires_grad and y.requires_grad


def test_eager_calls_take_the_native_ops():
    """A module's eager forward records the C++ Function's node, not the custom op's Python one."""
    x = _x(4, 6, 5)
    for layer in (normkit.BatchNorm1d(6), normkit.GroupNorm(2, 6), normkit.LayerNorm(5), normkit.RMSNorm(5)):
        with normkit.backend("cpu"):
            name = layer(x).grad_fn.name()
        assert "normkit" in name and "eager" in name, name


@pytest.mark.parametrize("make", [
    lambda: (normkit.BatchNorm2d(3), (2, 3, 4, 5)),
    lambda: (normkit.GroupNorm(3, 6), (2, 6, 3, 4)),
    lambda: (normkit.LayerNorm([4, 5]), (2, 3, 4, 5)),
    lambda: (normkit.RMSNorm(5), (2, 3, 5)),
    lambda: (normkit.BatchNorm2d(3).eval(), (2, 3, 4, 5)),
])
def test_gradcheck_and_gradgradcheck_through_the_native_ops(make):
    """float64 first and second derivatives on the cpu backend (the native ops; create_graph
    recomputes through aten inside the C++ backward)."""
    torch.manual_seed(4)
    layer, shape = make()
    layer = layer.double()
    for p in layer.parameters():
        p.data.uniform_(0.5, 1.5)
    x = (3 + torch.randn(shape, dtype=torch.float64)).requires_grad_()
    params = list(layer.parameters())
    with normkit.backend("cpu"):
        assert layer(x).grad_fn.name().find("eager") >= 0
        assert gradcheck(lambda x: layer(x), (x,))
        assert gradgradcheck(lambda x: layer(x), (x,))
        # parameters too: their second derivatives flow through the recomputation
        w = params[0]
        g = torch.autograd.grad(layer(x).square().sum(), (x, w), create_graph=True)
        hv = torch.autograd.grad(g[0].sum() + g[1].sum(), (x, w))
    with normkit.backend("reference"):
        g_ref = torch.autograd.grad(layer(x).square().sum(), (x, w), create_graph=True)
        hv_ref = torch.autograd.grad(g_ref[0].sum() + g_ref[1].sum(), (x, w))
    for a, b in zip(hv, hv_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- running statistics
def _python_update(layer, mean, var, count, monkeypatch):
    monkeypatch.setattr(running_stats, "_native_update", lambda *a: None)
    running_stats.update_running_stats(layer, mean, var, count)
    monkeypatch.undo()


@pytest.mark.parametrize("momentum", [0.1, 0.37, None])
@pytest.mark.parametrize("stat_dtype,running_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float32),
                                                      (torch.float64, torch.float64)])
@pytest.mark.parametrize("policy", ["skip", "torch"])
@pytest.mark.parametrize("finite", [True, False])
def test_native_running_update_is_the_tensor_op_update_bit_for_bit(momentum, stat_dtype, running_dtype, policy,
                                                                    finite, monkeypatch):
    torch.manual_seed(5)
    layers = [normkit.BatchNorm1d(37, momentum=momentum).to(running_dtype) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    old = normkit.set_nonfinite_policy(policy)
    try:
        for step in range(4):
            mean = (3 + torch.randn(37, dtype=torch.float64)).to(stat_dtype)
            var = (torch.rand(37, dtype=torch.float64) + 1e-3).to(stat_dtype)
            if not finite and step == 2:
                var[5] = float("inf")
            with pytest.warns(RuntimeWarning) if (not finite and step == 2 and policy == "skip") else _nothing():
                running_stats.update_running_stats(layers[0], mean, var, 64 + step)  # native
            with pytest.warns(RuntimeWarning) if (not finite and step == 2 and policy == "skip") else _nothing():
                _python_update(layers[1], mean, var, 64 + step, monkeypatch)
            for key, value in layers[0].state_dict().items():
                other = layers[1].state_dict()[key]
                assert torch.equal(value.nan_to_num(), other.nan_to_num()), (key, step)
            assert torch.equal(layers[0].skipped_batches, layers[1].skipped_batches)
    finally:
        normkit.set_nonfinite_policy(old)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_native_running_update_serves_plain_eager_cpu_only():
    layer = normkit.BatchNorm1d(4)
    args = (layer.running_mean, layer.running_var, layer.num_batches_tracked, torch.zeros(4), torch.ones(4))
    assert running_stats._native_update(*args) is not None
    half = (layer.running_mean.half(), layer.running_var.half(), None, torch.zeros(4), torch.ones(4))
    assert running_stats._native_update(*half) is None  # fp16 buffers: the tensor-op form rounds per op in fp16
