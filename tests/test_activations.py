"""The activation registry (normkit.activations) and every place that must agree with it: the
TorchScript twin's if-chain, the C++ kernels' codes, the torch.nn modules, the error messages."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest
import torch
from torch import nn

import normkit
from normkit import activations as A
from normkit.nn import scripting

NAMES = A.names()


def _z(dtype=torch.float64):
    """Both signs, zero, and the tails (|z| up to 8), odd length."""
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.linspace(-8, 8, 1023, dtype=torch.float64), 0.5 + 2 * torch.randn(33, generator=g,
                                                                                         dtype=torch.float64)])
    return z.to(dtype)


def test_names_and_codes_are_the_kernels():
    # csrc/common.h: kIdentity=0, kRelu=1, kSilu=2, kGelu=3; the Triton ACT constexpr alike
    assert NAMES == ("", "relu", "silu", "gelu")
    assert dict(A.codes()) == {"": 0, "relu": 1, "silu": 2, "gelu": 3}
    assert [A.code(n) for n in NAMES] == [A.REGISTRY[n].code for n in NAMES]
    assert normkit.reference.ACTIVATIONS == NAMES  # kept importable for older callers


def test_unknown_name_is_a_value_error():
    for bad in ("tanh", "RELU", None, 1):
        with pytest.raises(ValueError, match=r"act must be one of \('', 'relu', 'silu', 'gelu'\)"):
            A.code(bad)


@pytest.mark.parametrize("name", NAMES)
def test_torch_fn_is_the_module(name):
    z = _z(torch.float32)
    torch.testing.assert_close(A.REGISTRY[name].torch_fn(z), A.to_module(name)(z), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_derivative_is_autograd_of_torch_fn(name):
    z = _z().requires_grad_(True)
    (want,) = torch.autograd.grad(A.REGISTRY[name].torch_fn(z).sum(), z)
    torch.testing.assert_close(A.REGISTRY[name].derivative(z.detach()), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_reference_backend_uses_the_registry(name):
    z = _z()
    torch.testing.assert_close(normkit.reference.activation(z, name), A.REGISTRY[name].torch_fn(z), rtol=0, atol=0)
    torch.testing.assert_close(normkit.reference.activation_grad(z, name), A.REGISTRY[name].derivative(z),
                               rtol=0, atol=0)


def test_from_module_only_exact_reproductions():
    class MyReLU(nn.ReLU):  # a subclass may override forward: never fused
        pass

    assert A.from_module(nn.Identity()) == ""
    assert A.from_module(nn.ReLU()) == "relu"
    assert A.from_module(nn.ReLU(inplace=True)) == "relu"
    assert A.from_module(nn.SiLU()) == "silu"
    assert A.from_module(nn.GELU()) == "gelu"
    assert A.from_module(nn.GELU(approximate="tanh")) is None
    assert A.from_module(nn.Tanh()) is None
    assert A.from_module(MyReLU()) is None
    for name in NAMES:
        assert A.from_module(A.to_module(name)) == name


def test_check_names_and_errors():
    assert A.check("X", None) == ""
    assert [A.check("X", n) for n in NAMES] == list(NAMES)
    for bad in ("tanh", 1, "Relu"):
        with pytest.raises(normkit.NormInputError) as info:
            A.check("BatchNormAct2d", bad)
        assert str(info.value) == f"BatchNormAct2d: act: expected one of 'relu', 'silu', 'gelu' or None, got {bad!r}"


def _scripting_branches() -> set[str]:
    """The names ``nn/scripting.py``'s TorchScript ``_act`` compares ``act`` against."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(scripting._act)))
    return {node.comparators[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "act"}


def test_torchscript_twin_covers_exactly_the_registry():
    # TorchScript cannot call through the registry's dict of callables: its if-chain is a copy
    assert _scripting_branches() | {""} == set(NAMES)
    scripted = torch.jit.script(scripting._act)
    z = _z(torch.float32)
    for name in NAMES:
        torch.testing.assert_close(scripted(z, name), A.REGISTRY[name].torch_fn(z), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_cpu_kernel_codes(name):
    """The C++ kernels, given the registry's code, compute the registry's act and act'."""
    try:
        importlib.import_module("normkit._C")
    except ImportError:
        pytest.skip("the C++ extension (normkit._C) is not built")
    from normkit.cpu_backend import CpuBackend

    cpu = CpuBackend()
    x = _z().reshape(1, 1, -1)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    fn, grad = A.REGISTRY[name].torch_fn, A.REGISTRY[name].derivative
    torch.testing.assert_close(cpu.channel_apply(x, one, zero, None, name), fn(x), rtol=1e-12, atol=1e-12)
    dy = torch.linspace(-1, 2, x.numel(), dtype=torch.float64).reshape(x.shape)
    # mean_dz = mean_dz·x̂ = 0 and scale 1: dx = dz = dy·act'(x)
    _, dz = cpu.channel_backward_dx(x, dy, zero, one, one, zero, None, name, zero, zero, True)
    torch.testing.assert_close(dz, dy * grad(x), rtol=1e-12, atol=1e-12)
