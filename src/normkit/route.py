"""Which path a normkit call takes (DESIGN.md §7): one rule, applied by :mod:`normkit.functional`.

Every layer — BatchNorm and its Sync, Renorm, Ghost, Frozen and masked forms, Instance, Group,
Layer and RMS norm, the fused ones — reaches the computation through the functions of
:mod:`normkit.functional`, and each of those asks this module one question: may normkit's
kernels serve this call?

The kernels sit behind ``torch.library`` custom ops (:mod:`normkit.ops`) whose autograd formula
is first-order and reverse-mode. That serves plain eager training and inference and
``torch.compile``. Everything else PyTorch can do with a function needs the function written in
operations PyTorch itself can differentiate, batch and trace, so in these cases the call takes
the *aten path* (:mod:`normkit.aten_path`: torch's own ``native_batch_norm``, ``native_layer_norm``,
``native_group_norm``, ``rms_norm`` ..., with normkit's checks and state rules around them):

=====================================================  =======================================
active                                                 detected by
=====================================================  =======================================
a ``torch.func`` transform (grad, vjp, jacrev, jacfwd,  a functorch interpreter level is active
jvp, hessian, vmap, functional_call under them)
forward-mode AD (``torch.autograd.forward_ad``)        an input carries a tangent
``torch.export`` / ``torch.onnx.export`` (dynamo)      ``torch.compiler.is_exporting()``
``torch.jit.trace`` / legacy ``torch.onnx.export``     ``torch.jit.is_tracing()``
``torch.jit.script``                                   modules hand TorchScript a torch.nn twin
                                                       (``__prepare_scriptable__``)
=====================================================  =======================================

Higher-order reverse mode (``create_graph=True``: gradient penalties, MAML, Hessian-vector
products) cannot be seen at forward time. The custom ops handle it in their backward: when
autograd builds a graph of the backward (grad mode is on inside it), the backward recomputes the
forward on the aten path from the saved inputs and differentiates that, so the gradient it
returns is itself differentiable (:func:`normkit.ops._differentiable_vjp`).

Everything on the aten path gives torch.nn's numbers, and raises torch.nn's errors for what
torch.nn refuses under a transform (e.g. an in-place running-statistics update under ``vmap``).

Plain eager calls on the ``auto`` backend also take the aten path where aten's own CPU kernel is
as fast as normkit's and as deterministic — the same bits for any thread count
(:func:`prefer_aten`). An explicitly chosen backend (``normkit.backend("cpu")``) always runs its
kernels.

The layers' one-call forwards (``csrc/layers.cpp``, :mod:`normkit._fast`) apply the same rule in C++
for the calls they serve (with :data:`ATEN_BELOW` passed in); ``tests/test_fast.py`` compares their
results with this module's path bit for bit on both sides of every condition.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from .backends import current as _backend_name

try:  # torch >= 2.0: the functorch interpreter stack
    from torch._C._functorch import maybe_current_level as _functorch_level
except ImportError:  # pragma: no cover - very old torch
    def _functorch_level():
        return None

# torch.compiler.is_exporting appeared in torch 2.5; before it, export takes the custom ops (which
# normkit.tools.export_program decomposes)
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)

__all__ = ["needs_aten_path", "prefer_aten", "aten_admissible", "use_aten", "needs_grad", "ATEN_BELOW"]

# Training BatchNorm on NCHW input below this many elements runs on aten's kernel: there the fixed
# cost of a call decides, and aten's channel-parallel BatchNorm is bit-identical for any thread count.
ATEN_BELOW = 32768


def _has_tangent(tensors: tuple[Tensor | None, ...]) -> bool:
    if getattr(_fwad, "_current_level", -1) < 0:  # no dual level entered: nothing can carry a tangent
        return False
    return any(t is not None and _fwad.unpack_dual(t).tangent is not None for t in tensors)


def needs_aten_path(*tensors: Tensor | None) -> bool:
    """True when the call must be computed in differentiable, traceable torch ops (module docstring).

    ``tensors`` are every tensor the call reads (input, parameters, residual): forward-mode AD is
    detected by a tangent on any of them. Costs well under a microsecond in plain eager mode.
    """
    if torch.compiler.is_compiling():
        # torch.compile keeps the custom ops (one opaque node, normkit's kernels); export does not:
        # an exported program must run, and translate to ONNX, without normkit.
        return _is_exporting()
    if torch.jit.is_tracing() or _functorch_level() is not None:
        return True
    return _has_tangent(tensors)


def prefer_aten(op: str, x: Tensor, *, fused: bool = False, needs_grad: bool = True) -> bool:
    """Whether a plain eager call on the ``auto`` backend is better served by aten's own kernel.

    ``op`` is ``"batch_norm_train"``, ``"batch_norm_infer"``, ``"group_norm"`` (GroupNorm and
    InstanceNorm), ``"layer_norm"``, ``"layer_norm_2d"`` or ``"rms_norm"``; ``fused`` says a
    residual or activation is fused (aten would need extra passes); ``needs_grad`` says a backward
    can follow. Three conditions:

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
    if op == "batch_norm_train" and x.numel() >= ATEN_BELOW:
        return False
    return _backend_name() == "auto"


def aten_admissible(op: str, x: Tensor, *, fused: bool = False, needs_grad: bool = True) -> bool:
    """Conditions 1 and 2 of :func:`prefer_aten`: aten's kernel gives the same bits for any thread
    count, with or without grad, here (CPU: eval BatchNorm on ≥3-D input or without a backward,
    fused or not; unfused training BatchNorm on ≥3-D NCHW input)."""
    if x.device.type != "cpu":
        return False
    if op == "batch_norm_infer":  # fused too: normkit's op computes torch.nn's BN → add → act sequence as well
        return x.dim() > 2 or not needs_grad
    return op == "batch_norm_train" and not fused and x.dim() > 2 and x.is_contiguous()


def use_aten(op: str, x: Tensor, *others: Tensor | None, fused: bool = False, needs_grad: bool = True) -> bool:
    """:func:`needs_aten_path` or, in plain eager mode, :func:`prefer_aten`: the one question
    :mod:`normkit.functional` asks (``others``: the other tensors the call reads)."""
    if needs_aten_path(x, *others):
        return True
    # (under torch.compile the kernels' custom ops stay: one opaque node, and no backend lookup to trace)
    return not torch.compiler.is_compiling() and prefer_aten(op, x, fused=fused, needs_grad=needs_grad)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether a backward can follow this call (grad mode on and some tensor requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # (a loop, not any() over a generator: this runs on every call)
        if t is not None and t.requires_grad:
            return True
    return False
