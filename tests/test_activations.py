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


# every base name, and the parameterised kinds with a parameter of their own (negative, small, large)
SPELLED = (*NAMES, "leaky_relu:0.2", "leaky_relu:-0.3", "elu:0.5", "elu:2.5")


def test_names_and_codes_are_the_kernels():
    # csrc/act_code.h: kIdentity=0 … kSigmoid=12; the Triton ACT constexpr alike
    assert NAMES == ("", "relu", "silu", "gelu", "gelu_tanh", "hardswish", "leaky_relu", "relu6", "hardsigmoid",
                     "mish", "elu", "tanh", "sigmoid")
    base = {n: c for n, c in A.codes().items() if n in set(NAMES)}
    assert base == {"": 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4, "hardswish": 5,
                    "leaky_relu": 6 | (2 << 8) | (1 << 12),  # 0.01 = 1·10^−2
                    "relu6": 7, "hardsigmoid": 8, "mish": 9, "elu": 10 | (1 << 8) | (10 << 12),  # 1.0 = 10·10^−1
                    "tanh": 11, "sigmoid": 12}
    assert [A.code(n) for n in NAMES] == [A.REGISTRY[n].code for n in NAMES]
    assert normkit.reference.ACTIVATIONS == NAMES  # kept importable for older callers


@pytest.mark.parametrize("name, kind, param", [
    ("leaky_relu:0.2", 6, 0.2), ("leaky_relu:-0.3", 6, -0.3), ("leaky_relu:1e-05", 6, 1e-5), ("elu:0.5", 10, 0.5),
    ("elu:123456.5", 10, 123456.5), ("leaky_relu:0.3333333333", 6, 0.3333333333), ("leaky_relu:0.0", 6, 0.0),
])
def test_parameter_codes_are_exact_decimals(name, kind, param):
    """The code's parameter m·10^−k decodes (as the kernels do, m / 10^k) to the very double of the parameter."""
    code = A.code(name)
    assert code & 0xFF == kind
    m, k = code >> 12, (code >> 8) & 0xF
    assert m / 10**k == param
    assert A.split(name) == (A.split(name)[0], param)


def test_act_strings_are_normalised():
    assert A.check("X", "leaky_relu") == "leaky_relu"
    assert A.check("X", "leaky_relu:0.01") == "leaky_relu"  # the default slope: the bare name
    assert A.check("X", "leaky_relu:2e-1") == "leaky_relu:0.2"
    assert A.check("X", "elu:1") == "elu"
    assert A.check("X", "elu:0.50") == "elu:0.5"
    assert A.code("leaky_relu:2e-1") == A.code("leaky_relu:0.2")
    assert A.split("leaky_relu") == ("leaky_relu", 0.01) and A.split("gelu") == ("gelu", None)
    assert "leaky_relu:0.2" in A.names() and "leaky_relu:x" not in A.names() and "relu:1" not in A.names()
    # a parameter without an exact code (16 significant digits, or below 1e-15) is refused
    for bad in ("leaky_relu:0.3333333333333333", "leaky_relu:1e-20", "elu:nan", "elu:inf", "leaky_relu: 0.2",
                "leaky_relu:", "gelu:0.5"):
        with pytest.raises(normkit.NormInputError):
            A.check("X", bad)
        with pytest.raises(ValueError):
            A.code(bad)


def test_codes_mapping_resolves_act_strings():
    codes = A.codes()
    assert codes.get("leaky_relu:0.7") is None  # never seen: the hot paths' .get misses (then check() runs)
    assert codes["leaky_relu:0.7"] == A.code("leaky_relu:0.7")  # [] resolves any act string
    assert codes.get("leaky_relu:0.7") == A.code("leaky_relu:0.7")  # and keeps it
    A.check("X", "elu:0.75")
    assert codes.get("elu:0.75") == A.code("elu:0.75")
    with pytest.raises(KeyError):
        codes["softplus"]


def test_unknown_name_is_a_value_error():
    for bad in ("prelu", "RELU", None, 1, "relu:0.2"):
        with pytest.raises(ValueError, match=r"act must be one of \('', 'relu', 'silu', 'gelu', 'gelu_tanh'"):
            A.code(bad)


@pytest.mark.parametrize("name", SPELLED)
def test_torch_fn_is_the_module(name):
    z = _z(torch.float32)
    torch.testing.assert_close(A.REGISTRY[name].torch_fn(z), A.to_module(name)(z), rtol=0, atol=0)


@pytest.mark.parametrize("name", SPELLED)
def test_derivative_is_autograd_of_torch_fn(name):
    z = _z().requires_grad_(True)
    (want,) = torch.autograd.grad(A.REGISTRY[name].torch_fn(z).sum(), z)
    torch.testing.assert_close(A.REGISTRY[name].derivative(z.detach()), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SPELLED)
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
    assert A.from_module(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert A.from_module(nn.Hardswish()) == "hardswish"
    assert A.from_module(nn.LeakyReLU()) == "leaky_relu"
    assert A.from_module(nn.LeakyReLU(0.2, inplace=True)) == "leaky_relu:0.2"
    assert A.from_module(nn.LeakyReLU(1 / 3)) is None  # 16 significant digits: no exact code, left unfused
    assert A.from_module(nn.ReLU6()) == "relu6"
    assert A.from_module(nn.Hardtanh(0.0, 6.0)) == "relu6"
    assert A.from_module(nn.Hardtanh()) is None  # (−1, 1)
    assert A.from_module(nn.Hardsigmoid()) == "hardsigmoid"
    assert A.from_module(nn.Mish()) == "mish"
    assert A.from_module(nn.ELU()) == "elu"
    assert A.from_module(nn.ELU(alpha=0.5)) == "elu:0.5"
    assert A.from_module(nn.Tanh()) == "tanh"
    assert A.from_module(nn.Sigmoid()) == "sigmoid"
    for unfused in (nn.PReLU(), nn.CELU(), nn.SELU(), nn.Softplus(), nn.GLU(), MyReLU()):
        assert A.from_module(unfused) is None
    for name in SPELLED:
        assert A.from_module(A.to_module(name)) == A.check("X", name)


def _scripting_branches() -> set[str]:
    """The names ``nn/scripting.py``'s TorchScript ``_act`` compares the act string's name against."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(scripting._act)))
    return {node.comparators[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "name"}


def test_torchscript_twin_covers_exactly_the_registry():
    # TorchScript cannot call through the registry's dict of callables: its if-chain is a copy
    assert _scripting_branches() | {""} == set(NAMES)
    scripted = torch.jit.script(scripting._act)
    z = _z(torch.float32)
    for name in SPELLED:
        torch.testing.assert_close(scripted(z, name), A.REGISTRY[name].torch_fn(z), rtol=0, atol=0)


@pytest.mark.parametrize("name", SPELLED)
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
