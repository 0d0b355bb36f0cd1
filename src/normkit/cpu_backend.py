"""The ``cpu`` backend: normkit's backend interface on the C++ kernels of ``csrc/``.

The kernels are torch operators, ``torch.ops.normkit_cpu.*``, one per entry point of
:mod:`normkit.backends`, compiled once at install into the extension ``normkit._C`` (see
``setup.py``) and parallel on torch's own intra-op thread pool (``torch.set_num_threads``;
fork-safe as torch is). This module only maps arguments: the activation string to its int64 code
(:func:`normkit.activations.code`: the kind and leaky ReLU's / ELU's parameter),
empty tensors to the reference math (nothing to launch). Each operator checks what it reads
(dense layout, vector lengths, dtype), allocates its outputs in ``x``'s memory format and
returns ``None`` for the outputs the interface leaves out.

Layouts, as the kernels see them (``csrc/common.h``):

* contiguous ``(N, C, *spatial)`` with ``S = prod(spatial) > 1`` → loop order ``(N, C, S)``;
* channels_last 4-D/5-D, 2-D ``(N, C)``, or ``S == 1`` → ``(N, S, C)`` (BatchNorm treats all
  ``N·S`` positions as one sample).

Numerics: float32 accumulation for float32/float16/bfloat16 input, float64 for float64, in
blocks of at most 4096 values whose totals are merged in float64; statistics as one pass of
shifted sums. The order of every reduction depends on the shape only, so results are
bit-identical from run to run and for any thread count.
"""

from __future__ import annotations

import importlib

import torch

from ._layout import own_tensor
from .activations import code as _act
from .backends import OPS, Backend
from .ops_channels import channel_rows as _channel_rows
from .reference import ReferenceBackend

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_REF = ReferenceBackend()  # empty tensors only


def _load_kernels():
    """``torch.ops.normkit_cpu``, after loading the extension that registers it."""
    try:
        importlib.import_module("normkit._C")
    except ImportError as err:
        raise ImportError(
            f"normkit's C++ extension (normkit._C) is not built or does not load ({err}); it is compiled at "
            "install: reinstall with a C++ compiler and torch present, `pip install --no-build-isolation -e .`"
        ) from err
    return torch.ops.normkit_cpu


