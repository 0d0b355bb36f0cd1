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
as fast as normkit's and as deterministic (:func:`prefer_aten`): a custom-op call costs tens of
microseconds of Python dispatch that aten does not, which decides every small tensor. An
explicitly chosen backend (``normkit.backend("cpu")``) always runs its kernels.
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

__all__ = ["needs_aten_path", "prefer_aten", "use_aten", "needs_grad", "ATEN_BELOW"]

# Below this many elements aten's CPU norms run inline on the calling thread (at::parallel_for's
# grain size, 32768), so they are bit-identical for any thread count, and the fixed cost of a
# custom-op call (~30-60 µs of Python dispatch) outweighs any kernel difference.
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

    ``op`` is ``"batch_norm_train"``, ``"batch_norm_infer"``, ``"group_norm"``, ``"layer_norm"``
    or ``"rms_norm"``; ``fused`` says a residual or activation is fused (aten would need extra
    passes); ``needs_grad`` says a backward will follow. The rule, from measurements
    (``normkit bench``, docs/benchmarks.md):

    * any op on fewer than :data:`ATEN_BELOW` elements (per-call cost; deterministic there);
    * eval-mode BatchNorm without fusion at any size: one elementwise pass that torch runs at the
      memory roofline, with no reduction to make results depend on the thread count;
    * LayerNorm for inference (no backward): aten's forward is row-parallel (deterministic) and at
      the roofline; its backward sums dγ/dβ in per-thread buffers, so training keeps normkit's.

    Elsewhere — training BatchNorm, GroupNorm/InstanceNorm, RMSNorm, every fused form — normkit's
    kernels run (faster, and bit-identical for any thread count).
    """
    if x.device.type != "cpu":
        return False
    if not (x.numel() < ATEN_BELOW or (op == "batch_norm_infer" and not fused)
            or (op == "layer_norm" and not needs_grad)):
        return False
    return _backend_name() == "auto"


def use_aten(op: str, x: Tensor, *others: Tensor | None, fused: bool = False, needs_grad: bool = True) -> bool:
    """:func:`needs_aten_path` or, in plain eager mode, :func:`prefer_aten`: the one question
    :mod:`normkit.functional` asks (``others``: the other tensors the call reads)."""
    if needs_aten_path(x, *others):
        return True
    # (under torch.compile the kernels' custom ops stay: one opaque node, and no backend lookup to trace)
    return not torch.compiler.is_compiling() and prefer_aten(op, x, fused=fused, needs_grad=needs_grad)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether a backward can follow this call (grad mode on and some tensor requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
