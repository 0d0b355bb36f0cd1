"""How every normkit BatchNorm moves its running statistics: once per real forward, finite batches only.

Every BatchNorm form with running statistics — BatchNorm1d/2d/3d (and the masked form),
SyncBatchNorm, BatchRenorm, GhostBatchNorm — calls :func:`update_running_stats` with its batch
statistics after the batch has passed every check. The update is torch's::

    num_batches_tracked ← num_batches_tracked + 1
    m                   = momentum, or 1/num_batches_tracked when momentum is None
    running_mean        ← (1 − m)·running_mean + m·μ_B
    running_var         ← (1 − m)·running_var  + m·σ²_B·n/(n − 1)        (unbiased, n values per channel)

with two exceptions, which are what this module is for (docs/semantics.md gives the reasons):

1. **Recomputed forwards update nothing.** ``torch.utils.checkpoint`` runs a block's forward a
   second time during backward; torch.nn's BatchNorm then moves its statistics twice and counts
   the batch twice (pytorch#96136). Here a forward that runs inside a backward pass (reentrant
   checkpointing recomputes inside ``CheckpointFunction.backward``; non-reentrant inside a
   saved-tensor unpack hook, which the autograd engine calls during backward), or under
   non-reentrant checkpointing's recomputation hook, leaves every buffer alone. After a
   checkpointed step the buffers are exactly those of the same step without checkpointing.
   Consequence: a training-mode forward that you *deliberately* run inside a backward hook does
   not update the statistics either.
2. **A batch whose statistics are not finite is skipped** (policy ``"skip"``, the default): one
   overflowing fp16 batch would otherwise put Inf/NaN into running_mean/var for good
   (pytorch#115500, #88474). If any channel's μ_B or σ²_B is NaN/±Inf, running_mean,
   running_var and num_batches_tracked keep their values; the layer's ``skipped_batches``
   (a 0-d int64 tensor attribute, not a buffer: ``named_buffers()``/``state_dict()`` stay torch's)
   counts the batch, and a RuntimeWarning is issued once per layer. The output is what torch
   gives for that batch (NaN/Inf where torch has them). :func:`set_nonfinite_policy("torch")
   <set_nonfinite_policy>` restores torch's behaviour (the statistics absorb the batch).

The decision is made with tensor operations (``torch.where`` on an ``isfinite`` flag), so there is
no host–device synchronisation in the update and ``torch.compile(fullgraph=True)`` sees no graph
break. The warning needs the count on the host: on CPU it is read at once; on other devices it is
copied asynchronously and read at the layer's next training forward (no step waits for the GPU).
Under ``torch.compile`` batches are still skipped and counted, but no warning is issued; an exported or
traced program (``torch.export``, ``torch.jit.trace``) skips them without counting.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ._layout import memory_format_of
from .ops import native_ops

__all__ = ["update_running_stats", "next_running_stats", "batch_moments", "set_nonfinite_policy",
           "get_nonfinite_policy", "in_recomputation", "update_policy", "attach", "SkippedBatches"]

try:  # torch >= 2.0: the functorch interpreter stack
    from torch._C._functorch import maybe_current_level as _functorch_level
except ImportError:  # pragma: no cover - very old torch
    def _functorch_level():
        return None

# torch.compiler.is_exporting appeared in torch 2.5; before it, count only outside torch.compile
_exporting = getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)

POLICIES = ("skip", "torch")
_policy = "skip"


def set_nonfinite_policy(policy: str) -> str:
    """Choose what a training batch with non-finite statistics does to the running statistics.

    ``"skip"`` (default): the batch leaves running_mean, running_var and num_batches_tracked
    unchanged, is counted in the layer's ``skipped_batches`` and warned about once per layer.
    ``"torch"``: torch.nn's behaviour, the statistics absorb the batch (and become NaN/Inf).
    Process-wide, for every normkit BatchNorm; returns the previous policy, so
    ``old = set_nonfinite_policy("torch"); ...; set_nonfinite_policy(old)`` restores it.
    """
    global _policy
    if policy not in POLICIES:
        raise ValueError(f"set_nonfinite_policy: policy: expected one of {POLICIES}, got {policy!r}")
    old, _policy = _policy, policy
    return old


def get_nonfinite_policy() -> str:
    """The policy in force (see :func:`set_nonfinite_policy`)."""
    return _policy


# ----------------------------------------------------------------------------- recomputation
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)
_is_compiling = torch.compiler.is_compiling


def _top_pack_hook_name() -> str:
    if _top_hooks is None:
        return ""
    try:
        hooks = _top_hooks(False)
    except TypeError:  # older signature without the argument
        hooks = _top_hooks()
    if not hooks:
        return ""
    return getattr(hooks[0], "__qualname__", "") or ""


def in_recomputation() -> bool:
    """Whether the forward running now recomputes one that already ran (activation checkpointing).

    True inside a backward pass (``torch._C._current_graph_task_id() != -1``: reentrant
    checkpointing recomputes in ``CheckpointFunction.backward``, non-reentrant in the unpack hook
    the engine calls) and under ``torch.utils.checkpoint``'s non-reentrant recomputation hook
    (which also covers an unpack triggered outside a backward pass). Always False while
    ``torch.compile`` traces (the compiled graph runs each forward once).
    """
    if _is_compiling():
        return False
    if _graph_task_id() != -1:
        return True
    return _top_pack_hook_name().startswith("_recomputation_hook")


def update_policy(layer: nn.Module) -> str | None:
    """How this training forward of ``layer`` moves its running statistics: ``None`` (not at all — it
    recomputes one that ran, :func:`in_recomputation`), else the non-finite policy in force, ``"skip"`` or
    ``"torch"``. The front door asks once per forward and passes the answer to the path that updates
    (the C++ one-call path decides nothing itself); :func:`update_running_stats` applies the same rules."""
    # in_recomputation's tests, for a forward that is not being compiled (the front door knows)
    if _graph_task_id() != -1:
        return None
    hooks = _top_hooks(False) if _top_hooks is not None else None
    if hooks and (getattr(hooks[0], "__qualname__", "") or "").startswith("_recomputation_hook"):
        return None
    return _policy


# ----------------------------------------------------------------------------- the update
def attach(layer: nn.Module) -> None:
    """Give ``layer`` its ``skipped_batches`` counter (a 0-d int64 tensor) if it lacks one.

    A plain tensor attribute, not a buffer: ``named_buffers()`` and ``state_dict()`` stay
    torch.nn's. It follows the statistics' device at the next update. Called by every normkit
    BatchNorm's constructor; layers made without it (``normkit.convert`` retypes torch.nn layers)
    get it at their first training update.
    """
    if not isinstance(layer.__dict__.get("skipped_batches"), Tensor):
        device = layer.running_mean.device if getattr(layer, "running_mean", None) is not None else None
        layer.skipped_batches = torch.zeros((), dtype=torch.long, device=device)


class SkippedBatches:
    """``layer.skipped_batches`` as a class attribute of normkit's BatchNorm classes: the counter
    :func:`attach` gives a layer, made on first access (a non-data descriptor: once made, the
    instance's own attribute answers). So constructors stay torch.nn's own, signature included."""

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        attach(layer)
        return layer.__dict__["skipped_batches"]


def _counter(layer: nn.Module, device: torch.device) -> Tensor:
    """``layer.skipped_batches`` on ``device`` (moved there if the layer was moved since)."""
    attach(layer)
    counter = layer.skipped_batches
    if counter.device != device:
        counter = counter.to(device)
        layer.skipped_batches = counter
    return counter


def count_skipped(layer: nn.Module, device: torch.device) -> None:
    """A batch with non-finite statistics moved nothing: count it in ``layer.skipped_batches`` and warn
    (once per layer). For the update paths that decide on the host (the C++ ones)."""
    skipped = _counter(layer, device)
    skipped.add_(1)
    _warn_once(layer, skipped)


def batch_moments(input: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(mean, biased var, count)`` per channel of ``input`` (N, C, *) for the paths that compute
    the output with aten ops, which do not return the statistics they use.

    Plain eager calls on CPU take them from normkit's statistics kernel (one pass; float32 blocks
    merged in float64, as the kernel route's own statistics); elsewhere (torch.func transforms,
    other devices, no extension) they are accumulated in float64 in tensor ops, two-pass.
    """
    native = _native_stats(input)
    if native is not None:
        mean, var = native(input.detach())
        return mean, var, input.numel() // input.shape[1]
    x = input.detach().to(torch.float64)
    dims = [0, *range(2, input.dim())]
    count = input.numel() // input.shape[1] if input.dim() > 1 and input.shape[1] else 0
    mean = x.mean(dim=dims)
    var = (x - mean.reshape((1, -1) + (1,) * (input.dim() - 2))).square().mean(dim=dims)
    return mean, var, count


def _blend(running: Tensor, batch: Tensor, momentum: float | Tensor) -> Tensor:
    # the same arithmetic as running.mul_(1 - m).add_(batch·m): bit-identical to the in-place form
    return running * (1 - momentum) + batch.to(running.dtype) * momentum


def _finite(batch_mean: Tensor, batch_var: Tensor) -> Tensor:
    """0-d bool: every channel's mean and variance is finite.

    Two reductions, not one over ``cat((mean, var))``: torch 2.13's Inductor miscompiles that form, fed
    into ``torch.where`` and copied into the buffers, when two BatchNorms share a compiled graph (the
    second layer's output came out wrong; tests/test_running_stats.py keeps the case)."""
    return torch.isfinite(batch_mean).all() & torch.isfinite(batch_var).all()


def next_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    policy: str | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The statistics after one training batch, as new tensors (nothing is mutated).

    Returns ``(running_mean, running_var, num_batches_tracked, skipped)``; ``skipped`` is a 0-d
    bool tensor (the batch had non-finite statistics and changed nothing) under policy ``"skip"``
    (default: the policy in force), ``None`` under ``"torch"`` or for an empty batch (which
    counts as a step, as in torch, and moves no statistic). ``batch_var`` is biased; the running
    variance takes ``batch_var·count/(count − 1)``. ``momentum=None``: cumulative average,
    ``1/num_batches_tracked`` after counting the batch.
    """
    policy = _policy if policy is None else policy
    if count <= 0:
        nbt = None if num_batches_tracked is None else num_batches_tracked + 1
        return running_mean, running_var, nbt, None
    var_unbiased = batch_var * (count / max(count - 1, 1))
    finite = _finite(batch_mean, batch_var) if policy == "skip" else None
    nbt = num_batches_tracked
    if nbt is not None:
        nbt = nbt + (1 if finite is None else finite.to(nbt.dtype))
    if momentum is None:  # cumulative average: 0-d tensor, no host sync, no graph break under compile
        momentum = nbt.to(running_mean.dtype).reciprocal() if nbt is not None else 0.0
    new_mean = _blend(running_mean, batch_mean, momentum)
    new_var = _blend(running_var, var_unbiased, momentum)
    if finite is None:
        return new_mean, new_var, nbt, None
    new_mean = torch.where(finite, new_mean, running_mean)
    new_var = torch.where(finite, new_var, running_var)
    return new_mean, new_var, nbt, ~finite


def update_running_stats(layer: nn.Module, batch_mean: Tensor, batch_var: Tensor, count: int) -> None:
    """Move ``layer``'s running statistics by one training batch, in place (module docstring for the rules).

    Args:
        layer: a BatchNorm module (``running_mean``, ``running_var``, ``num_batches_tracked``,
            ``momentum``, ``track_running_stats``). Nothing happens unless it is training and
            tracks running statistics, or when this forward is a recomputation.
        batch_mean, batch_var: the batch's per-channel mean and *biased* variance, ``(C,)``
            (stored unbiased: ``σ²·count/(count − 1)``).
        count: values per channel in the batch (``N·prod(spatial)``, summed over ranks for Sync).
            An empty batch (0) counts as a step, as in torch, and moves no statistic.
    """
    if not (layer.training and layer.track_running_stats) or layer.running_mean is None:
        return
    if in_recomputation():
        return
    # no torch.no_grad() block: nothing here requires grad (the statistics are detached), and an exported
    # training program must not carry a grad-mode region (torch.export cannot load one back)
    batch_mean, batch_var = batch_mean.detach(), batch_var.detach()
    nbt = layer.num_batches_tracked
    if count <= 0:
        if nbt is not None:
            nbt.add_(1)
        return
    running_mean, running_var = layer.running_mean, layer.running_var
    native = _native_update(running_mean, running_var, nbt, batch_mean, batch_var)
    if native is not None:  # plain eager CPU: the same arithmetic in one C++ call (csrc/autograd.h)
        if native(running_mean, running_var, nbt, batch_mean, batch_var, count, layer.momentum, _policy == "skip"):
            count_skipped(layer, batch_mean.device)
        return
    # in place, with as few small ops as possible (this runs for every BN layer at every step). Under a
    # torch.func transform the update is torch.nn's, step for step (count, then write — which vmap
    # refuses for unbatched buffers, as it does torch.nn's): normkit.func returns the new buffers instead.
    skip = _policy == "skip" and _functorch_level() is None
    finite = _finite(batch_mean, batch_var) if skip else None
    if nbt is not None:
        nbt.add_(1 if finite is None else finite)
    momentum = layer.momentum
    if momentum is None:  # cumulative average: 0-d tensor, no host sync, no graph break under compile
        momentum = nbt.to(layer.running_mean.dtype).reciprocal() if nbt is not None else 0.0
    new_mean = _blend(running_mean, batch_mean, momentum)
    new_var = _blend(running_var, batch_var * (count / max(count - 1, 1)), momentum)
    if finite is not None:
        new_mean = torch.where(finite, new_mean, running_mean)
        new_var = torch.where(finite, new_var, running_var)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    if finite is not None and not (_exporting() or torch.jit.is_tracing()):
        # (an exported or traced program has no place for a Python-side counter: it skips, uncounted)
        skipped = _counter(layer, finite.device)
        skipped.add_(finite.logical_not())
        if not torch.compiler.is_compiling():
            _warn_once(layer, skipped)


_STAT_DTYPES = (torch.float32, torch.float64)


def _native_update(running_mean: Tensor, running_var: Tensor, nbt: Tensor | None, batch_mean: Tensor,
                   batch_var: Tensor):
    """``torch.ops.normkit_cpu.update_running_stats`` when it can serve this update, else None.

    It serves plain eager calls on CPU float32/float64 statistics with the C++ extension loaded; a
    torch.func transform, tracing, export and torch.compile keep the tensor-op form below (they
    must see, batch or record every operation).
    """
    if not (running_mean.is_cpu and batch_mean.is_cpu) or running_mean.dtype not in _STAT_DTYPES \
            or not (running_mean.is_contiguous() and running_var.is_contiguous()) \
            or batch_mean.dtype not in _STAT_DTYPES or running_var.dtype != running_mean.dtype \
            or batch_var.dtype != batch_mean.dtype or (nbt is not None and not nbt.is_cpu):
        return None
    kernels = native_ops() if _plain_eager() else None
    return None if kernels is None else kernels.update_running_stats.default


def _native_stats(input: Tensor):
    """``torch.ops.normkit_cpu.channel_stats`` when it can serve :func:`batch_moments`, else None."""
    if not input.is_cpu or input.numel() == 0 or input.dim() < 2 or not _plain_eager():
        return None
    if not input.is_contiguous(memory_format=memory_format_of(input)):  # the kernel reads dense layouts only
        return None
    kernels = native_ops()
    return None if kernels is None else kernels.channel_stats.default


def _plain_eager() -> bool:
    """No torch.func transform, tracing, export or torch.compile: the C++ calls may serve (they would
    hide their operations from all of these)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _functorch_level() is not None)


