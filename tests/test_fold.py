"""normkit.fold: folded model == unfolded eval model (1e-5 relative), original untouched, report exact."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import normkit
from normkit.tools.fold import is_batch_norm_like


class FrozenBN2d(nn.Module):
    """torchvision-style FrozenBatchNorm2d: everything is a buffer, always uses running statistics."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, v in (("weight", torch.ones(c)), ("bias", torch.zeros(c)), ("running_mean", torch.zeros(c)),
                        ("running_var", torch.ones(c))):
            self.register_buffer(name, v)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class BNAct2d(normkit.BatchNorm2d):
    """A fused BN + activation layer as normkit's fused layers are: an ``act`` name, optional residual."""

    def __init__(self, c, act="relu"):
        super().__init__(c)
        self.act = act

    def forward(self, x, residual=None):
        return self._normalize(x, residual, self.act)


class ScaledBN(nn.BatchNorm2d):
    """A BN subclass whose forward does more than BN (an activation under another name): never folded."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


def frozen_bn(c):
    cls = getattr(normkit, "FrozenBatchNorm2d", FrozenBN2d)
    return cls(c)


class Residual(nn.Module):
    """fx-traceable: conv-bn, a residual add, a conv whose output has two users, a BN after a ReLU."""

    def __init__(self, bn=normkit.BatchNorm2d):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 7, 3, padding=1), bn(7)
        self.conv2, self.bn2 = nn.Conv2d(7, 7, 3, padding=1, bias=False), bn(7)
        self.conv3, self.bn3 = nn.Conv2d(7, 7, 1), bn(7)
        self.bn4 = bn(7)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.bn2(self.conv2(y))
        c = self.conv3(y)
        return self.bn4(torch.relu(self.bn3(c) + c))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 7, 3), BNAct2d(7)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c, c * 0.5)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 7, 3), nn.BatchNorm2d(7)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.bn(self.conv(x))


def seq(*mods):
    return nn.Sequential(*mods)


X1, X2, X3 = (2, 3, 11), (2, 3, 9, 7), (2, 3, 5, 6, 7)
# name: (model factory, input shape, folded count, kept BN names)
CASES = {
    "conv1d": (lambda: seq(nn.Conv1d(3, 7, 3), normkit.BatchNorm1d(7)), X1, 1, []),
    "conv1d_nobias_torch": (lambda: seq(nn.Conv1d(3, 7, 3, bias=False), nn.BatchNorm1d(7)), X1, 1, []),
    "conv2d": (lambda: seq(nn.Conv2d(3, 33, 3), normkit.BatchNorm2d(33), nn.ReLU()), X2, 1, []),
    "conv2d_nobias_torch": (lambda: seq(nn.Conv2d(3, 7, 3, bias=False), nn.BatchNorm2d(7)), X2, 1, []),
    "conv2d_grouped": (lambda: seq(nn.Conv2d(3, 9, 3, groups=3), normkit.BatchNorm2d(9)), X2, 1, []),
    "conv2d_depthwise": (lambda: seq(nn.Conv2d(3, 3, 3, groups=3, bias=False), nn.BatchNorm2d(3)), X2, 1, []),
    "conv3d": (lambda: seq(nn.Conv3d(3, 7, 3), normkit.BatchNorm3d(7)), X3, 1, []),
    "conv3d_nobias_torch": (lambda: seq(nn.Conv3d(3, 7, 3, bias=False), nn.BatchNorm3d(7)), X3, 1, []),
    "convT1d": (lambda: seq(nn.ConvTranspose1d(3, 7, 3, stride=2), normkit.BatchNorm1d(7)), X1, 1, []),
    "convT2d_nobias": (lambda: seq(nn.ConvTranspose2d(3, 7, 3, bias=False), nn.BatchNorm2d(7)), X2, 1, []),
    "convT2d_grouped": (lambda: seq(nn.ConvTranspose2d(3, 9, 3, groups=3), normkit.BatchNorm2d(9)), X2, 1,
                        []),
    "convT3d": (lambda: seq(nn.ConvTranspose3d(3, 7, 2, groups=1), nn.BatchNorm3d(7)), X3, 1, []),
    "linear": (lambda: seq(nn.Linear(5, 7), normkit.BatchNorm1d(7)), (6, 5), 1, []),
    "linear_nobias_torch": (lambda: seq(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7)), (6, 5), 1, []),
    "not_affine": (lambda: seq(nn.Conv2d(3, 7, 3), normkit.BatchNorm2d(7, affine=False)), X2, 1, []),
    "sync_bn": (lambda: seq(nn.Conv2d(3, 7, 3), nn.SyncBatchNorm(7)), X2, 1, []),
    "frozen_bn": (lambda: seq(nn.Conv2d(3, 7, 3), frozen_bn(7)), X2, 1, []),
    "fused_relu": (lambda: seq(nn.Conv2d(3, 7, 3), BNAct2d(7, "relu")), X2, 1, []),
    "fused_gelu": (lambda: seq(nn.Conv2d(3, 7, 3), BNAct2d(7, "gelu")), X2, 1, []),
    "nested_sequential": (
        lambda: seq(seq(nn.Conv2d(3, 7, 3), seq(normkit.BatchNorm2d(7))), nn.ReLU(),
                    seq(seq(nn.Conv2d(7, 7, 1)), nn.BatchNorm2d(7), nn.ReLU(), nn.BatchNorm2d(7))),
        X2, 2, ["2.3"]),
    "fx_residual": (Residual, X2, 2, ["bn3", "bn4"]),
    "fx_residual_torch_bn": (lambda: Residual(nn.BatchNorm2d), X2, 2, ["bn3", "bn4"]),
    "fx_fused_residual": (TwoInputs, X2, 0, ["bn"]),
    "untraceable": (Untraceable, X2, 0, ["bn"]),
    "custom_forward_subclass": (lambda: seq(nn.Conv2d(3, 7, 3), ScaledBN(7)), X2, 0, ["1"]),
    "bn_without_running_stats": (
        lambda: seq(nn.Conv2d(3, 7, 3), normkit.BatchNorm2d(7, track_running_stats=False)), X2, 0, ["1"]),
    "groupnorm_layernorm_untouched": (
        lambda: seq(nn.Conv2d(3, 8, 3), normkit.GroupNorm(2, 8), nn.GroupNorm(4, 8),
                    normkit.InstanceNorm2d(8),
                    nn.Flatten(), normkit.LayerNorm(8 * 7 * 5), nn.RMSNorm(8 * 7 * 5)), X2, 0, []),
}


def randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial statistics and affine parameters for every BN-like layer (and biases)."""
    with torch.no_grad():
        for m in model.modules():
            if is_batch_norm_like(m):
                c = m.running_mean.numel() if m.running_mean is not None else m.weight.numel()
                if m.running_mean is not None:
                    m.running_mean.copy_(3 + 0.5 * torch.randn(c, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                if m.weight is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen))
                    m.bias.copy_(0.3 * torch.randn(c, generator=gen))


