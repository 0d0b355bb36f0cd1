"""GhostBatchNorm1d/2d against Hoffer et al. (2017): BatchNorm per virtual batch, written out here.

The reference cuts the batch into virtual batches of ``virtual_batch_size`` (the last may be
smaller), normalizes each with its own mean and biased variance, and moves the running
statistics once per virtual batch, in order (unbiased variance). Named cases drive one generic
test over several training steps, then eval (= BatchNorm with the running statistics).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import normkit


@dataclasses.dataclass(frozen=True)
class Case:
    cls: str
    shape: tuple
    vbs: int
    kwargs: dict = dataclasses.field(default_factory=dict)
    steps: int = 3
    channels_last: bool = False


CASES = {
    "2d_even_split": Case("GhostBatchNorm2d", (8, 3, 5, 7), 4),
    "2d_last_smaller": Case("GhostBatchNorm2d", (7, 3, 4, 5), 3),
    "2d_last_one_sample": Case("GhostBatchNorm2d", (7, 5, 3, 3), 2),
    "2d_channels_last": Case("GhostBatchNorm2d", (6, 7, 3, 5), 4, channels_last=True),
    "1d_2d_input_odd_33": Case("GhostBatchNorm1d", (11, 33), 4),
    "1d_3d_input": Case("GhostBatchNorm1d", (5, 3, 9), 2),
    "batch_smaller_than_vbs": Case("GhostBatchNorm1d", (5, 7), 128),
    "momentum_none": Case("GhostBatchNorm2d", (6, 3, 4, 4), 4, {"momentum": None}),
    "not_affine": Case("GhostBatchNorm2d", (6, 3, 4, 4), 4, {"affine": False}),
    "no_running_stats": Case("GhostBatchNorm2d", (6, 3, 4, 4), 4, {"track_running_stats": False}),
}


class GhostReference:
    def __init__(self, layer: nn.Module, vbs: int):
        self.vbs = vbs
        self.state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        self.weight = layer.weight.detach().clone().requires_grad_() if layer.affine else None
        self.bias = layer.bias.detach().clone().requires_grad_() if layer.affine else None
        self.eps, self.momentum, self.track = layer.eps, layer.momentum, layer.track_running_stats

    def _affine(self, xhat, shape):
        return xhat if self.weight is None else self.weight.reshape(shape) * xhat + self.bias.reshape(shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        outs = []
        for start in range(0, x.shape[0], self.vbs):
            xb = x[start : start + self.vbs]
            mu, var = xb.mean(dim=dims), xb.var(dim=dims, unbiased=False)
            outs.append(self._affine((xb - mu.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps), shape))
            if self.track:
                n = xb.numel() // xb.shape[1]
                self.state["num_batches_tracked"] += 1
                m = 1.0 / self.state["num_batches_tracked"].item() if self.momentum is None else self.momentum
                with torch.no_grad():
                    self.state["running_mean"] = (1 - m) * self.state["running_mean"] + m * mu
                    self.state["running_var"] = (1 - m) * self.state["running_var"] + m * var * n / (n - 1)
        return torch.cat(outs)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        if not self.track:
            return self._whole()(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        rm, rv = self.state["running_mean"], self.state["running_var"]
        return self._affine((x - rm.reshape(shape)) / torch.sqrt(rv.reshape(shape) + self.eps), shape)

    def _whole(self):
        whole = object.__new__(GhostReference)
        whole.__dict__.update(self.__dict__)
        whole.vbs = 1 << 30  # eval without running statistics: BatchNorm on the whole batch
        return whole


def make_layer(case: Case, gen: torch.Generator) -> nn.Module:
    layer = getattr(normkit, case.cls)(case.shape[1], virtual_batch_size=case.vbs, **case.kwargs).double()
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if not name.endswith("num_batches_tracked"):
                noise = torch.rand(t.shape, generator=gen, dtype=t.dtype)
                t.copy_(0.5 + noise if ("weight" in name or "var" in name) else noise - 0.5)
    return layer


@pytest.mark.parametrize("case_name", list(CASES))
def test_ghost_matches_per_virtual_batch_formulas(case_name):
    case = CASES[case_name]
    gen = torch.Generator().manual_seed(sum(map(ord, case_name)))
    layer = make_layer(case, gen)
    ref = GhostReference(layer, case.vbs)
    tol = {"rtol": 1e-9, "atol": 1e-10}
    for step in range(case.steps):
        x = 3.0 + 0.5 * torch.randn(case.shape, generator=gen, dtype=torch.float64)
        if case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa), ref(xb)
        torch.testing.assert_close(ya, yb, **tol, msg=lambda m, s=step: f"y step {s}: {m}")
        if case.channels_last:
            assert ya.is_contiguous(memory_format=torch.channels_last)
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        ya.backward(dy), yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, **tol, msg=lambda m, s=step: f"dx step {s}: {m}")
        if layer.affine:
            for mine, theirs in ((layer.weight, ref.weight), (layer.bias, ref.bias)):
                torch.testing.assert_close(mine.grad, theirs.grad, **tol)
                mine.grad, theirs.grad = None, None
        for key, value in layer.state_dict().items():
            torch.testing.assert_close(value, ref.state[key], **tol, msg=lambda m, k=key: f"{k}: {m}")
    layer.eval()
    x = 3.0 + 0.5 * torch.randn(case.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref.eval(x), **tol)


def test_batch_within_one_virtual_batch_is_batchnorm_exactly():
    gen = torch.Generator().manual_seed(0)
    bn, gbn = normkit.BatchNorm2d(3), normkit.GhostBatchNorm2d(3, virtual_batch_size=8)
    for _ in range(2):
        x = 3 + 0.5 * torch.randn(8, 3, 4, 5, generator=gen)
        assert torch.equal(bn(x), gbn(x))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, gbn.state_dict()[key]), key


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    layer = normkit.GhostBatchNorm2d(3, virtual_batch_size=2).double()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = (3 + 0.5 * torch.randn(5, 3, 2, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    w = (0.5 + torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.rand(3, generator=gen, dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        tensors = {k: v.clone() for k, v in state.items()} | {"weight": w, "bias": b}
        return torch.func.functional_call(layer, tensors, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_state_dict_round_trip_with_batchnorm():
    layer = normkit.GhostBatchNorm2d(4, virtual_batch_size=2)
    layer(3 + torch.randn(5, 4, 3, 3))
    twin = nn.BatchNorm2d(4)
    twin.load_state_dict(layer.state_dict(), strict=True)
    back = normkit.GhostBatchNorm2d(4, virtual_batch_size=3)
    back.load_state_dict(twin.state_dict(), strict=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, back.state_dict()[key])
    assert int(layer.num_batches_tracked) == 3  # virtual batches of 2, 2, 1 samples
    assert "virtual_batch_size=2" in repr(layer)


@pytest.mark.parametrize("vbs", [0, -3, 2.5, True, None])
def test_bad_virtual_batch_size_is_refused(vbs):
    with pytest.raises(normkit.NormInputError, match="GhostBatchNorm1d: virtual_batch_size: expected a positive int"):
        normkit.GhostBatchNorm1d(3, virtual_batch_size=vbs)


@pytest.mark.parametrize(
    "shape, match",
    [((5, 3), "the last virtual batch has 1 sample"), ((4, 5), "3 channels"), ((4, 3, 2, 2), "2D or 3D input")],
)
def test_bad_input_changes_nothing(shape, match):
    layer = normkit.GhostBatchNorm1d(3, virtual_batch_size=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(normkit.NormInputError, match=match):
        layer(torch.randn(shape))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
