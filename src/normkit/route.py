"""Which path a normkit call takes (DESIGN.md §7): the one chooser, asked once per call by the front
doors of :mod:`normkit.functional`.

Every layer — BatchNorm and its Sync, Renorm, Ghost, Frozen and masked forms, Instance, Group,
Layer, LayerNorm2d and RMS norm, the fused ones — reaches its computation through a function of
:mod:`normkit.functional`, which calls :func:`choose` once and then takes the path it names:

==============  ==========================================================  =====================================
path            when                                                        computed by
==============  ==========================================================  =====================================
ONE_CALL        plain eager on CPU, the C++ extension loaded, backend       ``csrc/layers.cpp`` (:mod:`normkit._fast`):
                ``auto`` or ``cpu``                                         kernel and running-statistics update
                                                                            in one C++ call
ONE_CALL_ATEN   the same, where :func:`prefer_aten` picks aten's kernel     the same call, with aten's kernel
KERNELS         plain eager elsewhere (the triton and reference backends,   :data:`normkit.ops.eager`: the kernels
                a CUDA tensor) or what ONE_CALL declines (empty tensors)     without a dispatcher op
OP              under ``torch.compile`` where normkit's kernel beats the    ``torch.ops.normkit.*``: one opaque node
                code Inductor generates (:data:`COMPILE_KEEPS_OP`)           with a fake kernel
TORCH           everything else: under ``torch.compile`` elsewhere (so      :mod:`normkit.aten_path`: torch's own
                Inductor fuses the norm into its neighbours and folds eval   differentiable, batchable, traceable,
                BatchNorm into a convolution), ``torch.export``, tracing,    shardable operators
                a ``torch.func`` transform, forward-mode AD, a dispatch or
                function mode, a tensor subclass (DTensor, FakeTensor, ...),
                the meta device, and plain eager calls on ``auto`` where
                aten's kernel is preferred but ONE_CALL is unavailable
==============  ==========================================================  =====================================

The rules that decide — this module — are the only copy: the C++ one-call path receives their
answers (which kernel; whether to move the running statistics) and decides nothing itself.

Higher-order reverse mode (``create_graph=True``) and batched gradients (``is_grads_batched``) cannot
be seen at forward time: the kernels' backward handles them by recomputing the forward in torch's
operators from the saved inputs and differentiating that (:func:`normkit.ops._differentiable_vjp`,
``csrc/autograd.h``).

Everything on the TORCH path gives torch.nn's numbers and raises torch.nn's errors for what torch.nn
refuses under a transform (e.g. an in-place running-statistics update under ``vmap``).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor
from torch.nn import Parameter

from . import _fast
from .backends import current as _backend_name

try:  # torch >= 2.0: the functorch interpreter stack
    from torch._C._functorch import maybe_current_level as _functorch_level
except ImportError:  # pragma: no cover - very old torch
    def _functorch_level():
        return None

# torch.compiler.is_exporting appeared in torch 2.5; before it, export takes the custom ops (which
# normkit.tools.export_program decomposes)
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing  # (torch.jit.is_tracing's own test, without its Python wrapper)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_grad_enabled = torch.is_grad_enabled

__all__ = ["ONE_CALL", "ONE_CALL_ATEN", "KERNELS", "OP", "TORCH", "choose", "prefer_aten", "aten_admissible",
           "needs_grad", "compile_keeps_op", "ATEN_BELOW", "COMPILE_KEEPS_OP"]

ONE_CALL, ONE_CALL_ATEN, KERNELS, OP, TORCH = range(5)
PATH_NAMES = ("one_call", "one_call_aten", "kernels", "op", "torch")

# Training BatchNorm on NCHW input below this many elements runs on aten's kernel: there the fixed
# cost of a call decides, and aten's channel-parallel BatchNorm is bit-identical for any thread count.
ATEN_BELOW = 32768

#: The ops whose custom op (normkit's kernel) stays opaque under ``torch.compile``: where it beats the
#: code Inductor generates for torch's composite form, measured per op on this machine
#: (``normkit bench --suite compile``, docs/benchmarks.md). Everything else compiles to torch's own
#: operators, which Inductor fuses with the neighbouring ops.
COMPILE_KEEPS_OP: frozenset[str] = frozenset()

_PLAIN = frozenset((Tensor, Parameter))


def _has_tangent(tensors: tuple[Tensor | None, ...]) -> bool:
    return any(t is not None and _fwad.unpack_dual(t).tangent is not None for t in tensors)


def choose(op: str, fused: bool, x: Tensor, *others: Tensor | None) -> int:
    """The path of one call (module docstring): one of ONE_CALL, ONE_CALL_ATEN, KERNELS, OP, TORCH.

    ``op`` is ``"batch_norm_train"``, ``"batch_norm_infer"``, ``"group_norm"`` (GroupNorm and
    InstanceNorm), ``"layer_norm"``, ``"layer_norm_2d"`` or ``"rms_norm"``; ``fused`` says a residual or
    activation is fused into the call; ``x`` the input and ``others`` every other tensor the call reads,
    weight and bias first (then residual, running statistics). Runs on every call of
    every layer, so it is written for speed: about half a microsecond in plain eager mode on CPU.
    """
    if _is_compiling():
        # an exported program must run, and translate to ONNX, without normkit: torch's operators
        if _is_exporting() or not compile_keeps_op(op, x, fused):
            return TORCH
        return OP
    entries = _fast.entries()
    if not (entries.plain_cpu(x, others) if entries else _plain_eager_python(x, others)):
        if type(x) in _PLAIN and x.is_cuda and _plain_eager_python(x, others):  # plain eager, on a GPU
            return KERNELS if _fwad._current_level < 0 or not _has_tangent((x, *others)) else TORCH
        return TORCH
    if _fwad._current_level >= 0 and _has_tangent((x, *others)):
        return TORCH
    backend = _backend_name()
    if backend == "triton" or backend == "reference" or not (entries or x.is_cpu):
        return KERNELS
    # prefer_aten for a CPU call on ``auto``, inlined (others[:2] are the weight and bias)
    if backend != "auto":
        aten = False
    elif op == "batch_norm_infer":  # any eval call on ≥3-D input; on 2-D input one no backward follows
        aten = x.dim() > 2 or not (_grad_enabled() and (x.requires_grad or _any_requires_grad(others[:2])))
    elif op == "batch_norm_train":
        aten = not fused and x.numel() < ATEN_BELOW and x.dim() > 2 and x.is_contiguous()
    else:
        aten = False
    if entries:
        return ONE_CALL_ATEN if aten else ONE_CALL
    return TORCH if aten else KERNELS


def _plain_eager_python(x: Tensor, others: tuple) -> bool:
    """No tracer, functorch transform, dispatch or function mode; every tensor plain (no subclass, not meta).

    What ``normkit._C.plain_cpu`` answers in one C call for CPU tensors (without the CPU condition here)."""
    if type(x) not in _PLAIN or x.is_meta or _is_tracing() or _functorch_level() is not None \
            or _dispatch_modes() or _function_modes():
        return False
    for t in others:  # a tensor subclass anywhere (DTensor parameters, ...): torch's operators
        if t is not None and (type(t) not in _PLAIN or t.is_meta):
            return False
    return True


def _any_requires_grad(tensors) -> bool:
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def compile_keeps_op(op: str, x: Tensor, fused: bool) -> bool:
    """Whether ``torch.compile`` keeps normkit's custom op for this call (:data:`COMPILE_KEEPS_OP`)."""
    return op in COMPILE_KEEPS_OP


