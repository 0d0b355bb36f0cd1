"""The ONE_CALL path (:mod:`normkit.route`): a layer's plain eager CPU forward in a single C++ call.

A layer's forward in Python — the checks, the op call through the dispatcher, the running-statistics
update (:mod:`normkit.running_stats`) — costs 15-60 µs, as much as or more than torch.nn's whole
forward on a small tensor. ``normkit._C`` (``csrc/layers.cpp``) does the same work in C++, computing
with exactly the functions the other paths reach, so a served call gives the same bits. It decides
nothing: the route's answers (which kernel, whether the statistics move) come in as arguments.

Each function returns ``None`` when it cannot run the call as given (an empty tensor, a shape or
dtype the checks would refuse, an exotic tensor) — nothing is touched then — and the front door
(:mod:`normkit.functional`) checks and computes the call on the KERNELS or TORCH path instead.
Without the extension (or with an older build lacking these functions) :func:`available` is False.
"""

from __future__ import annotations

from . import backends

__all__ = ["available"]

_loaded: tuple[object, object] = (None, False)  # (the cpu backend instance, normkit._C or False) last seen


def entries():
    """``normkit._C`` when the registered ``cpu`` backend is the C++ extension with the layer functions,
    else False. Asked on every call (a dictionary read): ``register_backend("cpu", ...)`` may replace it."""
    global _loaded
    cpu = backends._INSTANCES.get("cpu") or backends._instance("cpu")  # builds (loads) it once
    if _loaded[0] is cpu:
        return _loaded[1]
    module = False
    if getattr(cpu, "eager_ops", False):  # the extension's backend (cpu_backend.CpuBackend), loaded
        import importlib

        module = importlib.import_module("normkit._C")
        module = module if hasattr(module, "layer_norm_2d") else False
    _loaded = (cpu, module)
    return module


def available() -> bool:
    """Whether the one-call functions exist (the C++ extension is built and is the ``cpu`` backend)."""
    return bool(entries())


# The functions of normkit._C (csrc/layers.cpp), called as ``entries().<name>(...)`` by normkit.functional:
#
#   batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked, dims_mask, channels,
#              batch_stats, update, momentum, eps, residual, act, skip_nonfinite, aten) -> (y, skipped) | None
#       dims_mask: bit d set for each accepted x.dim(); update: move the running statistics (and
#       num_batches_tracked) by this batch; aten: compute with aten's kernel; skipped: the batch had
#       non-finite statistics and moved nothing (the caller counts it)
#   group_norm(x, num_groups, channels, weight, bias, eps, residual, act)            -> y | None
#   layer_norm(x, normalized_shape, weight, bias, eps)                               -> y | None
#   layer_norm_2d(x, weight, bias, channels, eps)                                    -> y | None
#   rms_norm(x, normalized_shape, weight, eps)                                       -> y | None
