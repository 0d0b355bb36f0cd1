"""Bad input gets a clear error and changes nothing; NaN, Inf and empty batches behave like torch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit
import normkit.functional as F
from normkit import NormInputError

# name -> (layer factory, bad input, words the message must contain)
REFUSALS = {
    "bn2d_3d_input": (lambda: normkit.BatchNorm2d(3), torch.randn(2, 3, 4), ["input", "4D", "3D"]),
    "bn1d_4d_input": (lambda: normkit.BatchNorm1d(3), torch.randn(2, 3, 4, 4), ["input", "2D or 3D", "4D"]),
    "bn3d_4d_input": (lambda: normkit.BatchNorm3d(3), torch.randn(2, 3, 4, 4), ["input", "5D", "4D"]),
    "bn2d_wrong_channels": (lambda: normkit.BatchNorm2d(3), torch.randn(2, 4, 3, 3), ["num_features", "3", "4"]),
    "bn2d_integer_input": (lambda: normkit.BatchNorm2d(3), torch.ones(2, 3, 3, 3, dtype=torch.int64),
                           ["input", "floating", "int64"]),
    "bn1d_one_value_per_channel": (lambda: normkit.BatchNorm1d(3), torch.randn(1, 3),
                                   ["more than 1 value per channel", "GroupNorm", "(1, 3)"]),
    "bn2d_one_value_per_channel": (lambda: normkit.BatchNorm2d(3), torch.randn(1, 3, 1, 1),
                                   ["more than 1 value per channel", "(1, 3, 1, 1)"]),
    "bn_momentum_none_wrong_channels": (lambda: normkit.BatchNorm2d(3, momentum=None), torch.randn(2, 5, 2, 2),
                                        ["num_features"]),
    "in2d_affine_wrong_channels": (lambda: normkit.InstanceNorm2d(3, affine=True), torch.randn(2, 4, 3, 3),
                                   ["num_features", "4"]),
    "in2d_one_spatial_element": (lambda: normkit.InstanceNorm2d(3, track_running_stats=True),
                                 torch.randn(2, 3, 1, 1), ["more than 1 spatial element"]),
    "in1d_2d_input_is_unbatched_wrong_dims": (lambda: normkit.InstanceNorm1d(3), torch.randn(3), ["input", "1D"]),
    "gn_wrong_channels": (lambda: normkit.GroupNorm(2, 4), torch.randn(2, 6, 3), ["num_features", "4", "6"]),
    "gn_1d_input": (lambda: normkit.GroupNorm(2, 4), torch.randn(4), ["input", "at least 2D"]),
    "ln_trailing_mismatch": (lambda: normkit.LayerNorm([4, 5]), torch.randn(2, 5, 4), ["normalized_shape", "(4, 5)"]),
    "ln_integer_input": (lambda: normkit.LayerNorm(4), torch.ones(2, 4, dtype=torch.int32), ["floating", "int32"]),
    "rms_trailing_mismatch": (lambda: normkit.RMSNorm(4), torch.randn(2, 5), ["normalized_shape", "(4,)"]),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_input_names_the_problem_and_changes_nothing(name):
    make, x, words = REFUSALS[name]
    layer = make().train()
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(NormInputError) as info:
        layer(x)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "expected" in message and "got" in message
    after = layer.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed by a refused forward"


def test_error_type_is_both_value_and_runtime_error():
    # torch.nn raises ValueError for some of these mistakes and RuntimeError for others.
    with pytest.raises(ValueError):
        normkit.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError):
        normkit.BatchNorm2d(3)(torch.randn(2, 4, 4, 4))


FUNCTIONAL_REFUSALS = {
    "group_norm_groups_do_not_divide": (lambda: F.group_norm(torch.randn(2, 6, 3), 4), ["num_groups", "6", "4"]),
    "group_norm_weight_size": (lambda: F.group_norm(torch.randn(2, 6, 3), 3, torch.ones(5)), ["weight", "6", "(5,)"]),
    "batch_norm_running_mean_size": (lambda: F.batch_norm(torch.randn(2, 6, 3), torch.zeros(5), torch.ones(6)),
                                     ["running_mean", "6", "(5,)"]),
    "batch_norm_bad_residual": (lambda: F.batch_norm(torch.randn(2, 6, 3), None, None, training=True,
                                                     residual=torch.randn(2, 6)), ["residual", "(2, 6, 3)"]),
    "batch_norm_bad_act": (lambda: F.batch_norm(torch.randn(2, 6, 3), None, None, training=True, act="prelu"),
                           ["act", "prelu"]),
    "layer_norm_weight_shape": (lambda: F.layer_norm(torch.randn(2, 6), (6,), torch.ones(3)), ["weight", "(6,)"]),
    "instance_norm_2d_input": (lambda: F.instance_norm(torch.randn(2, 6)), ["input", "at least 3D"]),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL_REFUSALS))
def test_functional_refusals(name):
    call, words = FUNCTIONAL_REFUSALS[name]
    with pytest.raises(NormInputError) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_functional_batch_norm_refusal_leaves_running_stats():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(NormInputError):
        F.batch_norm(torch.randn(1, 3), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("cls,args,shape", [
    ("BatchNorm1d", (3,), (4, 3, 5)),
    ("BatchNorm2d", (3,), (4, 3, 3, 2)),
    ("InstanceNorm1d", (3,), (4, 3, 5)),
    ("GroupNorm", (1, 3), (4, 3, 5)),
    ("LayerNorm", (5,), (4, 3, 5)),
    ("RMSNorm", (5,), (4, 3, 5)),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_and_inf_propagate_like_torch(cls, args, shape, bad):
    x = torch.randn(shape)
    x[1, 0, 2] = bad
    ours, theirs = getattr(normkit, cls)(*args), getattr(nn, cls)(*args)
    y_ours, y_theirs = ours(x), theirs(x)
    assert torch.equal(y_ours.isnan(), y_theirs.isnan())
    finite = y_theirs.isfinite()
    torch.testing.assert_close(y_ours[finite], y_theirs[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls,args,shape", [
    ("BatchNorm1d", (3,), (0, 3)),
    ("BatchNorm2d", (3,), (0, 3, 4, 4)),
    ("InstanceNorm2d", (3,), (0, 3, 4, 4)),
    ("GroupNorm", (1, 3), (0, 3, 5)),
    ("LayerNorm", (5,), (0, 5)),
    ("RMSNorm", (5,), (0, 5)),
])
def test_empty_batch_like_torch(cls, args, shape):
    ours, theirs = getattr(normkit, cls)(*args), getattr(nn, cls)(*args)
    x = torch.randn(shape, requires_grad=True)
    y = ours(x)
    assert y.shape == theirs(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for key, value in theirs.state_dict().items():
        # torch counts the empty batch and leaves the statistics as they were; so does normkit.
        assert torch.equal(ours.state_dict()[key], value), key