def prefer_aten(op: str, x: Tensor, *, fused: bool = False, needs_grad: bool = True) -> bool:
    """Whether a plain eager call on the ``auto`` backend is better served by aten's own kernel.

    ``fused`` says a residual or activation is fused (aten would need extra passes); ``needs_grad``
    says a backward can follow. Three conditions:

    1. **The same bits for any thread count**, forward and backward (normkit's kernels guarantee
       it; the route must not take it away). Measured on torch 2.13 (tests/test_route.py checks
       it): aten's CPU BatchNorm on ``(N, C)`` or channels_last input splits its sums across
       threads (the forward too, from 64×256 up); LayerNorm's backward sums dγ/dβ in per-thread
       buffers; GroupNorm's backward dx changes with the thread count even on a 2×32×8×8 tensor.
       BatchNorm on NCHW input, forward and backward (channel-parallel), is thread-count
       independent, and eval BatchNorm on ≥3-D input in any layout.
    2. **The same bits with and without grad**: a forward under ``torch.no_grad()`` (inference,
       or the first pass of reentrant checkpointing) computes what the same forward with grad
       computes. So the route depends on whether a backward follows only for eval BatchNorm, whose
       kernel route computes its forward as torch.nn does too (aten's eval kernel → + residual →
       activation, ``csrc/autograd.h``): eval BatchNorm on ``(N, C)`` input runs on aten without a
       backward and on normkit's op, with that forward and normkit's thread-count independent
       dγ/dβ, with one. Eval outputs are therefore torch.nn's to the bit, fused layers included.
    3. **Speed** (``normkit bench --suite route``, docs/benchmarks.md): where 1 and 2 allow aten,
       it wins eval BatchNorm (one pass at the roofline, no Python around a kernel call) and
       training BatchNorm below :data:`ATEN_BELOW` elements; normkit's kernels win training above
       it, every fused training form, and RMSNorm at every size (aten's is composite).

    Hence aten for eval BatchNorm, fused or not, on ≥3-D input (on 2-D input without a backward)
    and unfused training BatchNorm on NCHW input below :data:`ATEN_BELOW`; normkit's kernels for
    everything else. (LayerNorm's forward could be aten's, row-parallel and deterministic, but it
    computes its statistics in one pass: on ``1e4 + randn`` rows its rstd is off by 1.8e-4
    relative, where normkit's shifted sums are exact to float32 — tests/test_numerics.py.)
    """
    if not aten_admissible(op, x, fused=fused, needs_grad=needs_grad):
        return False
    return op != "batch_norm_train" or x.numel() < ATEN_BELOW


def aten_admissible(op: str, x: Tensor, *, fused: bool = False, needs_grad: bool = True) -> bool:
    """Conditions 1 and 2 of :func:`prefer_aten`: aten's kernel gives the same bits for any thread
    count, with or without grad, here (CPU: eval BatchNorm on ≥3-D input or without a backward,
    fused or not; unfused training BatchNorm on ≥3-D NCHW input)."""
    if op == "batch_norm_infer":  # fused too: normkit's op computes torch.nn's BN → add → act sequence as well
        return x.is_cpu and (x.dim() > 2 or not needs_grad)
    return op == "batch_norm_train" and not fused and x.dim() > 2 and x.is_cpu and x.is_contiguous()


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether a backward can follow this call (grad mode on and some tensor requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # (a loop, not any() over a generator: this runs on every call)
        if t is not None and t.requires_grad:
            return True
    return False
