"""BatchRenorm1d/2d/3d against the formulas of Ioffe (2017), Algorithm 1, written out here in float64.

Named cases drive one generic test: several training steps (output, input and parameter
gradients, running statistics after each step, with the warm-up ramp), then eval. The running
statistics start far from the batch's so that r and d are clipped (checked: the test would
otherwise not exercise the clip). Plus: r_max=1, d_max=0 is BatchNorm bit for bit, gradcheck,
state_dict round trips with torch.nn.BatchNorm, bad arguments.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import normkit


@dataclasses.dataclass(frozen=True)
class Case:
    cls: str
    shape: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    steps: int = 4
    channels_last: bool = False
    dtype: torch.dtype = torch.float64


CASES = {
    "2d_warmup_3": Case("BatchRenorm2d", (4, 3, 5, 7), {"warmup_steps": 3, "momentum": 0.3}, steps=5),
    "2d_no_warmup": Case("BatchRenorm2d", (3, 7, 4, 5), {"warmup_steps": 0, "r_max": 1.5, "d_max": 0.5}),
    "2d_channels_last": Case("BatchRenorm2d", (3, 5, 4, 3), {"warmup_steps": 2}, channels_last=True),
    "1d_2d_input_odd_33": Case("BatchRenorm1d", (9, 33), {"warmup_steps": 0, "momentum": 0.5}),
    "1d_3d_input": Case("BatchRenorm1d", (4, 3, 11), {"warmup_steps": 1, "r_max": 2.0, "d_max": 1.0}),
    "3d": Case("BatchRenorm3d", (2, 3, 3, 4, 5), {"warmup_steps": 0}),
    "not_affine": Case("BatchRenorm2d", (4, 3, 5, 7), {"warmup_steps": 0, "affine": False}),
    "momentum_none": Case("BatchRenorm2d", (4, 3, 5, 7), {"warmup_steps": 2, "momentum": None}),
    "default_warmup": Case("BatchRenorm2d", (4, 3, 5, 7)),  # 25k-step ramp: step 0..3 are nearly BN
    "float32_large_mean": Case("BatchRenorm2d", (4, 3, 5, 7), {"warmup_steps": 0}, dtype=torch.float32),
}


def limits(step: int, r_max: float, d_max: float, warmup: int) -> tuple[float, float]:
    frac = 1.0 if warmup == 0 else min(step / warmup, 1.0)
    return 1.0 + (r_max - 1.0) * frac, d_max * frac


class RenormReference:
    """Algorithm 1 of the paper (running statistics as BatchNorm keeps them), in float64."""

    def __init__(self, layer: nn.Module):
        self.state = {k: v.detach().double().clone() for k, v in layer.state_dict().items()}
        self.weight = layer.weight.detach().double().clone().requires_grad_() if layer.affine else None
        self.bias = layer.bias.detach().double().clone().requires_grad_() if layer.affine else None
        self.eps, self.momentum = layer.eps, layer.momentum
        self.r_max, self.d_max, self.warmup = layer.r_max, layer.d_max, layer.warmup_steps
        self.steps = 0
        self.clipped = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        rm, rv = self.state["running_mean"], self.state["running_var"]
        r_lim, d_lim = limits(self.steps, self.r_max, self.d_max, self.warmup)
        mu_b = x.mean(dim=dims)
        var_b = x.var(dim=dims, unbiased=False)
        sigma_b = torch.sqrt(var_b + self.eps)
        sigma = torch.sqrt(rv + self.eps)
        r_raw = (sigma_b / sigma).detach()
        d_raw = ((mu_b - rm) / sigma).detach()
        r = r_raw.clamp(1 / r_lim, r_lim)
        d = d_raw.clamp(-d_lim, d_lim)
        self.clipped += int((r != r_raw).sum() + (d != d_raw).sum())
        xhat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape)
        y = xhat * r.reshape(shape) + d.reshape(shape)
        if self.weight is not None:
            y = self.weight.reshape(shape) * y + self.bias.reshape(shape)
        self.steps += 1
        n = x.numel() // x.shape[1]
        m = 1.0 / self.steps if self.momentum is None else self.momentum
        with torch.no_grad():
            self.state["running_mean"] = (1 - m) * rm + m * mu_b
            self.state["running_var"] = (1 - m) * rv + m * var_b * n / (n - 1)
            self.state["num_batches_tracked"] = self.state["num_batches_tracked"] + 1
        return y

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        rm, rv = self.state["running_mean"], self.state["running_var"]
        y = (x - rm.reshape(shape)) / torch.sqrt(rv.reshape(shape) + self.eps)
        return y if self.weight is None else self.weight.reshape(shape) * y + self.bias.reshape(shape)


def make_layer(case: Case, gen: torch.Generator) -> nn.Module:
    layer = getattr(normkit, case.cls)(case.shape[1], **case.kwargs).to(case.dtype)
    with torch.no_grad():
        if layer.affine:
            layer.weight.copy_(0.5 + torch.rand(layer.weight.shape, generator=gen))
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) - 0.5)
        # running statistics far from the batches' (mean ~3, std ~0.5): r and d get clipped
        layer.running_mean.copy_(torch.rand(layer.running_mean.shape, generator=gen) * 2)
        layer.running_var.copy_(0.02 + torch.rand(layer.running_var.shape, generator=gen))
    return layer


def batch(case: Case, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(case.shape, generator=gen, dtype=torch.float64)
    x = (1e4 + x) if case.dtype == torch.float32 else 3.0 + 0.5 * x
    x = x.to(case.dtype)
    return x.contiguous(memory_format=torch.channels_last) if case.channels_last else x


@pytest.mark.parametrize("case_name", list(CASES))
def test_renorm_matches_paper_formulas(case_name):
    case = CASES[case_name]
    gen = torch.Generator().manual_seed(sum(map(ord, case_name)))
    layer = make_layer(case, gen)
    ref = RenormReference(layer)
    if case.dtype == torch.float32:  # running stats near the batch: large mean, tiny spread
        with torch.no_grad():
            layer.running_mean.fill_(1e4 + 0.3)
            layer.running_var.fill_(0.4)
        ref = RenormReference(layer)
    fp64 = case.dtype == torch.float64
    # float32 at 1e4: the input itself is quantised to ulp(1e4) ≈ 1e-3, i.e. ~2e-3 in units of σ_B ≈ 0.5, so
    # no float32 method does better than a few 1e-3; a variance taken as E[x²] − E[x]² would be off by O(1).
    tol = {"rtol": 1e-9, "atol": 1e-10} if fp64 else {"rtol": 1e-3, "atol": 1e-2}  # rtol: parameter grads are sums
    for step in range(case.steps):
        x = batch(case, gen)
        x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
        y_ours, y_ref = layer(x_ours), ref(x_ref)
        torch.testing.assert_close(y_ours.double(), y_ref, **tol, msg=lambda m, s=step: f"y step {s}: {m}")
        if case.channels_last:
            assert y_ours.is_contiguous(memory_format=torch.channels_last)
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        y_ours.backward(dy.to(case.dtype)), y_ref.backward(dy)
        torch.testing.assert_close(x_ours.grad.double(), x_ref.grad, **tol, msg=lambda m, s=step: f"dx step {s}: {m}")
        if layer.affine:
            for mine, theirs in ((layer.weight, ref.weight), (layer.bias, ref.bias)):
                torch.testing.assert_close(mine.grad.double(), theirs.grad, **tol)
                mine.grad, theirs.grad = None, None
        for key, value in layer.state_dict().items():
            if key in ref.state:
                torch.testing.assert_close(value.double(), ref.state[key], **tol, msg=lambda m, k=key: f"{k}: {m}")
    if case.kwargs.get("warmup_steps", 25_000) < case.steps and fp64:
        assert ref.clipped > 0, "r and d were never clipped: the case does not test the clip"
    layer.eval()
    x = batch(case, gen)
    torch.testing.assert_close(layer(x).double(), ref.eval(x.double()), **tol)


def test_limits_ramp_linearly_from_batchnorm():
    layer = normkit.BatchRenorm2d(3, r_max=3.0, d_max=5.0, warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append(layer.limits())
        layer(torch.randn(2, 3, 4, 4))
    assert seen == [(1.0, 0.0), (1.5, 1.25), (2.0, 2.5), (2.5, 3.75), (3.0, 5.0), (3.0, 5.0)]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_r_max_1_d_max_0_is_batchnorm_exactly(momentum):
    gen = torch.Generator().manual_seed(0)
    bn = normkit.BatchNorm2d(5, momentum=momentum)
    rn = normkit.BatchRenorm2d(5, momentum=momentum, r_max=1.0, d_max=0.0, warmup_steps=0)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5, generator=gen) + 0.5)
        bn.running_var.copy_(torch.rand(5, generator=gen) + 0.1)
    rn.load_state_dict(bn.state_dict())
    for _ in range(3):
        x = 3 + 0.5 * torch.randn(4, 5, 3, 7, generator=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(xa), rn(xb)
        dy = torch.randn(x.shape, generator=gen)
        ya.backward(dy), yb.backward(dy)
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
        assert torch.equal(bn.weight.grad, rn.weight.grad) and torch.equal(bn.bias.grad, rn.bias.grad)
        for key, value in bn.state_dict().items():
            assert torch.equal(value, rn.state_dict()[key]), key
    bn.eval(), rn.eval()
    x = torch.randn(2, 5, 3, 3, generator=gen)
    assert torch.equal(bn(x), rn(x))


@pytest.mark.parametrize("r_max, d_max", [(1.2, 0.1), (1.0, 0.0)], ids=["clipped", "batchnorm"])
def test_gradcheck_float64(r_max, d_max):
    """gradcheck differentiates numerically *through* r and d, which the method treats as constants; so it
    runs where they are constant: every r and d clipped (running statistics far off), or r_max=1, d_max=0."""
    gen = torch.Generator().manual_seed(1)
    layer = normkit.BatchRenorm2d(3, warmup_steps=0, r_max=r_max, d_max=d_max).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, 5.0, 1.0]))
        layer.running_var.copy_(torch.tensor([0.01, 5.0, 0.01]))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = (3 + 0.5 * torch.randn(3, 3, 2, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    w = (0.5 + torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.rand(3, generator=gen, dtype=torch.float64).requires_grad_()

    def f(x, w, b):  # fresh running statistics on every call: the function must not drift
        tensors = {k: v.clone() for k, v in state.items()} | {"weight": w, "bias": b}
        return torch.func.functional_call(layer, tensors, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_state_dict_round_trip_with_batchnorm():
    gen = torch.Generator().manual_seed(2)
    layer = normkit.BatchRenorm2d(4, warmup_steps=0)
    layer(3 + torch.randn(3, 4, 5, 5, generator=gen))
    twin = nn.BatchNorm2d(4, momentum=0.01)
    twin.load_state_dict(layer.state_dict(), strict=True)
    back = normkit.BatchRenorm2d(4)
    back.load_state_dict(twin.state_dict(), strict=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, back.state_dict()[key])
    layer.eval(), twin.eval()
    x = torch.randn(2, 4, 5, 5, generator=gen)
    torch.testing.assert_close(layer(x), twin(x))


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"r_max": 0.5}, "r_max"), ({"r_max": math.nan}, "r_max"), ({"d_max": -1.0}, "d_max"),
     ({"d_max": math.inf}, "d_max"), ({"warmup_steps": -1}, "warmup_steps"), ({"warmup_steps": 2.5}, "warmup_steps")],
)
def test_bad_arguments_are_refused(kwargs, argument):
    with pytest.raises(normkit.NormInputError, match=f"BatchRenorm2d: {argument}: expected"):
        normkit.BatchRenorm2d(3, **kwargs)


@pytest.mark.parametrize(
    "shape, match", [((2, 4, 3, 3), "3 channels"), ((2, 3, 3), "4D input"), ((1, 3, 1, 1), "1 value")]
)
def test_bad_input_changes_nothing(shape, match):
    layer = normkit.BatchRenorm2d(3, warmup_steps=0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(normkit.NormInputError, match=match):
        layer(torch.randn(shape))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
