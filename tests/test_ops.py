"""The custom ops: gradcheck in float64, torch.library.opcheck, torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
from test_layers import cpu_backends
from torch import nn

import normkit
import normkit.functional as F

ACTS = ["", "relu", "silu", "gelu"]


def _x(*shape, requires_grad=True, channels_last=False):
    gen = torch.Generator().manual_seed(sum(shape))
    x = 3 + 0.5 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def _vec(n, offset=0.5):
    gen = torch.Generator().manual_seed(n)
    return (offset + torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_()


# Each entry: a function of float64 tensors (all differentiable inputs as arguments).
GRADCHECK_CASES = {
    "batch_norm_train": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                         lambda: (_x(3, 4, 2, 3), _vec(4), _vec(4))),
    "batch_norm_train_channels_last": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                                       lambda: (_x(3, 4, 2, 3, channels_last=True), _vec(4), _vec(4))),
    "batch_norm_train_1d": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                            lambda: (_x(5, 3), _vec(3), _vec(3))),
    "batch_norm_train_no_affine": (lambda x: F.batch_norm(x, None, None, training=True), lambda: (_x(3, 4, 5),)),
    "batch_norm_eval": (lambda x, w, b: F.batch_norm(x, _vec(4, 2).detach(), _vec(4, 1).detach(), w, b),
                        lambda: (_x(3, 4, 2, 3), _vec(4), _vec(4))),
    "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), lambda: (_x(2, 3, 4, 5), _vec(3), _vec(3))),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), lambda: (_x(2, 6, 3, 5), _vec(6), _vec(6))),
    "group_norm_channels_last": (lambda x, w, b: F.group_norm(x, 3, w, b),
                                 lambda: (_x(2, 6, 3, 5, channels_last=True), _vec(6), _vec(6))),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (3, 5), w, b),
                   lambda: (_x(4, 3, 5), _vec(15).view(3, 5), _vec(15).view(3, 5))),
    "layer_norm_no_affine": (lambda x: F.layer_norm(x, (7,)), lambda: (_x(4, 7),)),
    "rms_norm": (lambda x, w: F.rms_norm(x, (7,), w), lambda: (_x(4, 7), _vec(7))),
    "rms_norm_no_weight": (lambda x: F.rms_norm(x, (2, 7), eps=1e-3), lambda: (_x(3, 2, 7),)),
}
for _act in ACTS[1:]:
    GRADCHECK_CASES[f"batch_norm_train_residual_{_act}"] = (
        lambda x, w, b, r, a=_act: F.batch_norm(x, None, None, w, b, training=True, residual=r, act=a),
        lambda: (_x(3, 4, 2, 3), _vec(4), _vec(4), _x(3, 4, 2, 3) - 3),
    )
    GRADCHECK_CASES[f"batch_norm_eval_residual_{_act}"] = (
        lambda x, w, b, r, a=_act: F.batch_norm(x, _vec(4, 2).detach(), _vec(4, 1).detach(), w, b, residual=r, act=a),
        lambda: (_x(3, 4, 2, 3), _vec(4), _vec(4), _x(3, 4, 2, 3) - 3),
    )
    GRADCHECK_CASES[f"group_norm_residual_{_act}"] = (
        lambda x, w, b, r, a=_act: F.group_norm(x, 2, w, b, residual=r, act=a),
        lambda: (_x(2, 4, 3, 5), _vec(4), _vec(4), _x(2, 4, 3, 5) - 3),
    )


@pytest.mark.parametrize("backend_name", cpu_backends())
@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_float64(name, backend_name):
    fn, make_inputs = GRADCHECK_CASES[name]
    with normkit.backend(backend_name):
        assert torch.autograd.gradcheck(fn, make_inputs(), eps=1e-6, atol=1e-6, rtol=1e-5)


def _opcheck_samples():
    x = _x(3, 4, 2, 3, requires_grad=True)
    xcl = _x(3, 4, 2, 3, requires_grad=True, channels_last=True)
    w, b = _vec(4), _vec(4)
    res = (_x(3, 4, 2, 3) - 3).detach().requires_grad_()
    rm, rv = _vec(4, 0).detach(), _vec(4, 1).detach()
    ops = torch.ops.normkit
    dy = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    mean, rstd = rm, rv.rsqrt()
    x2 = _x(4, 7)
    w7 = _vec(7)
    return {
        "batch_norm_train": (ops.batch_norm_train, (x, w, b, None, 1e-5, "")),
        "batch_norm_train_fused": (ops.batch_norm_train, (xcl, w, b, res, 1e-5, "silu")),
        "batch_norm_train_no_affine": (ops.batch_norm_train, (x, None, None, None, 1e-5, "relu")),
        "batch_norm_infer": (ops.batch_norm_infer, (x, rm, rv, w, b, res, 1e-5, "gelu")),
        "batch_norm_backward": (ops.batch_norm_backward, (dy, x.detach(), mean, rstd, w.detach(), b.detach(), None,
                                                          "", True, False)),
        "batch_norm_backward_fused": (ops.batch_norm_backward, (dy, x.detach(), mean, rstd, w.detach(),
                                                                b.detach(), res.detach(), "relu", False, True)),
        "group_norm": (ops.group_norm, (x, 2, w, b, res, 1e-5, "relu")),
        "group_norm_channels_last": (ops.group_norm, (xcl, 4, None, None, None, 1e-5, "")),
        "group_norm_backward": (ops.group_norm_backward, (dy, x.detach(), _vec(6).view(3, 2).detach(),
                                                          _vec(6).view(3, 2).detach(), 2, w.detach(), b.detach(),
                                                          None, "", True, False)),
        "layer_norm": (ops.layer_norm, (x2, [7], w7, w7, 1e-5)),
        "layer_norm_no_affine": (ops.layer_norm, (x, [2, 3], None, None, 1e-5)),
        "rms_norm": (ops.rms_norm, (x2, [7], w7, 1e-6)),
        "row_norm_backward": (ops.row_norm_backward, (torch.randn(4, 7, dtype=torch.float64), x2.detach(),
                                                      _vec(4).detach(), _vec(4).detach(), [7], w7.detach(), True)),
        "row_norm_backward_rms": (ops.row_norm_backward, (torch.randn(4, 7, dtype=torch.float64), x2.detach(),
                                                          None, _vec(4).detach(), [7], None, False)),
    }


@pytest.mark.parametrize("name", list(_opcheck_samples()))
def test_opcheck(name):
    op, args = _opcheck_samples()[name]
    torch.library.opcheck(op, args)


def _model():
    # SiLU, not ReLU: a channel that ReLU zeroes becomes a constant row, and normalizing a
    # constant row amplifies rounding noise, which would make eager-vs-compiled comparisons flaky.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        normkit.BatchNorm2d(8),
        nn.SiLU(),
        normkit.GroupNorm(2, 8),
        normkit.InstanceNorm2d(8, affine=True, track_running_stats=True),
        nn.Flatten(2),
        normkit.LayerNorm(36),
        normkit.RMSNorm(36),
        nn.Flatten(),
        normkit.BatchNorm1d(8 * 36, momentum=None),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(training):
    torch.manual_seed(0)
    eager = _model().train(training)
    compiled_model = _model().train(training)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = 3 + torch.randn(4, 3, 6, 6)
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_model.state_dict(), eager.state_dict())


def test_double_backward_is_differentiable():
    """create_graph=True: the backward recomputes on torch's operators, so the gradient has a gradient."""
    x = _x(3, 4).double().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: F.layer_norm(t, (4,)), (x,))
    y = F.layer_norm(x, (4,))
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.nn.functional.layer_norm(x2, (4,))
    (g2,) = torch.autograd.grad(y2.square().sum(), x2, create_graph=True)
    (gg2,) = torch.autograd.grad(g2.square().sum(), x2)
    torch.testing.assert_close(gg, gg2)


def test_torch_compile_inductor_fullgraph():
    """The default backend too: inductor compiles around the opaque normkit ops."""
    torch.manual_seed(0)
    eager = _model().eval()
    twin = _model().eval()
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True)
    x = 3 + torch.randn(4, 3, 6, 6)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, ye = compiled(xc), eager(xe)
    torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-4)
    yc.square().sum().backward()
    ye.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-3, atol=1e-3)