@pytest.mark.parametrize("name", list(CASES))
def test_fold(name):
    factory, shape, n_folded, kept = CASES[name]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = factory()
    randomize(model, gen)
    model.eval()
    x = 3 + 0.5 * torch.randn(shape, generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    folded, rep = normkit.fold(model, report=True)
    assert len(rep.folded) == n_folded, str(rep)
    assert sorted(n for n, _ in rep.kept) == sorted(kept), str(rep)
    left = sum(is_batch_norm_like(m) for m in folded.modules())
    total = sum(is_batch_norm_like(m) for m in model.modules())
    assert left == total - n_folded
    with torch.no_grad():
        got = folded(x)
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(scale))
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k


def test_training_mode_bn_is_kept_and_logged(caplog):
    model = seq(nn.Conv2d(3, 7, 3), normkit.BatchNorm2d(7), nn.Conv2d(7, 7, 1), nn.BatchNorm2d(7).eval())
    with caplog.at_level(logging.INFO, logger="normkit.fold"):
        folded = normkit.fold(model)
    assert isinstance(folded[1], normkit.BatchNorm2d) and isinstance(folded[3], nn.Identity)
    assert "1: in training mode" in caplog.text and "folded  3 -> 2" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_fx_result_keeps_activation_of_fused_layer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 7, 3), BNAct2d(7, "silu")

        def forward(self, x):
            return self.bn(self.conv(x)) * 2

    model = M().eval()
    randomize(model, torch.Generator().manual_seed(1))
    folded, rep = normkit.fold(model, report=True)
    assert rep.used_fx and rep.folded == [("bn", "conv")]
    assert isinstance(folded.bn, nn.SiLU)
    x = 3 + 0.5 * torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
