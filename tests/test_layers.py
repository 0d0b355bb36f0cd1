"""Every normkit layer against its torch.nn twin, driven by named cases.

One generic test runs each case: identical state (loaded from the torch layer, strict), a few
training steps with fresh non-zero-mean batches (outputs, input and parameter gradients,
buffers after each step), then eval outputs and a state_dict round trip back into torch.
The cases run on every backend that can run CPU tensors here (``reference``, and ``cpu`` when
its kernels are built) and in float32 and float64.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import normkit
from normkit import backends


@dataclasses.dataclass(frozen=True)
class Case:
    cls: str  # class name, the same in torch.nn and normkit
    args: tuple
    shape: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    memory_format: torch.memory_format = torch.contiguous_format
    steps: int = 3


CASES = {
    "bn1d_2d_input": Case("BatchNorm1d", (7,), (9, 7)),
    "bn1d_3d_input": Case("BatchNorm1d", (3,), (4, 3, 11)),
    "bn2d_odd_33": Case("BatchNorm2d", (33,), (3, 33, 5, 7)),
    "bn2d_1x1": Case("BatchNorm2d", (7,), (6, 7, 1, 1)),
    "bn2d_batch1": Case("BatchNorm2d", (3,), (1, 3, 5, 7)),
    "bn2d_channels_last": Case("BatchNorm2d", (7,), (3, 7, 5, 7), memory_format=torch.channels_last),
    "bn2d_not_affine": Case("BatchNorm2d", (3,), (4, 3, 5, 7), {"affine": False}),
    "bn2d_momentum_none": Case("BatchNorm2d", (3,), (4, 3, 5, 7), {"momentum": None}, steps=4),
    "bn2d_momentum_0.5": Case("BatchNorm2d", (3,), (4, 3, 5, 7), {"momentum": 0.5}),
    "bn2d_no_running_stats": Case("BatchNorm2d", (3,), (4, 3, 5, 7), {"track_running_stats": False}),
    "bn2d_eps": Case("BatchNorm2d", (3,), (4, 3, 5, 7), {"eps": 1e-2}),
    "bn3d": Case("BatchNorm3d", (3,), (2, 3, 3, 4, 5)),
    "bn3d_channels_last": Case("BatchNorm3d", (5,), (2, 5, 3, 4, 5), memory_format=torch.channels_last_3d),
    "in1d": Case("InstanceNorm1d", (3,), (4, 3, 9)),
    "in1d_unbatched": Case("InstanceNorm1d", (3,), (3, 9)),
    "in2d_affine_tracked": Case("InstanceNorm2d", (7,), (4, 7, 5, 7), {"affine": True, "track_running_stats": True}),
    "in2d_channels_last": Case("InstanceNorm2d", (7,), (3, 7, 5, 7), {"affine": True},
                               memory_format=torch.channels_last),
    "in3d": Case("InstanceNorm3d", (3,), (2, 3, 3, 4, 5), {"affine": True}),
    "ln_last_dim_33": Case("LayerNorm", (33,), (4, 5, 33)),
    "ln_two_dims": Case("LayerNorm", ((5, 7),), (3, 4, 5, 7)),
    "ln_no_bias": Case("LayerNorm", (7,), (6, 7), {"bias": False}),
    "ln_not_affine": Case("LayerNorm", (7,), (6, 7), {"elementwise_affine": False}),
    "ln_odd_1023": Case("LayerNorm", (1023,), (3, 1023)),
    "gn_3_groups_of_11": Case("GroupNorm", (3, 33), (4, 33, 5, 7)),
    "gn_channels_last": Case("GroupNorm", (2, 6), (3, 6, 5, 7), memory_format=torch.channels_last),
    "gn_not_affine": Case("GroupNorm", (2, 6), (3, 6, 5), {"affine": False}),
    "gn_2d_input": Case("GroupNorm", (2, 6), (5, 6)),
    "gn_3d_spatial": Case("GroupNorm", (4, 8), (2, 8, 3, 4, 5)),
    "rms_33": Case("RMSNorm", (33,), (4, 33)),
    "rms_two_dims_eps": Case("RMSNorm", ((5, 7),), (3, 5, 7), {"eps": 1e-3}),
    "rms_not_affine": Case("RMSNorm", (7,), (6, 7), {"elementwise_affine": False}),
}


def cpu_backends() -> list[str]:
    names = ["reference"]
    if backends.available().get("cpu") == "available":
        names.append("cpu")
    return names


def randomize(layer: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial γ, β and running statistics, so no term can hide behind 1s and 0s."""
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
            t.copy_(0.5 + noise if ("weight" in name or "var" in name) else noise - 0.5)