class CpuBackend(Backend):
    """Every entry point of :mod:`normkit.backends` on the C++ kernels (CPU tensors)."""

    name = "cpu"

    def __init__(self) -> None:
        k = _load_kernels()
        # the resolved overloads: calling them skips the overload lookup (a few µs a call)
        self._channel_stats = k.channel_stats.default
        self._channel_apply = k.channel_apply.default
        self._channel_backward_reduce = k.channel_backward_reduce.default
        self._channel_backward_dx = k.channel_backward_dx.default
        self._channel_forward = k.channel_forward.default
        self._channel_backward = k.channel_backward.default
        self._row_forward = k.row_forward.default
        self._row_backward = k.row_backward.default
        self._group_forward = k.group_forward.default
        self._group_backward = k.group_backward.default
        self._ln2d_forward = k.ln2d_forward.default
        self._ln2d_backward = k.ln2d_backward.default
        self._k = k
        # the differentiable ops with C++ autograd that normkit.ops.eager calls directly (csrc/autograd.h)
        self.eager_ops = hasattr(k, "bn_train")

    def unsupported(self, op: str, x: torch.Tensor) -> str | None:
        if op not in OPS:
            return f"unknown op {op!r}"
        if x.device.type != "cpu":
            return f"the cpu backend runs CPU tensors, got a {x.device.type} tensor"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} is not one of float32, float64, float16, bfloat16"
        return None

    # ------------------------------------------------------------------ channel family (BN)
    def channel_stats(self, x):
        if x.numel() == 0:
            return _REF.channel_stats(x)
        return self._channel_stats(x)

    def channel_apply(self, x, scale, shift, residual, act):
        if x.numel() == 0:
            return _REF.channel_apply(x, scale, shift, residual, act)
        return self._channel_apply(x, scale, shift, residual, _act(act))

    def channel_backward_reduce(self, x, dy, mean, rstd, scale, shift, residual, act):
        if x.numel() == 0:
            return _REF.channel_backward_reduce(x, dy, mean, rstd, scale, shift, residual, act)
        return self._channel_backward_reduce(x, dy, mean, rstd, scale, shift, residual, _act(act))

    def channel_backward_dx(self, x, dy, mean, rstd, scale, shift, residual, act, mean_dz, mean_dz_xhat,
                            need_dz):
        if x.numel() == 0:
            return _REF.channel_backward_dx(x, dy, mean, rstd, scale, shift, residual, act, mean_dz,
                                            mean_dz_xhat, need_dz)
        return self._channel_backward_dx(x, dy, mean, rstd, scale, shift, residual, _act(act), mean_dz,
                                         mean_dz_xhat, bool(need_dz))

    def channel_forward(self, x, weight, bias, eps, residual, act):
        if x.numel() == 0:
            return _REF.channel_forward(x, weight, bias, eps, residual, act)
        return self._channel_forward(x, weight, bias, float(eps), residual, _act(act))

    def channel_backward(self, x, dy, mean, rstd, scale, shift, residual, act, batch_stats, need_dz):
        if x.numel() == 0:
            return _REF.channel_backward(x, dy, mean, rstd, scale, shift, residual, act, batch_stats, need_dz)
        return self._channel_backward(x, dy, mean, rstd, scale, shift, residual, _act(act), bool(batch_stats),
                                      bool(need_dz))

    # ------------------------------------------------------------------ row family (LN, RMS)
    def row_forward(self, x2d, weight, bias, eps, rms):
        if x2d.numel() == 0:
            return _REF.row_forward(x2d, weight, bias, eps, rms)
        return self._row_forward(x2d.contiguous(), weight, bias, float(eps), bool(rms))

    def row_backward(self, x2d, dy2d, mean, rstd, weight, rms, need_dweight):
        if x2d.numel() == 0:
            return _REF.row_backward(x2d, dy2d, mean, rstd, weight, rms, need_dweight)
        return self._row_backward(x2d.contiguous(), dy2d, mean, rstd, weight, bool(rms), bool(need_dweight))

    # ------------------------------------------------------------------ row family (GN, IN)
    def group_forward(self, x, num_groups, weight, bias, eps, residual, act):
        if x.numel() == 0:
            return _REF.group_forward(x, num_groups, weight, bias, eps, residual, act)
        return self._group_forward(x, int(num_groups), weight, bias, float(eps), residual, _act(act))

    def group_backward(self, x, dy, mean, rstd, num_groups, weight, bias, residual, act, need_dweight,
                       need_dz):
        if x.numel() == 0:
            return _REF.group_backward(x, dy, mean, rstd, num_groups, weight, bias, residual, act,
                                       need_dweight, need_dz)
        return self._group_backward(x, dy, mean, rstd, int(num_groups), weight, bias, residual, _act(act),
                                    bool(need_dweight), bool(need_dz))

    # ------------------------------------------------------------------ LayerNorm over channels (2d)
    # channels_last (and (N, C), S = 1): the (N·S, C) view of x is a contiguous row matrix, so the row
    # kernels run it as is; NCHW: the column-reduction kernels of csrc/ln2d.h.
    def ln2d_forward(self, x, weight, bias, eps):
        if x.numel() == 0:
            return _REF.ln2d_forward(x, weight, bias, eps)
        rows = _channel_rows(x)
        if rows is None:
            return self._ln2d_forward(x, weight, bias, float(eps))
        x2d, restore = rows
        y2d, mean, rstd = self._row_forward(x2d, weight, bias, float(eps), False)
        stat_shape = (x.shape[0], *x.shape[2:])
        return own_tensor(restore(y2d)), mean.view(stat_shape), rstd.view(stat_shape)

    def ln2d_backward(self, x, dy, mean, rstd, weight, need_dweight):
        if x.numel() == 0:
            return _REF.ln2d_backward(x, dy, mean, rstd, weight, need_dweight)
        rows = _channel_rows(x)
        if rows is None:
            return self._ln2d_backward(x, dy, mean, rstd, weight, bool(need_dweight))
        x2d, restore = rows
        dy_rows = _channel_rows(dy if dy.stride() == x.stride() else dy.contiguous(memory_format=_format(x)))
        dx2d, dw, db = self._row_backward(x2d, dy_rows[0], mean.reshape(-1), rstd.reshape(-1), weight, False,
                                          bool(need_dweight))
        return own_tensor(restore(dx2d)), dw, db

    # ------------------------------------------------------------------ in-place activated BatchNorm
    # (csrc/inplace_abn.h; kind and param as normkit.ops_inplace gives them)
    def iabn_forward(self, x, weight, bias, eps, kind, param, in_place):
        if x.numel() == 0:
            return _REF.iabn_forward(x, weight, bias, eps, kind, param, in_place)
        return self._k.iabn_forward.default(x, weight, bias, float(eps), int(kind), float(param), bool(in_place))

    def iabn_apply(self, x, scale, shift, kind, param, in_place):
        if x.numel() == 0:
            return _REF.iabn_apply(x, scale, shift, kind, param, in_place)
        return self._k.iabn_apply.default(x, scale, shift, int(kind), float(param), bool(in_place))

    def iabn_backward(self, src, dy, mean, rstd, weight, bias, kind, param, from_output, need_dx):
        if src.numel() == 0:
            return _REF.iabn_backward(src, dy, mean, rstd, weight, bias, kind, param, from_output, need_dx)
        dx, sum_dz, sum_dz_xhat = self._k.iabn_backward.default(src, dy, mean, rstd, weight, bias, int(kind),
                                                                float(param), bool(from_output), bool(need_dx))
        return (dx if need_dx else None), sum_dz, sum_dz_xhat

    def iabn_backward_reduce(self, src, dy, mean, rstd, weight, bias, kind, param, from_output):
        if src.numel() == 0:
            return _REF.iabn_backward_reduce(src, dy, mean, rstd, weight, bias, kind, param, from_output)
        return self._k.iabn_backward_reduce.default(src, dy, mean, rstd, weight, bias, int(kind), float(param),
                                                    bool(from_output))

    def iabn_backward_dx(self, src, dy, mean, rstd, weight, bias, kind, param, from_output, mean_dz, mean_dz_xhat):
        if src.numel() == 0:
            return _REF.iabn_backward_dx(src, dy, mean, rstd, weight, bias, kind, param, from_output, mean_dz,
                                         mean_dz_xhat)
        return self._k.iabn_backward_dx.default(src, dy, mean, rstd, weight, bias, int(kind), float(param),
                                                bool(from_output), mean_dz, mean_dz_xhat)


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d if x.dim() == 5 else torch.contiguous_format


__all__ = ["CpuBackend"]
