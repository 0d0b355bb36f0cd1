"""Numerics rules (DESIGN.md §4): low precision, large means, determinism."""

from __future__ import annotations

import pytest
import torch
from test_layers import cpu_backends
from torch import nn

import normkit

LOW = [torch.float16, torch.bfloat16]


def _error(y: torch.Tensor, truth: torch.Tensor) -> float:
    return (y.double() - truth).abs().max().item()


@pytest.mark.parametrize("backend_name", cpu_backends())
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
@pytest.mark.parametrize("cls,args,shape", [
    ("BatchNorm2d", (6,), (8, 6, 5, 7)),
    ("GroupNorm", (3, 6), (8, 6, 5, 7)),
    ("LayerNorm", (35,), (8, 6, 35)),
    ("RMSNorm", (35,), (8, 6, 35)),
])
def test_low_precision_within_twice_torch_error(cls, args, shape, dtype, backend_name):
    """fp32 module, fp16/bf16 input: output in the input dtype, at most 2x torch's own error."""
    gen = torch.Generator().manual_seed(7)
    x64 = 3 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x64.to(dtype)
    truth_layer = getattr(nn, cls)(*args).double()
    ours, theirs = getattr(normkit, cls)(*args), getattr(nn, cls)(*args)
    with torch.no_grad():
        for p in truth_layer.parameters():
            p.uniform_(0.5, 1.5, generator=gen)
    ours.load_state_dict(truth_layer.state_dict())
    theirs.load_state_dict(truth_layer.state_dict())
    with normkit.backend(backend_name):
        xo = x.clone().requires_grad_()
        y = ours(xo)
    truth_in = x.double().requires_grad_()
    truth = truth_layer(truth_in)
    assert y.dtype == dtype
    xt = x.clone().requires_grad_()
    y_torch = theirs(xt)
    floor = 2 * torch.finfo(dtype).eps  # one ulp at |y| ~ 2
    assert _error(y, truth) <= 2 * _error(y_torch, truth) + floor
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    with normkit.backend(backend_name):
        y.backward(dy.to(dtype))
    y_torch.backward(dy.to(dtype))
    truth.backward(dy)
    assert xo.grad.dtype == dtype
    scale = truth_in.grad.abs().max().item()
    assert _error(xo.grad, truth_in.grad) <= 2 * _error(xt.grad, truth_in.grad) + floor * scale
    if cls == "BatchNorm2d":
        assert ours.running_mean.dtype == torch.float32 and ours.running_var.dtype == torch.float32


@pytest.mark.parametrize("backend_name", cpu_backends())
def test_fp16_values_near_1e4_keep_running_stats_finite(backend_name):
    # x² overflows fp16 (max 65504): a naive fp16 E[x²] would give inf; statistics must be fp32.
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 300 * torch.randn(16, 4, 6, 6, generator=gen)).half()
    bn = normkit.BatchNorm2d(4, momentum=None)
    with normkit.backend(backend_name):
        y = bn(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    xd = x.double()
    torch.testing.assert_close(bn.running_mean.double(), xd.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(bn.running_var.double(), xd.var(dim=(0, 2, 3)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend_name", cpu_backends())
def test_large_mean_statistics_are_exact(backend_name):
    """x = 1e4 + randn in fp32: mean and variance within 1e-4 relative of float64."""
    gen = torch.Generator().manual_seed(1)
    x = 1e4 + torch.randn(32, 5, 17, 19, generator=gen)
    xd = x.double()
    ops = torch.ops.normkit
    with normkit.backend(backend_name):
        for layout in (torch.contiguous_format, torch.channels_last):
            _, mean, var = ops.batch_norm_train(x.contiguous(memory_format=layout), None, None, None, 0.0, "")
            torch.testing.assert_close(mean.double(), xd.mean(dim=(0, 2, 3)), rtol=1e-4, atol=0)
            torch.testing.assert_close(var.double(), xd.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
        _, mean, var = ops.group_norm(x, 5, None, None, None, 0.0, "")
        torch.testing.assert_close(var.double(), xd.var(dim=(2, 3), unbiased=False), rtol=1e-4, atol=0)
        rows = x.reshape(32 * 5, -1)
        _, mean, rstd = ops.layer_norm(rows, [17 * 19], None, None, 0.0)
        torch.testing.assert_close(rstd.double(), rows.double().var(dim=1, unbiased=False).rsqrt(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend_name", cpu_backends())
def test_deterministic(backend_name):
    gen = torch.Generator().manual_seed(2)
    x = 3 + torch.randn(16, 8, 9, 9, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    results = []
    with normkit.backend(backend_name):
        for _ in range(2):
            layers = [normkit.BatchNorm2d(8), normkit.GroupNorm(4, 8), normkit.LayerNorm(9)]
            xi = x.clone().requires_grad_()
            out = [layer(xi) for layer in layers]
            torch.autograd.backward(out, [dy] * 3)
            results.append([*out, xi.grad, *(p.grad for layer in layers for p in layer.parameters())])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