def make_pair(case: Case, dtype: torch.dtype, gen: torch.Generator):
    ref = getattr(nn, case.cls)(*case.args, **case.kwargs).to(dtype)
    randomize(ref, gen)
    ours = getattr(normkit, case.cls)(*case.args, **case.kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def batch(case: Case, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = 3.0 + 0.5 * torch.randn(case.shape, generator=gen, dtype=torch.float64)
    x = x.to(dtype)
    if len(case.shape) in (4, 5):
        x = x.contiguous(memory_format=case.memory_format)
    return x


def assert_as_accurate(ours: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """``ours`` is at most twice as far from the float64 ``truth`` as torch.nn in the same dtype.

    In float64 (where torch's result is the truth) the comparison is tight instead. Comparing
    float32 results with each other directly would flag ill-conditioned cases (a group of three
    near-equal values) where normkit is the more accurate of the two.
    """
    if ours.dtype == torch.float64:
        torch.testing.assert_close(ours, truth, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")
        return
    err_ours = (ours.double() - truth).abs().max().item()
    err_torch = (torch_same_dtype.double() - truth).abs().max().item()
    floor = 1e-6 * max(truth.abs().max().item(), 1.0)
    assert err_ours <= 2 * err_torch + floor, f"{what}: normkit error {err_ours:.3g} vs torch.nn {err_torch:.3g}"


def assert_same_state(modules: list[nn.Module], what: str) -> None:
    ours, theirs, truth = (m.state_dict() for m in modules)
    assert list(ours) == list(theirs)
    for key in ours:
        if key.endswith("num_batches_tracked"):
            assert torch.equal(ours[key], theirs[key]), f"{what}: {key}"
        else:
            assert_as_accurate(ours[key], theirs[key], truth[key], f"{what}: {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend_name", cpu_backends())
@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_torch_nn(case_name, backend_name, dtype):
    case = CASES[case_name]
    gen = torch.Generator().manual_seed(sum(map(ord, case_name)))
    theirs, ours = make_pair(case, dtype, gen)
    truth = getattr(nn, case.cls)(*case.args, **case.kwargs).double()
    truth.load_state_dict(theirs.state_dict())
    layers = [ours, theirs, truth]
    with normkit.backend(backend_name):
        for step in range(case.steps):
            x = batch(case, dtype, gen)
            inputs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
            outputs = [layer(inp) for layer, inp in zip(layers, inputs, strict=True)]
            assert_as_accurate(*outputs, f"y, step {step}")
            assert outputs[0].dtype == x.dtype
            if len(case.shape) in (4, 5):
                fmt = case.memory_format
                assert outputs[0].is_contiguous(memory_format=fmt) == outputs[1].is_contiguous(memory_format=fmt), \
                    "output memory format differs from torch.nn's"
            dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            for out in outputs:
                out.backward(dy.to(out.dtype))
            assert_as_accurate(*(inp.grad for inp in inputs), f"dx, step {step}")
            for name, _ in ours.named_parameters():
                assert_as_accurate(*(m.get_parameter(name).grad for m in layers), f"d{name}, step {step}")
            assert_same_state(layers, f"step {step}")

        for layer in layers:
            layer.eval()
        x = batch(case, dtype, gen)
        assert_as_accurate(ours(x), theirs(x), truth(x.double()), "eval y")

    # state_dict round trip: normkit's state loads back into torch.nn, strict.
    back = getattr(nn, case.cls)(*case.args, **case.kwargs).to(dtype)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in back.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key])


def test_lazy_batch_norm_becomes_normkit_layer():
    for lazy, dims in ((normkit.LazyBatchNorm1d, (4, 5)), (normkit.LazyBatchNorm2d, (4, 5, 3, 3)),
                       (normkit.LazyBatchNorm3d, (4, 5, 2, 3, 3))):
        layer = lazy()
        x = torch.randn(dims) + 3
        y = layer(x)
        assert type(layer).__name__ == lazy.__name__.removeprefix("Lazy")
        assert type(layer).__module__.startswith("normkit")
        assert layer.weight.shape == (5,) and layer.running_mean.shape == (5,)
        twin = getattr(nn, type(layer).__name__)(5)
        twin.load_state_dict(layer.state_dict(), strict=True)
        # the first forward already counted as a training step
        assert int(layer.num_batches_tracked) == 1
        twin.load_state_dict(getattr(nn, type(layer).__name__)(5).state_dict())
        torch.testing.assert_close(y, nn.functional.batch_norm(x, None, None, training=True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", ["BatchNorm2d", "InstanceNorm2d", "GroupNorm", "LayerNorm", "RMSNorm"])
def test_is_instance_of_torch_twin_and_same_repr(cls):
    args = {"GroupNorm": (2, 4), "LayerNorm": (4,), "RMSNorm": (4,)}.get(cls, (4,))
    ours, theirs = getattr(normkit, cls)(*args), getattr(nn, cls)(*args)
    assert isinstance(ours, getattr(nn, cls))
    assert repr(ours) == repr(theirs)


def test_group_norm_one_group_is_layer_norm_and_c_groups_is_instance_norm():
    x = 3 + 0.5 * torch.randn(4, 6, 5, 7, dtype=torch.float64)
    gn1 = normkit.functional.group_norm(x, 1)
    ln = normkit.functional.layer_norm(x, (6, 5, 7))
    torch.testing.assert_close(gn1, ln, rtol=1e-12, atol=1e-12)
    gnc = normkit.functional.group_norm(x, 6)
    inn = normkit.functional.instance_norm(x)
    torch.testing.assert_close(gnc, inn, rtol=1e-12, atol=1e-12)


def test_functional_matches_torch_functional():
    gen = torch.Generator().manual_seed(3)
    x = 3 + 0.5 * torch.randn(4, 6, 5, 7, generator=gen, dtype=torch.float64)
    w, b = torch.rand(6, generator=gen, dtype=torch.float64), torch.rand(6, generator=gen, dtype=torch.float64)
    F, tF = normkit.functional, nn.functional
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    trm, trv = rm.clone(), rv.clone()
    torch.testing.assert_close(F.batch_norm(x, rm, rv, w, b, True, 0.3), tF.batch_norm(x, trm, trv, w, b, True, 0.3))
    torch.testing.assert_close((rm, rv), (trm, trv))
    torch.testing.assert_close(F.batch_norm(x, rm, rv, w, b), tF.batch_norm(x, trm, trv, w, b))
    torch.testing.assert_close(F.instance_norm(x, rm, rv, w, b, momentum=0.2),
                               tF.instance_norm(x, trm, trv, w, b, momentum=0.2))
    torch.testing.assert_close((rm, rv), (trm, trv))
    torch.testing.assert_close(F.group_norm(x, 3, w, b), tF.group_norm(x, 3, w, b))
    lw = torch.rand(5, 7, dtype=torch.float64)
    torch.testing.assert_close(F.layer_norm(x, (5, 7), lw, lw), tF.layer_norm(x, (5, 7), lw, lw))
    torch.testing.assert_close(F.rms_norm(x, (5, 7), lw), tF.rms_norm(x, (5, 7), lw))
    torch.testing.assert_close(F.rms_norm(x, [7], eps=0.1), tF.rms_norm(x, [7], eps=0.1))


_IN_PLACE_LAYERS = [lambda: normkit.BatchNorm2d(4), lambda: normkit.BatchNorm2d(4).eval(),
                    lambda: normkit.BatchNormAct2d(4), lambda: normkit.GroupNorm(2, 4),
                    lambda: normkit.InstanceNorm2d(4), lambda: normkit.LayerNorm(3), lambda: normkit.RMSNorm(3),
                    lambda: normkit.LayerNorm2d(4)]


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("make", _IN_PLACE_LAYERS)
def test_an_in_place_op_after_any_layer_works_with_grad(make, channels_last, backend):
    """Every layer's output is a tensor of its own, as torch.nn's are: autograd refuses an in-place op on
    a view returned by an autograd Function, and the reference backend (the path without the C++
    extension) computes some outputs as views of reshaped rows."""
    layer = make()
    x = torch.randn(2, 4, 3, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with normkit.backend(backend):
        y = layer(x)
        y.relu_()
        y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rms_norm_default_eps_is_torchs(dtype, backend):
    """eps=None: torch's rms_norm uses the epsilon of its accumulation type (float32's for half input), not
    the input dtype's that its documentation names; on rows of tiny values the two differ by 250x."""
    x = torch.full((3, 8), 1e-4, dtype=dtype)
    with normkit.backend(backend):
        got = normkit.RMSNorm(8, dtype=dtype)(x)
    torch.testing.assert_close(got, torch.nn.RMSNorm(8, dtype=dtype)(x), rtol=0, atol=0)
