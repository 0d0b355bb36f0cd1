"""The layers' one-call forwards: the plain eager CPU common case in a single C++ call.

A layer's forward in Python — the fast checks, the route (:mod:`normkit.route`), the op call
through the dispatcher, the running-statistics update (:mod:`normkit.running_stats`) — costs
15-60 µs, as much as or more than torch.nn's whole forward on a small tensor. ``normkit._C``
(``csrc/layers.cpp``) does the same work in C++, computing with exactly the functions the Python
path reaches, so a served call gives the same bits. The layers and functions call these first:

* each returns ``None`` when it does not serve the call — another backend, ``torch.compile``,
  forward-mode AD, a ``torch.func`` transform, tracing, a dispatch or function mode, a tensor
  subclass, an empty tensor, anything the detailed checks would refuse — and the caller takes
  the Python path, which raises the clear error or serves the rare case;
* nothing is touched before a call is served.

Without the extension (or with an older build lacking these functions) every entry returns None.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from . import backends, route

__all__ = ["batch_norm", "group_norm", "layer_norm", "layer_norm_2d", "rms_norm"]

_is_compiling = torch.compiler.is_compiling
_BACKEND_CODES = {"auto": 0, "cpu": 1}
_loaded: tuple[object, object] = (None, False)  # (the cpu backend instance, normkit._C or False) last seen


def _entries():
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


def _backend() -> int:
    """0 for ``auto``, 1 for ``cpu``; -1 where no entry serves: another backend, a ``torch.compile``
    trace (which keeps the custom ops), forward-mode AD (the aten path's)."""
    if _is_compiling() or _fwad._current_level >= 0:
        return -1
    return _BACKEND_CODES.get(backends.current(), -1)


def batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked, dims_mask: int, channels: int,
               batch_stats: bool, update: bool, momentum, eps: float, residual, act: int, skip_nonfinite: bool):
    """A BatchNorm layer's forward (nn/batchnorm.py): ``(y, skipped)`` or None.

    ``dims_mask``: bit ``d`` set for each accepted ``x.dim()``; ``update``: move the running
    statistics (and ``num_batches_tracked``) by this batch; ``skipped``: the batch had non-finite
    statistics and moved nothing (the caller counts it).
    """
    code = _backend()
    if code < 0 or not (c := _entries()):
        return None
    return c.batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked, dims_mask, channels,
                        batch_stats, update, momentum, eps, residual, act, skip_nonfinite, code,
                        route.ATEN_BELOW)


def group_norm(x, num_groups: int, channels: int, weight, bias, eps: float, residual, act: int) -> Tensor | None:
    code = _backend()
    if code < 0 or not (c := _entries()):
        return None
    return c.group_norm(x, num_groups, channels, weight, bias, eps, residual, act, code)


def layer_norm(x, normalized_shape, weight, bias, eps: float) -> Tensor | None:
    code = _backend()
    if code < 0 or not (c := _entries()):
        return None
    return c.layer_norm(x, normalized_shape, weight, bias, eps, code)


def layer_norm_2d(x, weight, bias, channels: int, eps: float) -> Tensor | None:
    code = _backend()
    if code < 0 or not (c := _entries()):
        return None
    return c.layer_norm_2d(x, weight, bias, channels, eps, code)


def rms_norm(x, normalized_shape, weight, eps: float | None) -> Tensor | None:
    code = _backend()
    if code < 0 or not (c := _entries()):
        return None
    return c.rms_norm(x, normalized_shape, weight, eps, code)
