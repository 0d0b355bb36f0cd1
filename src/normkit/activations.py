"""The activations normkit fuses into its kernels: one table, read by every layer of the code.

``y = act(z)`` with ``z = γ·x̂ + β (+ residual)`` the pre-activation; the backward recomputes
``z`` and forms ``dz = dy·act'(z)``. The fused activations (``kind`` is the kernels' number):

    name          kind  act(z)                              act'(z)                          torch.nn module
    ""            0     z                                   1                                nn.Identity
    "relu"        1     max(z, 0)                           [not z <= 0] (NaN: 1)            nn.ReLU
    "silu"        2     z·σ(z),  σ(z) = 1/(1 + e^{−z})      σ(z)·(1 + z·(1 − σ(z)))          nn.SiLU
    "gelu"        3     z·Φ(z),  Φ(z) = ½(1 + erf(z/√2))    Φ(z) + z·φ(z)                    nn.GELU()
    "gelu_tanh"   4     ½z·(1 + t),  t = tanh(β(z + κz³))   ½(1 + t) + ½z(1 − t²)β(1 + 3κz²) nn.GELU("tanh")
    "hardswish"   5     z·min(max(z + 3, 0), 6)/6           0 | z/3 + ½ | 1 (<−3 | ≤3 | >3)  nn.Hardswish
    "leaky_relu"  6     z if z > 0 else slope·z             1 if z > 0 else slope            nn.LeakyReLU(slope)
    "relu6"       7     min(max(z, 0), 6)                   [0 < z < 6]                      nn.ReLU6, Hardtanh(0, 6)
    "hardsigmoid" 8     min(max(z + 3, 0), 6)/6             [−3 < z < 3]/6                   nn.Hardsigmoid
    "mish"        9     z·tanh(softplus(z))                 t + z·σ(z)·(1 − t²)              nn.Mish
    "elu"         10    z if z > 0 else alpha·(e^z − 1)     1 if z > 0 else alpha·e^z        nn.ELU(alpha)
    "tanh"        11    tanh(z)                             1 − tanh²(z)                     nn.Tanh
    "sigmoid"     12    σ(z)                                σ(z)(1 − σ(z))                   nn.Sigmoid

(β = √(2/π), κ = 0.044715; GELU is Hendrycks & Gimpel, 2016, SiLU Elfwing et al., 2018, Hardswish Howard et al.,
2019, Mish Misra, 2019, ELU Clevert et al., 2016.) At a NaN the gradients are those of aten's vector kernels
(torch's value on all but a tensor's last few elements): relu6 and hardsigmoid 0, hardswish NaN.

**The act string.** An activation is named by a string everywhere above the kernels: the name, and for the two
kinds with a parameter the parameter after a colon — ``"leaky_relu:0.2"``, ``"elu:0.5"``. :func:`check`
normalises a string: the bare name stands for the default parameter (``"leaky_relu"`` is
``nn.LeakyReLU()``'s slope 0.01, ``"elu"`` alpha 1.0), so ``check("leaky_relu:0.01") == "leaky_relu"`` and
``check("leaky_relu:2e-1") == "leaky_relu:0.2"``.

**The kernel code** (:func:`code`) is one int64: the kind in bits 0..7, and for leaky ReLU and ELU the parameter
as the exact decimal ``m·10^−k`` (``k`` in bits 8..11, the signed ``m`` in bits 12..63, ``|m| < 2^51``), which
the kernels decode as ``m / 10^k`` — the very double of the Python float, so a fused leaky ReLU has torch's slope
to the last bit in float64 too. A parameter needing more than 15 decimals, or 16 significant digits (``1/3``),
has no code: :func:`check` refuses it and :func:`from_module` leaves such a module unfused.

Each entry holds what the rest of normkit needs to know about an activation:

* ``code`` — the integer the kernels take (``csrc/act_code.h``; the Triton kernels decode it in
  ``kernels/triton/_common.py``). The kernels import nothing of normkit, so their own formulas carry these
  numbers; ``tests/test_activations.py`` checks that they agree.
* ``torch_fn`` — torch's own function, the one the module calls: the aten path, the reference backend's forward
  and the tests compute ``act(z)`` with it.
* ``derivative`` — ``act'(z)`` elementwise, the reference backend's backward.
* ``modules`` / ``module_kwargs`` — the ``torch.nn`` module types it reproduces exactly, and the constructor
  arguments such a module must have (``nn.GELU`` only with ``approximate='none'``, ``nn.LeakyReLU`` with this
  slope): ``normkit.convert(fuse=True)``, SyncBatchNormAct and BN folding map modules to names and back.
* ``fuse_pays`` — per norm family (``"bn"``, ``"gn"``), whether the fused layer measured at least as fast as
  torch's norm → activation pair on CPU (``scripts/bench_fused_acts.py``; see ``FUSE_PAYS`` below):
  ``convert(fuse=True)`` fuses only where it pays.

Adding an activation: an entry in ``_KINDS``, its kind in ``csrc/act_code.h`` (and the math in ``csrc/act.h``,
``eager.h``'s ``activate``), the Triton ``activation`` / ``activation_grad`` branches, and a branch in
``nn/scripting.py``'s TorchScript ``_act``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ._checks import fail

__all__ = ["Activation", "REGISTRY", "FUSE_PAYS", "names", "get", "code", "codes", "check", "from_module",
           "to_module", "fuse_pays", "split"]


@dataclass(frozen=True)
class Activation:
    """One fused activation, its parameter (if any) bound (see the module docstring for the fields)."""

    name: str
    code: int
    torch_fn: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]
    modules: tuple[type[nn.Module], ...]
    doc: str
    module_kwargs: Mapping[str, object] = field(default_factory=dict)
    kind: str = ""
    param: float | None = None
    fuse_pays: Mapping[str, bool] = field(default_factory=dict)

    def reproduces(self, module: nn.Module) -> bool:
        """Whether ``module`` computes exactly this activation (its exact type, not a subclass,
        which may override ``forward``; and the constructor arguments of ``module_kwargs``)."""
        return type(module) in self.modules and all(
            getattr(module, k, None) == v for k, v in self.module_kwargs.items()
        )


# ----------------------------------------------------------------------------- the formulas
def _identity(z: Tensor, p=None) -> Tensor:
    return z


def _identity_grad(z: Tensor, p=None) -> Tensor:
    return torch.ones_like(z)


def _relu_grad(z: Tensor, p=None) -> Tensor:
    # 1 unless z <= 0: torch's ReLU backward (threshold_backward on the output) passes a NaN's gradient on
    return (~(z <= 0)).to(z.dtype)


def _silu_grad(z: Tensor, p=None) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _gelu(z: Tensor, p=None) -> Tensor:
    return TF.gelu(z)  # approximate='none': the erf form


def _gelu_grad(z: Tensor, p=None) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5  # √(2/π), as aten forms it
_KAPPA = 0.044715
_ONE_SIXTH_F32 = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))


def _gelu_tanh(z: Tensor, p=None) -> Tensor:
    return TF.gelu(z, approximate="tanh")


def _gelu_tanh_grad(z: Tensor, p=None) -> Tensor:
    t = torch.tanh(_BETA * (z + _KAPPA * z * z * z))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * (_BETA * (1.0 + 3.0 * _KAPPA * z * z))


def _hardswish_grad(z: Tensor, p=None) -> Tensor:
    # aten's vector form: a NaN stays NaN (z/3 + ½), 1 from z >= 3 on, 0 below −3
    mid = torch.where(z >= 3.0, torch.ones_like(z), z / 3.0 + 0.5)
    return torch.where(z < -3.0, torch.zeros_like(z), mid)


def _leaky_relu(z: Tensor, p) -> Tensor:
    return TF.leaky_relu(z, p)


def _leaky_relu_grad(z: Tensor, p) -> Tensor:
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, p))


def _relu6(z: Tensor, p=None) -> Tensor:
    return TF.hardtanh(z, 0.0, 6.0)  # nn.ReLU6's forward


def _relu6_grad(z: Tensor, p=None) -> Tensor:
    return ((z > 0) & (z < 6)).to(z.dtype)


def _hardsigmoid_grad(z: Tensor, p=None) -> Tensor:
    # aten multiplies by the float32 1/6 (in float64 too)
    return ((z > -3) & (z < 3)).to(z.dtype) * _ONE_SIXTH_F32


def _mish_grad(z: Tensor, p=None) -> Tensor:
    t = torch.tanh(TF.softplus(z))
    return t + z * torch.sigmoid(z) * (1.0 - t * t)


def _elu(z: Tensor, p) -> Tensor:
    return TF.elu(z, p)


def _elu_grad(z: Tensor, p) -> Tensor:
    return torch.where(z > 0, torch.ones_like(z), p * torch.exp(z))


def _tanh_grad(z: Tensor, p=None) -> Tensor:
    t = torch.tanh(z)
    return 1.0 - t * t


def _sigmoid_grad(z: Tensor, p=None) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 - s)


def _unary(fn):
    return lambda z, p=None: fn(z)


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class _Kind:
    name: str
    kind: int
    fn: Callable
    grad: Callable
    modules: tuple[type[nn.Module], ...]
    doc: str
    module_kwargs: Mapping[str, object] = field(default_factory=dict)
    param_attr: str | None = None  # the module's attribute holding the parameter
    default: float | None = None

    def make(self, p: float | None) -> nn.Module:
        """A new module computing this activation (with parameter ``p``)."""
        if self.param_attr is not None:
            return self.modules[0](p)
        if self.name == "relu6":
            return nn.ReLU6()
        return self.modules[0](**self.module_kwargs)


_KINDS = (
    _Kind("", 0, _identity, _identity_grad, (nn.Identity,), "identity: z"),
    _Kind("relu", 1, _unary(torch.relu), _relu_grad, (nn.ReLU,), "ReLU: max(z, 0)"),
    _Kind("silu", 2, _unary(TF.silu), _silu_grad, (nn.SiLU,), "SiLU: z·σ(z)"),
    _Kind("gelu", 3, _gelu, _gelu_grad, (nn.GELU,), "GELU, exact: z·Φ(z) = ½z(1 + erf(z/√2))",
          {"approximate": "none"}),
    _Kind("gelu_tanh", 4, _gelu_tanh, _gelu_tanh_grad, (nn.GELU,),
          "GELU, tanh form: ½z(1 + tanh(√(2/π)(z + 0.044715z³)))", {"approximate": "tanh"}),
    _Kind("hardswish", 5, _unary(TF.hardswish), _hardswish_grad, (nn.Hardswish,), "Hardswish: z·relu6(z + 3)/6"),
    _Kind("leaky_relu", 6, _leaky_relu, _leaky_relu_grad, (nn.LeakyReLU,), "leaky ReLU: z if z > 0 else slope·z",
          param_attr="negative_slope", default=0.01),
    _Kind("relu6", 7, _relu6, _relu6_grad, (nn.ReLU6, nn.Hardtanh), "ReLU6: min(max(z, 0), 6)",
          {"min_val": 0.0, "max_val": 6.0}),
    _Kind("hardsigmoid", 8, _unary(TF.hardsigmoid), _hardsigmoid_grad, (nn.Hardsigmoid,),
          "Hardsigmoid: relu6(z + 3)/6"),
    _Kind("mish", 9, _unary(TF.mish), _mish_grad, (nn.Mish,), "Mish: z·tanh(softplus(z))"),
    _Kind("elu", 10, _elu, _elu_grad, (nn.ELU,), "ELU: z if z > 0 else alpha·(e^z − 1)", param_attr="alpha",
          default=1.0),
    _Kind("tanh", 11, _unary(torch.tanh), _tanh_grad, (nn.Tanh,), "tanh(z)"),
    _Kind("sigmoid", 12, _unary(torch.sigmoid), _sigmoid_grad, (nn.Sigmoid,), "sigmoid: 1/(1 + e^{−z})"),
)
_BY_NAME = {k.name: k for k in _KINDS}

#: Whether fusing pays, per activation and norm family: the fused layer (forward + backward in training, and
#: the eval forward) measured at least as fast as torch's norm module → activation module on CPU, at every shape
#: of ``scripts/bench_fused_acts.py`` (EfficientNet-like BatchNorm shapes (8, 32, 48, 48) … (8, 1280, 3, 3);
#: GroupNorm(32) on (4, 128, 32, 32), (4, 320, 16, 16)), both layouts, within the 0.98 noise band: 482 cases,
#: geometric mean 1.49x, lowest sigmoid after GroupNorm, channels_last, eval, (4, 128, 32, 32) at 0.95–0.98x
#: (its training step there 1.88x; docs/benchmarks.md, "Fused activations"). ``convert(fuse=True)`` reads it; a
#: fused layer built by hand runs fused whatever it says.
FUSE_PAYS: Mapping[str, Mapping[str, bool]] = MappingProxyType({
    name: MappingProxyType({"bn": True, "gn": True}) for name in _BY_NAME
})

_MAX_M = 1 << 51


def _param_code(p: float) -> int | None:
    """(m << 12) | (k << 8) for p = m·10^−k exactly (the shortest decimal that gives p back), or None."""
    if not math.isfinite(p):
        return None
    d = Decimal(repr(float(p)))
    sign, digits, exp = d.as_tuple()
    m = int("".join(map(str, digits))) if digits else 0
    if exp > 0:
        m, exp = m * 10**exp, 0
    k = -exp
    if k > 15 or m >= _MAX_M:
        return None
    m = -m if sign else m
    if m / 10**k != p:  # (cannot happen: both exact, the division correctly rounded — kept as the guard)
        return None
    return (m << 12) | (k << 8)


def _canonical(kind: _Kind, p: float | None) -> str:
    if kind.param_attr is None or p == kind.default:
        return kind.name
    return f"{kind.name}:{float(p)!r}"


def _parse(name: object) -> tuple[_Kind, float | None] | None:
    """(kind, parameter) of an act string, or None if it names no fused activation."""
    if not isinstance(name, str):
        return None
    base, colon, rest = name.partition(":")
    kind = _BY_NAME.get(base)
    if kind is None:
        return None
    if kind.param_attr is None:
        return None if colon else (kind, None)
    if not colon:
        return kind, kind.default
    try:
        p = float(rest)
    except ValueError:
        return None
    if rest.strip() != rest or _param_code(p) is None:
        return None
    return kind, p


def _bind(kind: _Kind, p: float | None) -> Activation:
    code_ = kind.kind
    if kind.param_attr is not None:
        code_ |= _param_code(p)
        fn, grad = kind.fn, kind.grad
        torch_fn, derivative = (lambda z: fn(z, p)), (lambda z: grad(z, p))
        kwargs = MappingProxyType({**kind.module_kwargs, kind.param_attr: p})
    else:
        fn, grad = kind.fn, kind.grad
        torch_fn, derivative = (lambda z: fn(z)), (lambda z: grad(z))
        kwargs = MappingProxyType(dict(kind.module_kwargs))
    return Activation(_canonical(kind, p), code_, torch_fn, derivative, kind.modules, kind.doc, kwargs, kind.name,
                      p, FUSE_PAYS[kind.name])


class _Registry(Mapping):
    """name → :class:`Activation`: iterates over the base names in kind order ("" first); looks up any act string
    (``"leaky_relu:0.2"`` gives that slope's entry). Entries are made once per spelling and kept."""

    def __init__(self) -> None:
        self._entries: dict[str, Activation] = {}
        for k in _KINDS:
            self._entries[k.name] = _bind(k, k.default)

    def __getitem__(self, name: str) -> Activation:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            parsed = _parse(name)
            if parsed is None:
                raise KeyError(name) from None
            entry = _bind(*parsed)
            self._entries[name] = entry
            return entry

    def __iter__(self) -> Iterator[str]:
        return iter(k.name for k in _KINDS)

    def __len__(self) -> int:
        return len(_KINDS)

    def __contains__(self, name: object) -> bool:
        return _parse(name) is not None


#: name → :class:`Activation`, in kind order ("" first); any act string looks up its entry.
REGISTRY: Mapping[str, Activation] = _Registry()


class _Names(tuple):
    """The base names in kind order; ``act in names()`` holds for every act string (a parameter included)."""

    def __contains__(self, name: object) -> bool:
        return _parse(name) is not None


_NAMES = _Names(k.name for k in _KINDS)


class _Codes(dict):
    """name → code; ``codes()[s]`` resolves any act string and keeps it, so the hot paths' ``.get`` (a plain dict
    read) finds every string :func:`check` has seen."""

    def __missing__(self, name: str) -> int:
        if _parse(name) is None:
            raise KeyError(name)
        c = self[name] = REGISTRY[name].code
        return c


_CODE_TABLE = _Codes({k.name: REGISTRY[k.name].code for k in _KINDS})
_CODES = MappingProxyType(_CODE_TABLE)


def names() -> tuple[str, ...]:
    """``("", "relu", "silu", "gelu", ...)``: every base name, identity ``""`` included, in kind order.
    Membership (``act in names()``) accepts every act string, ``"leaky_relu:0.2"`` included."""
    return _NAMES


def split(name: str) -> tuple[str, float | None]:
    """``(base name, parameter)`` of an act string (``ValueError`` if it names no fused activation):
    ``split("leaky_relu:0.2") == ("leaky_relu", 0.2)``, ``split("leaky_relu") == ("leaky_relu", 0.01)``."""
    parsed = _parse(name)
    if parsed is None:
        raise ValueError(_unknown(name))
    return parsed[0].name, parsed[1]


def _unknown(name: object) -> str:
    return f"act must be one of {tuple(_NAMES)} (leaky_relu and elu with ':<parameter>'), got {name!r}"


def get(name: str) -> Activation:
    """The entry of ``name``; ``ValueError`` for an unknown name (callers check user input first)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(_unknown(name)) from None


def code(name: str) -> int:
    """The kernels' int64 code for ``name`` (``ValueError`` if unknown)."""
    return get(name).code


def codes() -> Mapping[str, int]:
    """name → kernel code, a read-only mapping (for hot paths that look codes up per call). ``.get`` finds the base
    names and every act string seen before (through :func:`check` or a ``[]`` lookup); ``[]`` resolves any."""
    return _CODES


def check(where: str, act: str | None) -> str:
    """``act`` as the kernels' normalised name (``None`` → ``""``; see the module docstring), or
    :class:`normkit.NormInputError` naming ``where`` and the argument ``act``."""
    name = act or ""
    parsed = _parse(name)
    if parsed is None:
        listed = ", ".join(repr(n) for n in _NAMES if n)
        raise fail(where, "act", f"one of {listed} (leaky_relu and elu may add ':<parameter>') or None",
                   repr(act))
    canonical = _canonical(*parsed)
    if canonical not in _CODE_TABLE:
        _CODE_TABLE[canonical] = REGISTRY[canonical].code
    return canonical


def from_module(module: nn.Module) -> str | None:
    """The name of the activation ``module`` computes exactly (``nn.Identity`` → ``""``,
    ``nn.LeakyReLU(0.2)`` → ``"leaky_relu:0.2"``), or None when no fused activation reproduces it (``nn.PReLU``,
    ``nn.CELU``, a subclass, a parameter without an exact code)."""
    for kind in _KINDS:
        if type(module) not in kind.modules:
            continue
        if not all(getattr(module, k, None) == v for k, v in kind.module_kwargs.items()):
            continue
        if kind.param_attr is None:
            return kind.name
        p = getattr(module, kind.param_attr, None)
        if isinstance(p, (int, float)) and not isinstance(p, bool) and _param_code(float(p)) is not None:
            return check("from_module", _canonical(kind, float(p)))
    return None


def to_module(name: str) -> nn.Module:
    """A new ``torch.nn`` module computing the activation ``name`` (``ValueError`` if unknown)."""
    parsed = _parse(name)
    if parsed is None:
        raise ValueError(_unknown(name))
    return parsed[0].make(parsed[1])


def fuse_pays(family: str, act: str) -> bool:
    """Whether fusing ``act`` into a norm of ``family`` (``"bn"``, ``"gn"``) measured at least as fast as the
    unfused pair (:data:`FUSE_PAYS`); identity and unknown families: True."""
    if not act:
        return True
    return FUSE_PAYS[split(act)[0]].get(family, True)
