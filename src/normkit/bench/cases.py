"""What ``normkit bench`` measures: the ops at their reference shapes, and how each contender runs them.

A :class:`Case` is one op at one shape, layout and dtype. For each of the four modes
(``fwd`` = training forward, ``bwd`` = its backward alone, ``fwd+bwd``, ``eval`` = inference
forward) it builds one *step* per contender (:mod:`.timing`): torch eager (``torch.nn``),
``torch.compile`` of the same module, normkit (the public layers, backend ``auto``: the C++
kernels on CPU, Triton on CUDA) and, on CUDA for LayerNorm/RMSNorm, Liger-Kernel when it is
installed. Every contender gets its own module with the same initial state and the same input.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import normkit

from .timing import Clock, Step

MODES = ("fwd", "bwd", "fwd+bwd", "eval")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class _AddRelu(nn.Module):
    """torch's unfused ``relu(bn(x) + residual)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x, residual):
        return torch.relu(self.bn(x) + residual)


class _PermuteLayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels as timm/ConvNeXt write it: permute → LayerNorm → permute."""

    def forward(self, x):
        y = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def _liger(kind: str, k: int):
    from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm  # optional, CUDA only

    return LigerLayerNorm(k) if kind == "ln" else LigerRMSNorm(k)


# op key -> (label, family, default shape, 4-D?, residual, torch factory, normkit factory)
OPS: dict[str, tuple] = {
    "bn2d": ("BatchNorm2d", "bn", (64, 64, 56, 56), False,
             lambda s: nn.BatchNorm2d(s[1]), lambda s: normkit.BatchNorm2d(s[1])),
    "bn1d": ("BatchNorm1d", "bn", (8192, 1024), False,
             lambda s: nn.BatchNorm1d(s[1]), lambda s: normkit.BatchNorm1d(s[1])),
    "gn": ("GroupNorm(32)", "row", (64, 64, 56, 56), False,
           lambda s: nn.GroupNorm(32, s[1]), lambda s: normkit.GroupNorm(32, s[1])),
    "in2d": ("InstanceNorm2d", "row", (64, 64, 56, 56), False,
             lambda s: nn.InstanceNorm2d(s[1], affine=True),
             lambda s: normkit.InstanceNorm2d(s[1], affine=True)),
    "ln": ("LayerNorm", "row", (8192, 1024), False,
           lambda s: nn.LayerNorm(s[-1]), lambda s: normkit.LayerNorm(s[-1])),
    "rms": ("RMSNorm", "row", (2048, 4096), False,
            lambda s: nn.RMSNorm(s[-1], eps=1e-6), lambda s: normkit.RMSNorm(s[-1], eps=1e-6)),
    "ln2d": ("LayerNorm2d", "row", (64, 96, 56, 56), False,
             lambda s: _PermuteLayerNorm2d(s[1], eps=1e-6), lambda s: normkit.LayerNorm2d(s[1])),
    "bn_relu": ("BN+ReLU", "bn", (64, 64, 56, 56), False,
                lambda s: nn.Sequential(nn.BatchNorm2d(s[1]), nn.ReLU()),
                lambda s: normkit.BatchNormAct2d(s[1], act="relu")),
    "bn_add_relu": ("BN+add+ReLU", "bn", (64, 64, 56, 56), True,
                    lambda s: _AddRelu(s[1]), lambda s: normkit.BatchNormAct2d(s[1], act="relu")),
}
QUICK_SHAPES = {"bn2d": (16, 64, 56, 56), "bn1d": (2048, 1024), "gn": (16, 64, 56, 56),
                "in2d": (16, 64, 56, 56), "ln": (2048, 1024), "rms": (512, 4096), "ln2d": (16, 96, 56, 56),
                "bn_relu": (16, 64, 56, 56), "bn_add_relu": (16, 64, 56, 56)}

# Every other fused activation (normkit.activations), after BatchNorm and after GroupNorm(32): torch's norm module →
# activation module against normkit.BatchNormAct2d / GroupNormAct. Shapes from the models that use them: an
# EfficientNet/MobileNet stage for BatchNorm, a diffusion UNet block for GroupNorm.
ACT_OPS: tuple[str, ...] = ()


def _act_ops() -> tuple[str, ...]:
    keys = []
    for act in normkit.activations.names():
        if act in ("", "relu"):
            continue
        label = type(normkit.activations.to_module(act)).__name__
        if act == "gelu_tanh":
            label = "GELU(tanh)"
        OPS[f"bn_{act}"] = (f"BN+{label}", "bn", (8, 96, 24, 24), False,
                            lambda s, a=act: nn.Sequential(nn.BatchNorm2d(s[1]), normkit.activations.to_module(a)),
                            lambda s, a=act: normkit.BatchNormAct2d(s[1], act=a))
        QUICK_SHAPES[f"bn_{act}"] = (4, 96, 24, 24)
        keys.append(f"bn_{act}")
    for act in normkit.activations.names():
        if act == "":
            continue
        label = "GELU(tanh)" if act == "gelu_tanh" else type(normkit.activations.to_module(act)).__name__
        OPS[f"gn_{act}"] = (f"GN+{label}", "row", (4, 128, 32, 32), False,
                            lambda s, a=act: nn.Sequential(nn.GroupNorm(32, s[1]), normkit.activations.to_module(a)),
                            lambda s, a=act: normkit.GroupNormAct(32, s[1], act=a))
        QUICK_SHAPES[f"gn_{act}"] = (2, 128, 32, 32)
        keys.append(f"gn_{act}")
    return tuple(keys)


ACT_OPS = _act_ops()


@dataclass
class Case:
    op: str
    shape: tuple[int, ...]
    layout: str  # "nchw" (contiguous) or "channels_last"
    dtype: str
    device: str
    contenders: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return OPS[self.op][0]

    @property
    def family(self) -> str:
        return OPS[self.op][1]

    @property
    def residual(self) -> bool:
        return OPS[self.op][3]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def tensor_bytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    def key(self) -> dict:
        return {"op": self.label, "op_key": self.op, "shape": list(self.shape), "layout": self.layout,
                "dtype": self.dtype, "device": self.device}


def default_layouts(op: str, shape: tuple[int, ...]) -> list[str]:
    """BatchNorm2d, GroupNorm and the fused BN layers in both layouts (channels_last convnets use
    them); the rest as models feed them."""
    if len(shape) != 4:
        return ["nchw"]
    both = ("bn2d", "gn", "ln2d", "bn_relu", "bn_add_relu", *ACT_OPS)
    return ["nchw", "channels_last"] if op in both else ["nchw"]


def _modules(case: Case, want_compile: bool) -> dict[str, tuple[nn.Module, Callable]]:
    """contender name -> (module, call(x, residual)) with identical initial state."""
    _, _, _, res, make_torch, make_nk = OPS[case.op]
    dtype = DTYPES[case.dtype]
    torch.manual_seed(0)
    base = make_torch(case.shape).to(case.device, dtype)

    def call(m):
        return (lambda x, r: m(x, r)) if res else (lambda x, r: m(x))

    out: dict[str, tuple[nn.Module, Callable]] = {"torch": (base, call(base))}
    if want_compile:
        comp = copy.deepcopy(base)
        out["torch.compile"] = (comp, call(torch.compile(comp)))
    nk = make_nk(case.shape).to(case.device, dtype)
    state = base.state_dict()
    nk.load_state_dict({k.removeprefix("bn.").removeprefix("0."): v for k, v in state.items()})
    out["normkit"] = (nk, call(nk))
    if case.device.startswith("cuda") and case.op in ("ln", "rms"):
        try:
            lig = _liger(case.op, case.shape[-1]).to(case.device, dtype)
            out["liger"] = (lig, call(lig))
        except ImportError:
            pass
    return out


def build_steps(case: Case, mode: str, clock: Clock, want_compile: bool) -> dict[str, Step]:
    """One timed step per contender for ``case`` in ``mode``."""
    dtype = DTYPES[case.dtype]
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    g = torch.Generator(device="cpu").manual_seed(1)

    def tensor(offset):
        t = (offset + torch.randn(case.shape, generator=g)).to(case.device, dtype)
        return t.contiguous(memory_format=fmt) if len(case.shape) == 4 else t

    x, dy = tensor(3.0), tensor(0.0)
    r = tensor(0.0) if case.residual else None
    grad = mode in ("bwd", "fwd+bwd")
    x.requires_grad_(grad)
    if r is not None:
        r.requires_grad_(grad)
    steps: dict[str, Step] = {}
    for name, (module, fn) in _modules(case, want_compile).items():
        module.train(mode != "eval")
        steps[name] = _step(fn, module, x, r, dy, mode, clock)
    case.contenders = list(steps)
    return steps


def _step(fn, module, x, r, dy, mode, clock: Clock) -> Step:
    def clear():
        for t in [x, r, *module.parameters()]:
            if t is not None:
                t.grad = None

    if mode in ("fwd", "eval"):
        def step():
            with torch.no_grad():
                return clock.time(lambda: fn(x, r))
    elif mode == "fwd+bwd":
        def step():
            clear()
            return clock.time(lambda: fn(x, r).backward(dy))
    else:
        def step():
            clear()
            y = fn(x, r)
            clock.sync()
            return clock.time(lambda: y.backward(dy))
    return step
