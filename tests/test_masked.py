"""Masked statistics for padded sequences: BatchNorm1d(input, mask) and LayerNorm(input, mask).

The reference (float64, written here) takes per-channel statistics over the real positions only
(count = number of True in the mask), moves the running statistics with them, and gives padded
positions output 0; autograd of that reference gives the gradients (0 at padded positions).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import normkit


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple  # (N, C, L)
    lengths: tuple  # real positions per sequence (a prefix), or None for a random mask
    kwargs: dict = dataclasses.field(default_factory=dict)
    steps: int = 3
    random_mask: bool = False


CASES = {
    "prefix_lengths": Case((4, 3, 9), (9, 5, 1, 7)),
    "random_mask_odd_33": Case((3, 33, 7), (), random_mask=True),
    "one_real_sequence": Case((3, 7, 5), (5, 0, 0)),
    "momentum_none": Case((4, 3, 6), (6, 2, 3, 4), {"momentum": None}),
    "not_affine": Case((4, 3, 6), (1, 2, 3, 4), {"affine": False}),
    "no_running_stats": Case((4, 3, 6), (6, 2, 3, 4), {"track_running_stats": False}),
    "all_real": Case((2, 5, 4), (4, 4)),
}


def make_mask(case: Case, gen: torch.Generator) -> torch.Tensor:
    n, _, length = case.shape
    if case.random_mask:
        mask = torch.rand(n, length, generator=gen) < 0.6
        mask[0, :2] = True  # at least two real positions
        return mask
    return torch.arange(length)[None, :] < torch.tensor(case.lengths)[:, None]


class MaskedBNReference:
    def __init__(self, layer):
        self.state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        self.weight = layer.weight.detach().clone().requires_grad_() if layer.affine else None
        self.bias = layer.bias.detach().clone().requires_grad_() if layer.affine else None
        self.eps, self.momentum, self.track = layer.eps, layer.momentum, layer.track_running_stats

    def __call__(self, x, mask, training=True):
        m = mask[:, None, :].to(x.dtype)  # (N, 1, L)
        if training or not self.track:
            count = m.sum() * 1.0
            mu = (x * m).sum(dim=(0, 2)) / count
            var = (((x - mu[None, :, None]) * m) ** 2).sum(dim=(0, 2)) / count
            if training and self.track:
                self.state["num_batches_tracked"] += 1
                a = 1.0 / self.state["num_batches_tracked"].item() if self.momentum is None else self.momentum
                with torch.no_grad():
                    self.state["running_mean"] = (1 - a) * self.state["running_mean"] + a * mu
                    self.state["running_var"] = (1 - a) * self.state["running_var"] + a * var * count / (count - 1)
        else:
            mu, var = self.state["running_mean"], self.state["running_var"]
        y = (x - mu[None, :, None]) / torch.sqrt(var[None, :, None] + self.eps)
        if self.weight is not None:
            y = self.weight[None, :, None] * y + self.bias[None, :, None]
        return y * m


@pytest.mark.parametrize("case_name", list(CASES))
def test_masked_batchnorm1d_matches_reference(case_name):
    case = CASES[case_name]
    gen = torch.Generator().manual_seed(sum(map(ord, case_name)))
    layer = normkit.BatchNorm1d(case.shape[1], **case.kwargs).double()
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if not name.endswith("num_batches_tracked"):
                noise = torch.rand(t.shape, generator=gen, dtype=t.dtype)
                t.copy_(0.5 + noise if ("weight" in name or "var" in name) else noise - 0.5)
    ref = MaskedBNReference(layer)
    tol = {"rtol": 1e-9, "atol": 1e-10}
    for step in range(case.steps):
        mask = make_mask(case, gen)
        x = 3.0 + 0.5 * torch.randn(case.shape, generator=gen, dtype=torch.float64)
        x[~mask[:, None, :].expand_as(x)] = 1e6  # padding holds garbage: it must not matter
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa, mask), ref(xb, mask)
        torch.testing.assert_close(ya, yb, **tol, msg=lambda m, s=step: f"y step {s}: {m}")
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        ya.backward(dy), yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, **tol, msg=lambda m, s=step: f"dx step {s}: {m}")
        pad = ~mask[:, None, :].expand_as(x)
        assert torch.equal(xa.grad[pad], torch.zeros_like(xa.grad[pad])) and torch.equal(ya[pad], ya[pad] * 0)
        if layer.affine:
            for mine, theirs in ((layer.weight, ref.weight), (layer.bias, ref.bias)):
                torch.testing.assert_close(mine.grad, theirs.grad, **tol)
                mine.grad, theirs.grad = None, None
        for key, value in layer.state_dict().items():
            torch.testing.assert_close(value, ref.state[key], **tol, msg=lambda m, k=key: f"{k}: {m}")
    layer.eval()
    mask = make_mask(case, gen)
    x = 3.0 + 0.5 * torch.randn(case.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(layer(x, mask), ref(x, mask, training=False), **tol)


def test_all_true_mask_is_plain_batchnorm():
    gen = torch.Generator().manual_seed(0)
    a, b = normkit.BatchNorm1d(5), normkit.BatchNorm1d(5)
    x = 3 + 0.5 * torch.randn(4, 5, 6, generator=gen)
    torch.testing.assert_close(a(x, torch.ones(4, 6, dtype=torch.bool)), b(x), rtol=1e-6, atol=1e-6)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key])


def test_masked_statistics_exact_for_large_mean_in_float32():
    """1e4 + randn in float32: E[x²] − E[x]² would lose the variance entirely; two-pass keeps it."""
    gen = torch.Generator().manual_seed(1)
    x64 = 1e4 + torch.randn(6, 3, 50, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 50, generator=gen) < 0.5
    layer = normkit.BatchNorm1d(3, momentum=1.0)
    y = layer(x64.float(), mask)
    truth = MaskedBNReference(normkit.BatchNorm1d(3).double())(x64.float().double(), mask)
    assert (y.double() - truth).abs().max().item() < 1e-2  # the input itself is quantised at ulp(1e4) ≈ 1e-3
    picked = x64.float().double().transpose(1, 2)[mask]
    torch.testing.assert_close(layer.running_var.double(), picked.var(dim=0), rtol=1e-3, atol=0)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    layer = normkit.BatchNorm1d(3).double()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    x = (3 + 0.5 * torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    w = (0.5 + torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.rand(3, generator=gen, dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        tensors = {k: v.clone() for k, v in state.items()} | {"weight": w, "bias": b}
        return torch.func.functional_call(layer, tensors, (x,), {"mask": mask})

    assert torch.autograd.gradcheck(f, (x, w, b))
    ln = normkit.LayerNorm(4).double()
    xl = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ln(t, mask[:, :3]), (xl,))


@pytest.mark.parametrize(
    "normalized_shape, shape, mask_shape",
    [((8,), (3, 5, 8), (3, 5)), ((4, 2), (3, 5, 4, 2), (3, 5)), ((6,), (7, 6), (7,))],
)
def test_masked_layernorm(normalized_shape, shape, mask_shape):
    gen = torch.Generator().manual_seed(3)
    ln = normkit.LayerNorm(normalized_shape).double()
    with torch.no_grad():
        ln.weight.copy_(torch.rand(normalized_shape, generator=gen, dtype=torch.float64) + 0.5)
        ln.bias.copy_(torch.rand(normalized_shape, generator=gen, dtype=torch.float64))
    mask = torch.rand(mask_shape, generator=gen) < 0.6
    x = 3 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    m = mask.reshape(mask_shape + (1,) * len(normalized_shape)).to(x.dtype)
    ya = ln(xa, mask)
    yb = torch.nn.functional.layer_norm(xb, normalized_shape, ln.weight, ln.bias) * m
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    ya.backward(dy), yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(xa.grad * (1 - m)) == 0


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(4, 6), "dtype torch.bool"),
        (torch.ones(4, 6, dtype=torch.int64), "dtype torch.bool"),
        (torch.ones(4, 7, dtype=torch.bool), r"shape \(4, 6\)"),
        (torch.ones(4, dtype=torch.bool), r"shape \(4, 6\)"),
        ([[True] * 6] * 4, "torch.Tensor"),
        (torch.tensor([[True] + [False] * 5] + [[False] * 6] * 3), "more than 1 real position"),
    ],
    ids=["float", "int64", "wrong_length", "1d", "list", "one_real_position"],
)
def test_bad_mask_changes_nothing(mask, match):
    layer = normkit.BatchNorm1d(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(normkit.NormInputError, match=f"BatchNorm1d: mask: expected .*{match}"):
        layer(torch.randn(4, 3, 6), mask)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bad_input_with_mask():
    with pytest.raises(normkit.NormInputError, match=r"3D input \(N, C, L\) when a mask is given"):
        normkit.BatchNorm1d(3)(torch.randn(4, 3), torch.ones(4, dtype=torch.bool))
    ln = normkit.LayerNorm(6)
    with pytest.raises(normkit.NormInputError, match="LayerNorm: mask: expected shape"):
        ln(torch.randn(4, 5, 6), torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(normkit.NormInputError, match="LayerNorm: mask: expected dtype torch.bool"):
        ln(torch.randn(4, 5, 6), torch.ones(4, 5))


def test_one_value_per_channel_error_names_the_alternatives():
    layer = normkit.BatchNorm1d(3)
    with pytest.raises(normkit.NormInputError) as info:
        layer(torch.randn(1, 3))
    for alternative in ("eval()", "GroupNorm", "LayerNorm", "SyncBatchNorm"):
        assert alternative in str(info.value)
    assert int(layer.num_batches_tracked) == 0
