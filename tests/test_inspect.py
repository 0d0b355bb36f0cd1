"""normkit.inspect: discrepancy scores, dead channels, gradients; warns on corrupted running statistics."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import normkit
from normkit.tools.inspect import discrepancy_score


class FrozenBN2d(nn.Module):
    """torchvision-style FrozenBatchNorm2d (buffers only)."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, v in (("weight", torch.ones(c)), ("bias", torch.zeros(c)), ("running_mean", torch.zeros(c)),
                        ("running_var", torch.ones(c))):
            self.register_buffer(name, v)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)


def every_norm():
    frozen = getattr(normkit, "FrozenBatchNorm2d", FrozenBN2d)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), normkit.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8), frozen(8),
        normkit.GroupNorm(2, 8), nn.GroupNorm(4, 8), normkit.InstanceNorm2d(8, track_running_stats=True),
        nn.InstanceNorm2d(8, affine=True), normkit.LayerNorm(6), nn.LayerNorm(6), normkit.RMSNorm(6),
        nn.RMSNorm(6), nn.Flatten(2), normkit.BatchNorm1d(8), nn.BatchNorm1d(8), normkit.InstanceNorm1d(8),
        nn.InstanceNorm1d(8),
        nn.Unflatten(2, (1, 6, 6)), normkit.BatchNorm3d(8), nn.BatchNorm3d(8), normkit.InstanceNorm3d(8),
        nn.InstanceNorm3d(8), nn.Flatten(), nn.Linear(8 * 36, 5), normkit.BatchNorm1d(5), nn.BatchNorm1d(5))


def data(gen, n=32):
    return 3 + 0.5 * torch.randn(n, 3, 6, 6, generator=gen)


def healthy_model(gen):
    """Running statistics recalibrated on data of the distribution the batches come from."""
    torch.manual_seed(0)
    model = every_norm()
    normkit.recalibrate(model, [data(gen) for _ in range(4)])
    with torch.no_grad():  # the frozen BN gets its statistics by hand: recalibrate leaves frozen layers alone
        frozen = model[4]
        feats = model[:4].train()(data(gen, 128)).transpose(0, 1).reshape(8, -1).double()
        frozen.running_var.copy_(feats.var(dim=1))
        frozen.running_mean.copy_(feats.mean(dim=1))
    return model.eval()


def test_healthy_model_does_not_warn(capsys):
    gen = torch.Generator().manual_seed(0)
    model = healthy_model(gen)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # inspect's warning fails the test
        records = normkit.inspect(model, data(gen))
    norm_layers = [n for n, m in model.named_modules() if n and not isinstance(
        m, (nn.Conv2d, nn.ReLU, nn.Flatten, nn.Unflatten, nn.Linear))]
    assert [r.name for r in records] == norm_layers
    tracked = [r for r in records if r.score is not None]
    assert len(tracked) == 9  # 8 BatchNorm + the frozen BN; no score for IN, GN, LN, RMS
    assert max(r.score for r in tracked) < 1.0, [(r.name, r.score) for r in tracked]  # the threshold
    assert all(r.grad_weight is None for r in records)
    assert not model.training and all(not m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    out = capsys.readouterr().out
    assert "score" in out and "dead(run)" in out and all(name in out for name in norm_layers)


@pytest.mark.parametrize("layer, corrupt", [
    ("1", lambda bn: bn.running_mean.add_(4.0)),         # normkit BN: mean shifted by ~many std
    ("3", lambda bn: bn.running_var.mul_(0.001)),         # torch BN: variance far too small
    ("4", lambda bn: bn.running_var.mul_(1000.0)),        # frozen BN: variance far too large
    ("25", lambda bn: bn.running_mean.sub_(10.0)),        # normkit BatchNorm1d on (N, C)
])
def test_corrupted_statistics_warn_and_name_the_layer(layer, corrupt):
    gen = torch.Generator().manual_seed(1)
    model = healthy_model(gen)
    with torch.no_grad():
        corrupt(model.get_submodule(layer))
    with pytest.warns(UserWarning, match=rf"in {layer} \(.*normkit.recalibrate") as caught:
        records = normkit.inspect(model, data(gen), print_table=False)
    assert len(caught) == 1
    by_name = {r.name: r for r in records}
    assert by_name[layer].score > 2.0
    others = [r.score for n, r in by_name.items() if n != layer and r.score is not None]
    assert max(others) < 1.0  # batch statistics upstream: one bad layer does not taint the next


def test_discrepancy_score_definition():
    bm, bv = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([4.0, 1.0], dtype=torch.float64)
    rm, rv = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    score, shift, ratio = discrepancy_score(bm, bv, rm, rv, eps=0.0)
    assert shift == pytest.approx((1.0 + 0.0) / 2)
    assert ratio == pytest.approx((math.log(4.0) + 0.0) / 2)
    assert score == pytest.approx(shift + ratio)
    assert discrepancy_score(bm, bv, bm.float(), bv.float(), eps=1e-5)[0] == pytest.approx(0.0, abs=1e-6)


def test_dead_channels_with_batch_and_running_statistics():
    bn = normkit.BatchNorm2d(4)
    model = nn.Sequential(bn, nn.ReLU()).eval()
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([-10.0, -10.0, 0.0, 0.0]))  # channels 0, 1: dead whatever the statistics
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(0.25)
    x = 3 + 0.5 * torch.randn(16, 4, 5, 7)
    x[:, 3] -= 100  # channel 3: its running mean is far above its data -> dead in eval only
    with pytest.warns(UserWarning, match="in 0 "):
        (rec,) = normkit.inspect(model, x, print_table=False)
    assert rec.dead_batch == 0.5
    assert rec.dead_running == 0.75


def test_gradient_norms_match_autograd():
    gen = torch.Generator().manual_seed(2)
    model = healthy_model(gen)
    x, target = data(gen), torch.randint(0, 5, (32,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    records = normkit.inspect(model, x, loss_fn, target, print_table=False)
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    loss_fn(ref(x), target).backward()
    by_name = {r.name: r for r in records}
    checked = 0
    for name, m in ref.named_modules():
        if isinstance(getattr(m, "weight", None), nn.Parameter) and name in by_name:
            assert by_name[name].grad_weight == pytest.approx(m.weight.grad.norm().item(), rel=1e-4, abs=1e-8)
            bias = getattr(m, "bias", None)
            want_bias = None if bias is None else pytest.approx(bias.grad.norm().item(), rel=1e-4, abs=1e-8)
            assert by_name[name].grad_bias == want_bias
            checked += 1
    assert checked >= 10
    assert all(p.grad is None for p in model.parameters())  # inspect leaves .grad alone
