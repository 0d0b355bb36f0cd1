"""BatchNorm as a pure function, for ``torch.func`` (grad, vmap, jacrev) and functional training loops.

A BatchNorm module mutates its buffers in training, which ``torch.func`` transforms cannot
follow (pytorch#85533: ``vmap``/``grad``/``jacrev`` of a training-mode BN fail or need
``replace_all_batch_norm_modules_``, which drops the running statistics). Here the new
statistics are returned instead of written:

* :func:`batch_norm` — ``(output, new_running_mean, new_running_var)``, mutating nothing;
* :func:`functional_call` — like ``torch.func.functional_call``, runs a whole model with the
  given parameters and buffers and returns ``(output, new_buffers)``, the buffers every
  BatchNorm would have written (``num_batches_tracked`` included), without mutating any tensor.

Numbers: torch's own. In training with running statistics :func:`batch_norm` runs
``aten._native_batch_norm_legit_functional`` — the functional form of torch's training batch
norm that functionalization uses — so output and new statistics are bit for bit what
``F.batch_norm`` gives and writes into clones of the buffers. Under ``vmap``, where that op has no
batching rule, the output is ``F.batch_norm``'s and the statistics torch's update formula with
float64 accumulation (within one rounding of torch's). Everything is aten ops: it runs under any
transform, at torch's speed rather than normkit's kernels'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _checks as C
from . import running_stats

__all__ = ["batch_norm", "functional_call"]


def _under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` level is active (at any depth)."""
    stack = torch._C._functorch.get_interpreter_stack() if hasattr(torch._C, "_functorch") else None
    return any(i.key().name == "Vmap" for i in stack or ())


def _verify_batch_size(where: str, input: Tensor) -> None:
    """torch's rule for training: more than one value per channel."""
    if input.dim() >= 2 and input.numel() // max(input.shape[1], 1) == 1 and input.shape[1] > 0:
        raise ValueError(f"{where}: Expected more than 1 value per channel when training, got input size "
                         f"{tuple(input.shape)}")