def _warn_once(layer: nn.Module, skipped: Tensor) -> None:
    state = layer.__dict__
    if state.get("_nonfinite_warned") or skipped.is_meta:  # (the meta device holds no count to read)
        return
    if skipped.device.type == "cpu":
        count = int(skipped)
    else:  # read last step's asynchronous copy if it has arrived; start the next one
        count = 0
        pending = state.get("_nonfinite_pending")
        if pending is not None and pending[1].query():
            count = int(pending[0])
            pending = None
        if pending is None:
            host = torch.empty((), dtype=skipped.dtype, pin_memory=torch.cuda.is_available())
            host.copy_(skipped, non_blocking=True)
            event = torch.cuda.Event() if skipped.is_cuda else None
            if event is not None:
                event.record()
                state["_nonfinite_pending"] = (host, event)
            else:
                count = int(host)
    if count > 0:
        state["_nonfinite_warned"] = True
        warnings.warn(
            f"normkit: {type(layer).__name__}({layer.num_features}) skipped a training batch whose statistics are "
            "not finite (NaN/Inf, e.g. an fp16 overflow): running_mean, running_var and num_batches_tracked "
            "were left unchanged. The layer's skipped_batches counts such batches; this warning is shown "
            "once per layer. normkit.set_nonfinite_policy('torch') restores torch's behaviour.",
            RuntimeWarning,
            stacklevel=4,
        )
