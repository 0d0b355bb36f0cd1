"""Norm + activation layers with activation and drop *modules* (timm's BatchNormAct2d, GroupNormAct,
LayerNormAct, RmsNormAct, FrozenBatchNormAct2d): the same function as ``act(drop(norm(x)))``, the state of a
layer holding them, fused only where a kernel computes the module exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit
from normkit.nn.fused import fused_act


class _Tagged(nn.Module):
    """A drop path whose effect is visible (and deterministic): adds 0.25 in training, nothing in eval."""

    def forward(self, x):
        return x + 0.25 if self.training else x


def _twins():
    """(normkit layer, the norm it stands for, input) per family."""
    x4 = 3 + torch.randn(4, 6, 5, 5, dtype=torch.float64)
    x3 = 3 + torch.randn(4, 5, 6, dtype=torch.float64)
    return [
        (lambda act, drop: normkit.BatchNormAct2d(6, act=act, drop=drop), lambda: nn.BatchNorm2d(6), x4),
        (lambda act, drop: normkit.GroupNormAct(3, 6, act=act, drop=drop), lambda: nn.GroupNorm(3, 6), x4),
        (lambda act, drop: normkit.LayerNormAct(6, act=act, drop=drop), lambda: nn.LayerNorm(6), x3),
        (lambda act, drop: normkit.RMSNormAct(6, act=act, drop=drop), lambda: nn.RMSNorm(6), x3),
    ]


ACTS = {
    "silu_module": lambda: nn.SiLU(),
    "hardswish": lambda: nn.Hardswish(),
    "leaky": lambda: nn.LeakyReLU(0.2),
    "prelu": lambda: nn.PReLU(),
    "identity": lambda: nn.Identity(),
    "gelu_name": lambda: "gelu",
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("drop", [False, True], ids=["no_drop", "drop"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("family", range(4), ids=["bn", "gn", "ln", "rms"])
def test_same_function_as_norm_drop_act(family, act, drop, train):
    make, make_norm, x = _twins()[family]
    act_obj = ACTS[act]()
    layer = make(act_obj, _Tagged() if drop else None).double().train(train)
    norm = make_norm().double().train(train)
    norm.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("act.")})
    tail = act_obj if isinstance(act_obj, nn.Module) else nn.GELU()
    want_xg = x.clone().requires_grad_()
    h = norm(want_xg)
    if drop:
        h = _Tagged().train(train)(h)
    want = tail(h)
    got_xg = x.clone().requires_grad_()
    got = layer(got_xg)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, got_xg, dy)[0], torch.autograd.grad(want, want_xg, dy)[0],
                               rtol=1e-9, atol=1e-9)
    # fused only where a kernel computes the module exactly and nothing stands between
    fusable = family < 2 and act in ("silu_module", "hardswish", "leaky", "gelu_name") and not drop
    assert bool(fused_act(layer)) == fusable


def test_state_dict_is_that_of_a_layer_holding_the_modules():
    layer = normkit.BatchNormAct2d(4, act=nn.PReLU(), drop=nn.Dropout(0.1))
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                                        "act.weight"]
    twin = normkit.BatchNormAct2d(4, act=nn.PReLU(), drop=nn.Dropout(0.1))
    twin.load_state_dict(layer.state_dict())


def test_freeze_and_unfreeze_keep_the_modules():
    layer = normkit.BatchNormAct2d(4, act=nn.Hardswish(), drop=_Tagged()).eval()
    layer.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 4, 3, 3)
    want = layer(x)
    frozen = normkit.freeze(copy.deepcopy(layer))
    assert isinstance(frozen, normkit.FrozenBatchNorm2d) and isinstance(frozen.act, nn.Hardswish)
    torch.testing.assert_close(frozen.eval()(x), want)
    back = normkit.unfreeze(frozen)
    assert isinstance(back.act, nn.Hardswish) and isinstance(back.drop, _Tagged)
    torch.testing.assert_close(back.eval()(x), want)


def test_frozen_promote_gives_the_promoted_dtype():
    frozen = normkit.FrozenBatchNorm2d(3, promote=True)
    frozen.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 4, 4).bfloat16()
    scale = frozen.weight * (frozen.running_var + frozen.eps).rsqrt()
    want = x * scale.reshape(1, -1, 1, 1) + (frozen.bias - frozen.running_mean * scale).reshape(1, -1, 1, 1)
    got = frozen(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
    assert normkit.FrozenBatchNorm2d(3)(x).dtype == torch.bfloat16


def test_script_refuses_module_tails_with_a_clear_error():
    with pytest.raises(NotImplementedError, match="TorchScript"):
        torch.jit.script(normkit.BatchNormAct2d(3, act=nn.Hardswish()))
    with pytest.raises(NotImplementedError, match="TorchScript"):
        torch.jit.script(normkit.LayerNormAct(3))
    torch.jit.script(normkit.BatchNormAct2d(3, act="silu"))  # names keep their twin


def test_compile_and_export_follow_the_tail():
    layer = normkit.BatchNormAct2d(4, act=nn.Hardswish(), drop=nn.Identity()).eval()
    x = torch.randn(2, 4, 3, 3)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, backend="aot_eager")(x), layer(x))
    program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x), layer(x))
