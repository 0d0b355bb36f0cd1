"""The ``triton`` backend: normkit's backend interface on the Triton kernels of
:mod:`normkit.kernels.triton` (the default for CUDA tensors under ``NORMKIT_BACKEND=auto``).

Every entry point of :mod:`normkit.backends` is implemented, with the fused ``residual`` and
``act`` (every activation of :mod:`normkit.activations`: the launchers take its int64 code, the kernels its kind
as a constexpr and leaky ReLU's / ELU's parameter as a runtime float) of the channel and group families:

=========================  ========================================================
channel_stats              split per-channel (mean, M2) + Chan merge (2 kernels)
channel_apply              one elementwise kernel
channel_backward_reduce    split Σdz, Σdz·x̂ + fixed-order sum (2 kernels)
channel_backward_dx        one elementwise kernel (dx and optionally dz)
row_forward                one program per row; rows longer than a block in two passes
row_backward               P programs over row ranges; dγ/dβ from P partial rows
group_forward              one program per (sample, group), NCHW or channels_last
group_backward             same, dγ/dβ from N per-sample shares
=========================  ========================================================

Where it runs: CUDA tensors; CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1`` in the environment *before* the kernels are first loaded — slow, meant
for tests). Input: float32, float16, bfloat16 with float32 statistics. float64 is refused
(``unsupported`` says so; the ``reference`` backend computes it), as are tensors of 2³¹ or
more elements (the kernels use 32-bit offsets). Results are deterministic: no atomics, and the
work split depends only on the shape and the device.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from .activations import code as _code
from .backends import OPS, Backend
from .ops_channels import channel_rows
from .reference import ReferenceBackend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_NUMEL = 2**31 - 1

# Launch parameters. Tests shrink them (see :func:`tuning`) to reach the split paths — rows longer
# than one block, reductions split across several programs — on tiny, interpreter-sized shapes.
_TUNING: dict[str, int | None] = {
    "row_max_block": 8192,        # longest row kept in registers (LayerNorm/RMSNorm)
    "channel_tile": 2048,         # elements per reduction tile (BatchNorm statistics / backward)
    "group_tile": 2048,           # elements per GroupNorm tile
    "elementwise_block": 1024,    # elements per program of the elementwise kernels
    "programs": None,             # programs to aim for; None = 4 per SM (CUDA) or 4 (interpreter)
    "row_chunk": 128,             # rows of LayerNorm/RMSNorm dγ/dβ summed in fp32 before an fp64 add
    "ln2d_block_c": None,         # channels per tile of the NCHW LayerNorm2d kernels (None: up to 4096/64)
}


@contextlib.contextmanager
def tuning(**overrides: int | None) -> Iterator[None]:
    """Temporarily change launch parameters (a test hook), e.g. ``tuning(row_max_block=16)``."""
    unknown = set(overrides) - set(_TUNING)
    if unknown:
        raise ValueError(f"tuning: unknown parameter(s) {sorted(unknown)}; expected some of "
                         f"{sorted(_TUNING)}")
    saved = dict(_TUNING)
    _TUNING.update(overrides)
    try:
        yield
    finally:
        _TUNING.clear()
        _TUNING.update(saved)


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


_REFERENCE = ReferenceBackend()  # empty tensors only: nothing to launch


def _dense_like(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``t`` with exactly ``x``'s strides (the kernels index x, dy and residual alike)."""
    if t is None or t.stride() == x.stride():
        return t
    fmt = torch.contiguous_format if x.is_contiguous() else (
        torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return t.contiguous(memory_format=fmt)


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    """Statistics and affine vectors as contiguous tensors (kernels read them with stride 1)."""
    return None if t is None else t.contiguous()


def _stat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _on(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it x's (x may live on cuda:1)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


class TritonBackend(Backend):
    name = "triton"

    def __init__(self) -> None:
        self._programs: dict[torch.device, int] = {}
        self._loaded = None  # the kernel package, imported on first use (not by normkit.info / available())
        try:
            found = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            found = False
        self._missing = None if found else "triton is not importable (not installed)"

    @property
    def _k(self):
        """The kernel package. Imported lazily: ``triton.jit`` fixes at import time whether it builds
        GPU kernels or interpreter objects, so importing must wait until a tensor needs it."""
        if self._loaded is None and self._missing is None:
            try:
                self._loaded = importlib.import_module("normkit.kernels.triton")
            except (ImportError, RuntimeError) as err:  # a triton without a usable backend
                self._missing = f"triton is not importable ({type(err).__name__}: {err})"
        return self._loaded

    # ------------------------------------------------------------------ selection
    def unsupported(self, op: str, x: torch.Tensor) -> str | None:
        if self._missing is not None:
            return self._missing
        if op not in OPS:
            return f"unknown op {op!r}; expected one of {OPS}"
        if x.dtype not in _DTYPES:
            return (f"the Triton kernels take float32, float16 or bfloat16 (fp32 statistics), got {x.dtype}; "
                    "use the 'reference' backend for float64")
        if x.numel() > _MAX_NUMEL:
            return f"the Triton kernels use 32-bit offsets: at most {_MAX_NUMEL} elements, got {x.numel()}"
        if x.device.type == "cpu" and not interpret_requested():
            return "CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1"
        if x.device.type not in ("cuda", "cpu"):
            return f"the Triton kernels run on CUDA devices (or the CPU interpreter), got device {x.device}"
        if self._k is None:
            return self._missing
        if x.device.type == "cpu" and not self._k.INTERPRETED:
            return ("the Triton kernels were loaded before TRITON_INTERPRET=1 was set; set it before "
                    "normkit first uses the triton backend")
        return None

    def _target_programs(self, x: torch.Tensor) -> int:
        if _TUNING["programs"] is not None:
            return int(_TUNING["programs"])
        if x.device.type != "cuda":
            return 4  # the interpreter runs programs one after another: keep grids small
        if x.device not in self._programs:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            self._programs[x.device] = 4 * sms
        return self._programs[x.device]

    # ------------------------------------------------------------------ channel family (BN)
    def channel_stats(self, x):
        if x.numel() == 0:
            return _REFERENCE.channel_stats(x)
        with _on(x):
            return self._k.channel_stats(x, programs=self._target_programs(x), tile=_TUNING["channel_tile"])

    def channel_apply(self, x, scale, shift, residual, act):
        if x.numel() == 0:
            return _REFERENCE.channel_apply(x, scale, shift, residual, act)
        with _on(x):
            return self._k.channel_apply(x, _stat(scale), _stat(shift), _dense_like(residual, x), _code(act),
                                         block=_TUNING["elementwise_block"])

    def channel_backward_reduce(self, x, dy, mean, rstd, scale, shift, residual, act):
        if x.numel() == 0:
            return _REFERENCE.channel_backward_reduce(x, dy, mean, rstd, scale, shift, residual, act)
        with _on(x):
            return self._k.channel_backward_reduce(
                x, _dense_like(dy, x), _dense_like(residual, x), _stat(mean), _stat(rstd), _stat(scale),
                _stat(shift), _code(act), programs=self._target_programs(x), tile=_TUNING["channel_tile"],
            )

    def channel_backward_dx(self, x, dy, mean, rstd, scale, shift, residual, act, mean_dz, mean_dz_xhat,
                            need_dz):
        if x.numel() == 0:
            return _REFERENCE.channel_backward_dx(x, dy, mean, rstd, scale, shift, residual, act, mean_dz,
                                                  mean_dz_xhat, need_dz)
        with _on(x):
            return self._k.channel_backward_dx(
                x, _dense_like(dy, x), _dense_like(residual, x), _stat(mean), _stat(rstd), _stat(scale),
                _stat(shift), _code(act), _stat(mean_dz), _stat(mean_dz_xhat), bool(need_dz),
                block=_TUNING["elementwise_block"],
            )

    # ------------------------------------------------------------------ row family (LN, RMS)
    def row_forward(self, x2d, weight, bias, eps, rms):
        if x2d.numel() == 0:
            return _REFERENCE.row_forward(x2d, weight, bias, eps, rms)
        with _on(x2d):
            return self._k.row_forward(x2d.contiguous(), _vec(weight), _vec(bias), float(eps), bool(rms),
                                       max_block=_TUNING["row_max_block"])

    def row_backward(self, x2d, dy2d, mean, rstd, weight, rms, need_dweight):
        if x2d.numel() == 0:
            return _REFERENCE.row_backward(x2d, dy2d, mean, rstd, weight, rms, need_dweight)
        with _on(x2d):
            dx, dw, db = self._k.row_backward(
                x2d.contiguous(), dy2d.contiguous(), _stat(mean), _stat(rstd), _vec(weight), bool(rms),
                bool(need_dweight), programs=self._target_programs(x2d), max_block=_TUNING["row_max_block"],
                row_chunk=_TUNING["row_chunk"],
            )
        return dx, dw, (None if rms else db)  # RMSNorm has no bias

    # ------------------------------------------------------------------ row family (GN, IN)
    def group_forward(self, x, num_groups, weight, bias, eps, residual, act):
        if x.numel() == 0:
            return _REFERENCE.group_forward(x, num_groups, weight, bias, eps, residual, act)
        with _on(x):
            return self._k.group_forward(x, int(num_groups), _vec(weight), _vec(bias), float(eps),
                                         _dense_like(residual, x), _code(act), tile=_TUNING["group_tile"])

    def group_backward(self, x, dy, mean, rstd, num_groups, weight, bias, residual, act, need_dweight,
                       need_dz):
        if x.numel() == 0:
            return _REFERENCE.group_backward(x, dy, mean, rstd, num_groups, weight, bias, residual, act,
                                             need_dweight, need_dz)
        with _on(x):
            return self._k.group_backward(
                x, _dense_like(dy, x), _stat(mean), _stat(rstd), int(num_groups), _vec(weight), _vec(bias),
                _dense_like(residual, x), _code(act), bool(need_dweight), bool(need_dz), tile=_TUNING["group_tile"],
            )

    # ------------------------------------------------------------------ LayerNorm over channels (2d)
    def ln2d_forward(self, x, weight, bias, eps):
        rows = channel_rows(x)
        if x.numel() == 0:
            return _REFERENCE.ln2d_forward(x, weight, bias, eps)
        stat_shape = (x.shape[0], *x.shape[2:])
        if rows is not None:  # channels_last: the (N·S, C) row matrix, on the row kernels
            y2d, mean, rstd = self.row_forward(rows[0], weight, bias, eps, False)
            return rows[1](y2d), mean.view(stat_shape), rstd.view(stat_shape)
        with _on(x):
            return self._k.ln2d_forward(x, _vec(weight), _vec(bias), float(eps), block_c=_TUNING["ln2d_block_c"])

    def ln2d_backward(self, x, dy, mean, rstd, weight, need_dweight):
        if x.numel() == 0:
            return _REFERENCE.ln2d_backward(x, dy, mean, rstd, weight, need_dweight)
        rows = channel_rows(x)
        if rows is not None:
            dy2d = channel_rows(_dense_like(dy, x))[0]
            dx2d, dw, db = self.row_backward(rows[0], dy2d, mean.reshape(-1), rstd.reshape(-1), weight, False,
                                             need_dweight)
            return rows[1](dx2d), dw, db
        with _on(x):
            return self._k.ln2d_backward(x, _dense_like(dy, x), _stat(mean), _stat(rstd), _vec(weight),
                                         bool(need_dweight), block_c=_TUNING["ln2d_block_c"])

    # ------------------------------------------------------------------ in-place activated BatchNorm
    # (kernels/triton/inplace_abn.py; iabn_forward and iabn_backward are the interface's compositions:
    # channel_stats + iabn_apply, and the reduce + dx kernels)
    @property
    def _iabn(self):
        self._k  # noqa: B018 - the kernel package first (it fixes interpreter vs GPU)
        return importlib.import_module("normkit.kernels.triton.inplace_abn")

    @staticmethod
    def _iabn_constants(mean, rstd, weight, bias, from_output):
        """(centre, factor, scale, shift) per channel, fp32 contiguous (normkit.ops_inplace's formulas)."""
        from .backends import scale_shift

        mean, rstd = mean.to(torch.float32), rstd.to(torch.float32)
        scale, shift = scale_shift(weight, bias, mean, rstd)
        if from_output:
            centre = bias.to(torch.float32) if bias is not None else torch.zeros_like(mean)
            factor = 1.0 / weight.to(torch.float32) if weight is not None else torch.ones_like(mean)
        else:
            centre, factor = mean, rstd
        return tuple(t.contiguous() for t in (centre, factor, scale, shift))

    def iabn_apply(self, x, scale, shift, kind, param, in_place):
        if x.numel() == 0:
            return _REFERENCE.iabn_apply(x, scale, shift, kind, param, in_place)
        with _on(x):
            return self._iabn.iabn_apply(x, _stat(scale), _stat(shift), kind, param, in_place,
                                         block=_TUNING["elementwise_block"])

    def iabn_backward_reduce(self, src, dy, mean, rstd, weight, bias, kind, param, from_output):
        if src.numel() == 0:
            return _REFERENCE.iabn_backward_reduce(src, dy, mean, rstd, weight, bias, kind, param, from_output)
        centre, factor, scale, shift = self._iabn_constants(mean, rstd, weight, bias, from_output)
        with _on(src):
            s1, s2 = self._iabn.iabn_backward_reduce(src, _dense_like(dy, src), centre, scale, shift, kind, param,
                                                     from_output, programs=self._target_programs(src),
                                                     tile=_TUNING["channel_tile"])
        return s1.to(torch.float32), (s2 * factor.to(torch.float64)).to(torch.float32)

    def iabn_backward_dx(self, src, dy, mean, rstd, weight, bias, kind, param, from_output, mean_dz, mean_dz_xhat):
        if src.numel() == 0:
            return _REFERENCE.iabn_backward_dx(src, dy, mean, rstd, weight, bias, kind, param, from_output, mean_dz,
                                               mean_dz_xhat)
        centre, factor, scale, shift = self._iabn_constants(mean, rstd, weight, bias, from_output)
        s64 = scale.to(torch.float64)
        q = (-s64 * factor.to(torch.float64) * mean_dz_xhat.to(torch.float64)).to(torch.float32)
        r = (-s64 * mean_dz.to(torch.float64)).to(torch.float32)
        with _on(src):
            return self._iabn.iabn_backward_dx(src, _dense_like(dy, src), centre, scale, shift, q, r, kind, param,
                                               from_output, block=_TUNING["elementwise_block"])
