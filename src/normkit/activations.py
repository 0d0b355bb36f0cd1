"""The activations normkit fuses into its kernels: one table, read by every layer of the code.

``y = act(z)`` with ``z = γ·x̂ + β (+ residual)`` the pre-activation; the backward recomputes
``z`` and forms ``dz = dy·act'(z)``. The fused activations:

    name    code  act(z)                                   act'(z)
    ""      0     z                                        1
    "relu"  1     max(z, 0)                                [not z <= 0] (NaN: 1, as torch)
    "silu"  2     z·σ(z),  σ(z) = 1/(1 + e^{−z})           σ(z)·(1 + z·(1 − σ(z)))
    "gelu"  3     z·Φ(z),  Φ(z) = ½(1 + erf(z/√2))         Φ(z) + z·φ(z),  φ(z) = e^{−z²/2}/√(2π)

GELU is the exact erf form (Hendrycks & Gimpel, 2016), torch's ``approximate='none'``; SiLU is
Elfwing et al., 2018 (a.k.a. Swish).

Each entry holds what the rest of normkit needs to know about an activation:

* ``code`` — the integer the kernels take (``csrc/common.h``: kIdentity=0, kRelu=1, kSilu=2,
  kGelu=3; the ``ACT`` constexpr of the Triton kernels). The kernels import nothing of normkit, so
  their own formulas carry these numbers; ``tests/test_activations.py`` checks that they agree.
* ``torch_fn`` — torch's own function: the aten path, the reference backend's forward and the
  tests compute ``act(z)`` with it.
* ``derivative`` — ``act'(z)`` elementwise, the reference backend's backward.
* ``modules`` / ``module_kwargs`` — the ``torch.nn`` module types it reproduces exactly, and the
  constructor arguments such a module must have (``nn.GELU`` only with ``approximate='none'``):
  ``normkit.convert(fuse=True)``, SyncBatchNormAct and BN folding map modules to names and back.

Adding an activation: an entry here, its code in the C++ enum and the Triton ``activation`` /
``activation_grad`` branches, and a branch in ``nn/scripting.py``'s TorchScript ``_act``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ._checks import fail

__all__ = ["Activation", "REGISTRY", "names", "get", "code", "codes", "check", "from_module", "to_module"]


@dataclass(frozen=True)
class Activation:
    """One fused activation (see the module docstring for the fields)."""

    name: str
    code: int
    torch_fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    modules: tuple[type[nn.Module], ...]
    doc: str
    module_kwargs: Mapping[str, object] = field(default_factory=dict)

    def reproduces(self, module: nn.Module) -> bool:
        """Whether ``module`` computes exactly this activation (its exact type, not a subclass,
        which may override ``forward``; and the constructor arguments of ``module_kwargs``)."""
        return type(module) in self.modules and all(
            getattr(module, k, None) == v for k, v in self.module_kwargs.items()
        )


def _identity(z: Tensor) -> Tensor:
    return z


def _identity_grad(z: Tensor) -> Tensor:
    return torch.ones_like(z)


def _relu_grad(z: Tensor) -> Tensor:
    # 1 unless z <= 0: torch's ReLU backward (threshold_backward on the output) passes a NaN's gradient on
    return (~(z <= 0)).to(z.dtype)


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _gelu(z: Tensor) -> Tensor:
    return TF.gelu(z)  # approximate='none': the erf form


def _gelu_grad(z: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


_ENTRIES = (
    Activation("", 0, _identity, _identity_grad, (nn.Identity,), "identity: z"),
    Activation("relu", 1, torch.relu, _relu_grad, (nn.ReLU,), "ReLU: max(z, 0)"),
    Activation("silu", 2, TF.silu, _silu_grad, (nn.SiLU,), "SiLU: z·σ(z)"),
    Activation("gelu", 3, _gelu, _gelu_grad, (nn.GELU,), "GELU, exact: z·Φ(z) = ½z(1 + erf(z/√2))",
               MappingProxyType({"approximate": "none"})),
)

#: name → :class:`Activation`, in code order ("" first).
REGISTRY: Mapping[str, Activation] = MappingProxyType({a.name: a for a in _ENTRIES})
_NAMES = tuple(REGISTRY)
_CODES = MappingProxyType({a.name: a.code for a in _ENTRIES})


def names() -> tuple[str, ...]:
    """``("", "relu", "silu", "gelu")``: every name, identity ``""`` included, in code order."""
    return _NAMES


def get(name: str) -> Activation:
    """The entry of ``name``; ``ValueError`` for an unknown name (callers check user input first)."""
    act = REGISTRY.get(name) if isinstance(name, str) else None
    if act is None:
        raise ValueError(f"act must be one of {_NAMES}, got {name!r}")
    return act


def code(name: str) -> int:
    """The kernels' integer for ``name`` (``ValueError`` if unknown)."""
    return get(name).code


def codes() -> Mapping[str, int]:
    """name → kernel code, a read-only mapping (for hot paths that look codes up per call)."""
    return _CODES


def check(where: str, act: str | None) -> str:
    """``act`` as the kernels' name (``None`` → ``""``), or :class:`normkit.NormInputError`
    naming ``where`` and the argument ``act``."""
    name = act or ""
    if not isinstance(name, str) or name not in REGISTRY:
        listed = ", ".join(repr(n) for n in _NAMES if n)
        raise fail(where, "act", f"one of {listed} or None", repr(act))
    return name


def from_module(module: nn.Module) -> str | None:
    """The name of the activation ``module`` computes exactly (``nn.Identity`` → ``""``), or None
    when no fused activation reproduces it (``nn.Tanh``, ``nn.GELU(approximate='tanh')``, a
    subclass)."""
    for act in _ENTRIES:
        if act.reproduces(module):
            return act.name
    return None


def to_module(name: str) -> nn.Module:
    """A new ``torch.nn`` module computing the activation ``name`` (``ValueError`` if unknown)."""
    act = get(name)
    return act.modules[0](**act.module_kwargs)