def _torch_update(running: Tensor, batch: Tensor, momentum: float | Tensor) -> Tensor:
    """torch's CPU kernel: ``m·batch + (1 − m)·running`` in the accumulation type, stored in running's dtype."""
    acc = batch.dtype
    return (momentum * batch + (1 - momentum) * running.to(acc)).to(running.dtype)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Batch Normalization that returns its new running statistics instead of writing them.

    ``output = γ·(x − μ)/sqrt(σ² + ε) + β`` per channel of ``input`` ``(N, C, *)``, with the
    batch statistics (biased σ²) when ``training``, else ``running_mean``/``running_var``; the
    arguments are ``torch.nn.functional.batch_norm``'s. Returns ``(output, new_running_mean,
    new_running_var)``: in training ``(1 − m)·running + m·batch`` (unbiased batch variance,
    ``m = momentum``, which may be a 0-d tensor, e.g. ``1/num_batches_tracked``); otherwise, or
    for ``None`` statistics, the given tensors themselves. Nothing is mutated; the new statistics
    carry no gradient (as torch's in-place update). Works under ``torch.func.grad``, ``vmap``,
    ``jacrev`` and friends.
    """
    C.check_tensor("normkit.func.batch_norm", "input", input)
    if not training:
        if running_mean is None or running_var is None:
            raise C.fail("normkit.func.batch_norm", "running_mean/running_var", "tensors when training=False",
                         "None")
        out = nn.functional.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
        return out, running_mean, running_var
    if running_mean is not None and running_var is not None and not _under_vmap():
        # torch's own functional form of its training batch norm (what functionalization runs):
        # output and new statistics bit for bit torch's, nothing written
        _verify_batch_size("normkit.func.batch_norm", input)
        if isinstance(momentum, Tensor):
            momentum = float(momentum)
        out, _, _, new_mean, new_var = torch.ops.aten._native_batch_norm_legit_functional(
            input, weight, bias, running_mean, running_var, True, momentum, eps)
        return out, new_mean.detach(), new_var.detach()
    # under vmap (where that op has no batching rule): the output by F.batch_norm, the statistics by
    # torch's update formula with float64 accumulation, as torch's CPU kernel
    out = nn.functional.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    if running_mean is None and running_var is None:
        return out, running_mean, running_var
    mean, var, count = running_stats.batch_moments(input)
    new_mean, new_var = running_mean, running_var
    if count > 0:
        if running_mean is not None:
            new_mean = _torch_update(running_mean, mean, momentum)
        if running_var is not None:
            new_var = _torch_update(running_var, var * (count / max(count - 1, 1)), momentum)
    return out, new_mean, new_var


# ----------------------------------------------------------------------------- whole models
class _Recorder:
    """The new buffers of one BatchNorm during a functional call (chained: ghost BN updates per chunk)."""

    def __init__(self, prefix: str, module: nn.Module, out: dict[str, Tensor], torch_semantics: bool) -> None:
        self.prefix, self.module, self.out, self.torch_semantics = prefix, module, out, torch_semantics

    def _current(self, name: str) -> Tensor | None:
        key = self.prefix + name
        return self.out[key] if key in self.out else getattr(self.module, name)

    def stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Stand-in for a normkit layer's ``_update_running_stats``: the same rules, written to ``out``."""
        m = self.module
        if not (m.training and m.track_running_stats) or m.running_mean is None:
            return
        if running_stats.in_recomputation():
            return
        mean_r, var_r, nbt, _ = running_stats.next_running_stats(
            self._current("running_mean"), self._current("running_var"), self._current("num_batches_tracked"),
            m.momentum, mean.detach(), var.detach(), count,
        )
        self._store(mean_r, var_r, nbt)

    def _store(self, mean: Tensor, var: Tensor, nbt: Tensor | None) -> None:
        self.out[self.prefix + "running_mean"] = mean
        self.out[self.prefix + "running_var"] = var
        if nbt is not None:
            self.out[self.prefix + "num_batches_tracked"] = nbt

    def forward(self, input: Tensor) -> Tensor:
        """torch.nn's ``_BatchNorm.forward`` with the buffer writes turned into returned tensors."""
        m = self.module
        m._check_input_dim(input)
        momentum: float | Tensor = 0.0 if m.momentum is None else m.momentum
        nbt = self._current("num_batches_tracked")
        if m.training and m.track_running_stats and nbt is not None:
            nbt = nbt + 1
            momentum = 1.0 / nbt.to(torch.float64) if m.momentum is None else m.momentum
        use_batch = m.training or (m.running_mean is None and m.running_var is None)
        keep = not m.training or m.track_running_stats
        mean_r, var_r = self._current("running_mean"), self._current("running_var")
        out, new_mean, new_var = batch_norm(input, mean_r if keep else None, var_r if keep else None, m.weight,
                                            m.bias, use_batch, momentum, m.eps)
        if m.training and m.track_running_stats and mean_r is not None:
            self._store(new_mean, new_var, nbt)
        return out


def _is_normkit_bn(module: nn.Module) -> bool:
    from .nn.batchnorm import _BatchNormForward

    return isinstance(module, _BatchNormForward)


def functional_call(
    model: nn.Module,
    params_and_buffers: Mapping[str, Tensor],
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
    *,
    strict: bool = False,
) -> tuple[Any, dict[str, Tensor]]:
    """Run ``model`` with ``params_and_buffers`` like ``torch.func.functional_call``; return ``(output, new_buffers)``.

    ``new_buffers`` maps the name of every buffer of ``model`` to its value after the call: the
    running statistics and ``num_batches_tracked`` each training-mode BatchNorm would have
    written (torch.nn's BatchNorm1d/2d/3d and SyncBatchNorm by torch's rule; normkit's
    BatchNorm forms — Sync, renorm, ghost, masked, fused included — by normkit's, see
    :mod:`normkit.running_stats`), every other buffer as given (or the model's own). No tensor is
    mutated, so the call composes with ``torch.func.grad``, ``vmap``, ``jacrev``; feed
    ``new_buffers`` to the next step. Other modules that mutate their buffers in place are not
    intercepted. ``strict`` is passed to ``torch.func.functional_call``.
    """
    new: dict[str, Tensor] = {}
    patched: list[tuple[nn.Module, str]] = []
    try:
        for name, module in model.named_modules():
            if not isinstance(module, _BatchNorm) or not module.training:
                continue
            prefix = f"{name}." if name else ""
            if _is_normkit_bn(module):
                module._update_running_stats = _Recorder(prefix, module, new, False).stats
                patched.append((module, "_update_running_stats"))
            elif type(module).forward is _BatchNorm.forward or isinstance(module, nn.SyncBatchNorm):
                module.forward = _Recorder(prefix, module, new, True).forward
                patched.append((module, "forward"))
            else:
                raise C.fail("normkit.func.functional_call", "model",
                             "BatchNorm layers whose buffer updates normkit can intercept (torch.nn's or normkit's)",
                             f"a {type(module).__qualname__} in training mode")
        out = torch.func.functional_call(model, dict(params_and_buffers), args, kwargs, strict=strict)
    finally:
        for module, attr in patched:
            module.__dict__.pop(attr, None)
    buffers = {name: params_and_buffers.get(name, b) for name, b in model.named_buffers()}
    buffers.update(new)
    return out, buffers
