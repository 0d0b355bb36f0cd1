"""FrozenBatchNorm2d (torchvision's state and formula) and normkit.freeze / normkit.unfreeze.

torchvision is not a dependency, so its ``FrozenBatchNorm2d`` is copied below (the
module's code as in torchvision/ops/misc.py, without the deprecated ``n`` argument) as the
oracle for outputs and state_dict handling.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
from normkit.nn import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm3d, SyncBatchNorm


class TorchvisionFrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        num_batches_tracked_key = prefix + "num_batches_tracked"
        if num_batches_tracked_key in state_dict:
            del state_dict[num_batches_tracked_key]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def __repr__(self):
        return f"FrozenBatchNorm2d({self.weight.shape[0]}, eps={self.eps})"


def randomized(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not name.endswith("num_batches_tracked"):
                noise = torch.rand(t.shape, generator=gen, dtype=t.dtype)
                t.copy_(0.5 + noise if ("weight" in name or "var" in name) else noise - 0.5)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_frozen_matches_torchvision(dtype, layout):
    tv = randomized(TorchvisionFrozenBatchNorm2d(7, eps=1e-3), 0).to(dtype)
    ours = normkit.FrozenBatchNorm2d(7, eps=1e-3)
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert repr(ours) == repr(tv) and list(ours.state_dict()) == list(tv.state_dict())
    assert list(ours.parameters()) == [] and len(list(ours.buffers())) == 4
    x = 3 + 0.5 * torch.randn(3, 7, 5, 4, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), tv(xb)
    tol = {} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(ya, yb, **tol)
    assert ya.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    dy = torch.randn(x.shape, dtype=dtype)
    ya.backward(dy), yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    ours.train()  # frozen: training mode changes nothing
    torch.testing.assert_close(ours(x), yb.detach(), **tol)


def test_state_dict_from_batchnorm_drops_num_batches_tracked_and_round_trips():
    bn = randomized(nn.BatchNorm2d(5), 1)
    ours = normkit.FrozenBatchNorm2d(5)
    ours.load_state_dict(bn.state_dict(), strict=True)  # num_batches_tracked is dropped, as torchvision does
    tv = TorchvisionFrozenBatchNorm2d(5)
    tv.load_state_dict(ours.state_dict(), strict=True)
    for key, value in tv.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]) and torch.equal(value, bn.state_dict()[key])
    bn.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(ours(x), bn(x))


def test_gradcheck_float64():
    layer = randomized(normkit.FrozenBatchNorm2d(3), 2).double()
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize(
    "shape, match", [((2, 4, 3, 3), "3 channels"), ((2, 3, 3), "4D input"), ((2, 3, 3, 3), "floating-point")]
)
def test_bad_input(shape, match):
    layer = normkit.FrozenBatchNorm2d(3)
    x = torch.ones(shape, dtype=torch.int64) if match == "floating-point" else torch.randn(shape)
    with pytest.raises(normkit.NormInputError, match=match):
        layer(x)


class _FusedBN(nn.BatchNorm2d):
    """A BatchNorm with an ``act`` attribute, as normkit's fused layers have."""

    def __init__(self, c, act):
        super().__init__(c)
        self.act = act

    def forward(self, x, residual=None):
        return torch.relu(super().forward(x))


def make_model() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        normkit.BatchNorm2d(4, affine=False, eps=1e-3),
        SyncBatchNorm(4, momentum=0.3),
        normkit.BatchRenorm2d(4),
        normkit.GhostBatchNorm2d(4, virtual_batch_size=2),
        _FusedBN(4, "relu"),
        nn.Flatten(2),
        nn.BatchNorm1d(4),
        normkit.BatchNorm1d(4),
        nn.Unflatten(2, (3, 3)),
    )
    randomized(model, 3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_batches_tracked.fill_(7)
    return model


def test_freeze_computes_eval_mode_and_unfreeze_restores_everything():
    model = make_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 3, 3)
    model.eval()
    expected = model(x)
    model.train()
    assert normkit.freeze(model) is model
    kinds = [type(m).__name__ for m in model]
    assert kinds[1:7] == ["FrozenBatchNorm2d"] * 2 + ["FrozenBatchNorm"] + ["FrozenBatchNorm2d"] * 3  # Sync: any dim
    assert kinds[8:10] == ["FrozenBatchNorm1d"] * 2
    assert list(model.parameters()) == list(model[0].parameters())  # only the conv is trainable
    assert model[6].act == "relu"
    torch.testing.assert_close(model(x), expected)  # in training mode: frozen = eval
    assert normkit.unfreeze(model) is model
    assert [type(m) for m in model] == [type(m) for m in make_model()]
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert model[3].momentum == 0.3 and model[2].eps == 1e-3 and model[2].weight is None
    assert model[5].virtual_batch_size == 2 and model[4].r_max == 3.0 and model[6].act == "relu"
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model(x), expected)


def test_freeze_leaves_layers_without_running_stats_and_unfreeze_of_plain_frozen():
    model = nn.Sequential(
        nn.BatchNorm2d(3, track_running_stats=False),
        FrozenBatchNorm3d(3),
        FrozenBatchNorm1d(3),
        FrozenBatchNorm(3),
        normkit.FrozenBatchNorm2d(3),
    )
    with pytest.warns(UserWarning, match="track_running_stats=False"):
        normkit.freeze(model)
    assert type(model[0]) is nn.BatchNorm2d
    normkit.unfreeze(model)
    assert [type(m) for m in model] == [
        nn.BatchNorm2d,
        normkit.BatchNorm3d,
        normkit.BatchNorm1d,
        SyncBatchNorm,
        normkit.BatchNorm2d,
    ]
    assert all(m.affine for m in model[1:])
    single = normkit.freeze(nn.BatchNorm2d(3))
    assert type(single) is normkit.FrozenBatchNorm2d
