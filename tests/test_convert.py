"""normkit.convert swaps every norm layer of a model, keeping weights, buffers and flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit


def torch_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.GroupNorm(3, 6),
        nn.InstanceNorm2d(6, affine=True),
        nn.Sequential(nn.Flatten(2), nn.LayerNorm(16), nn.RMSNorm(16)),
        nn.Flatten(),
        nn.BatchNorm1d(96),
        nn.Unflatten(1, (6, 16)),
        nn.InstanceNorm1d(6),
        nn.Unflatten(2, (2, 2, 4)),
        nn.BatchNorm3d(6),
    )


def test_convert_to_normkit_and_back():
    torch.manual_seed(0)
    model = torch_model()
    model[1].running_mean.uniform_()
    model[4].eval()
    params_before = [id(p) for p in model.parameters()]
    x = 3 + torch.randn(4, 3, 4, 4)
    expected = model(x)

    converted = normkit.convert(model)
    assert converted is model
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm |
                                                             nn.GroupNorm | nn.RMSNorm)]
    assert len(norms) == 8
    assert all(type(m).__module__.startswith("normkit.") for m in norms)
    assert [id(p) for p in model.parameters()] == params_before  # optimizers keep working
    assert model[4].training is False and model[1].training is True
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)

    normkit.convert(model, to="torch")
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules())
    assert [id(p) for p in model.parameters()] == params_before


def test_convert_a_bare_layer_and_bad_argument():
    layer = normkit.convert(nn.LayerNorm(4))
    assert type(layer) is normkit.LayerNorm
    with pytest.raises(ValueError, match="to"):
        normkit.convert(layer, to="jax")


def test_unknown_subclass_is_left_alone_with_a_warning():
    class MyNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyNorm(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match="MyNorm"):
        normkit.convert(model)
    assert type(model[0]) is MyNorm
    assert type(model[1]) is normkit.BatchNorm2d


def test_normkit_only_layers_pass_silently():
    import warnings

    model = torch.nn.Sequential(normkit.BatchRenorm2d(3), normkit.GhostBatchNorm2d(3, virtual_batch_size=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normkit.convert(model)
        normkit.convert(model, to="torch")
    assert type(model[0]) is normkit.BatchRenorm2d
