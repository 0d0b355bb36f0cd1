"""The ``cpu`` backend: normkit's backend interface on the Numba kernels of ``kernels/cpu``.

This module only adapts tensors to kernels: it views each tensor as a flat numpy array in its
own memory order (no copies: bfloat16 travels as its int16 bits, float16 as uint16 bits),
picks the loop order for the layout, allocates outputs with torch in the input's memory format,
and, for the separate passes, does the O(C) arithmetic between them (merging partial sums in a
fixed order, forming scale/shift and the backward coefficients) in float64 numpy. Training
BatchNorm (``channel_forward`` / ``channel_backward``) runs as one kernel per direction that does
that arithmetic itself: blocked per channel in NCHW (the second pass reads from cache), in one
call in channels_last; the separate passes remain for SyncBatchNorm, BatchRenorm and NCHW input
with fewer than 8 channels.

Layouts, as the kernels see them:

* contiguous ``(N, C, *spatial)`` with ``S = prod(spatial) > 1`` → NCHW loop order ``(N, C, S)``;
* channels_last 4-D/5-D, 2-D ``(N, C)``, or ``S == 1`` → CL loop order ``(N, S, C)``
  (BatchNorm treats all ``N·S`` positions as one sample: ``(1, N·S, C)``).

Statistics are one pass of shifted sums (see ``kernels/cpu/channel.py``), merged exactly; the
thread count follows ``torch.get_num_threads()``; the order of every reduction depends on the
shape only, so results are bit-identical from run to run and for any thread count.
"""

from __future__ import annotations

import functools
import os

import numba
import numpy as np
import torch

from .backends import OPS, Backend
from .kernels import cpu as K
from .ops import memory_format_of
from .ops_channels import channel_rows as _channel_rows
from .reference import ReferenceBackend, stat_dtype

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_TARGET_BLOCKS = 64  # parallel blocks per reduction in CL order: enough to balance 2-16 threads
_MIN_CHANNELS_WHOLE = 8  # channels below which BatchNorm keeps the row-parallel passes (too few to share out)
_MIN_RUN = 2048  # values per contiguous run below which the prefetcher stalls (blocked BatchNorm kernels)
_MIN_SAMPLES_WHOLE = 8  # samples below which channels_last GroupNorm keeps the position-block passes (likewise)


_POOL_PID: int | None = None  # the process that started numba's thread pool


def _threads() -> None:
    global _POOL_PID
    if _POOL_PID is None:
        _POOL_PID = os.getpid()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _kernel_entry(method):
    """An entry point's preamble: empty input goes to the reference math (nothing to launch), any other
    sets the thread count first."""

    @functools.wraps(method)
    def entry(self, x, *args, **kwargs):
        if x.numel() == 0:
            return getattr(self._fallback, method.__name__)(x, *args, **kwargs)
        _threads()
        return method(self, x, *args, **kwargs)

    return entry


def _forked_pool_problem() -> str | None:
    """Why this process cannot launch kernels, when it was forked from one whose GNU OpenMP pool ran.

    numba's ``omp`` threading layer on GNU OpenMP terminates a forked child at its first parallel
    launch (DataLoader workers, ``fork`` start methods). Refusing here lets ``auto`` fall back to
    the reference backend instead of the process being killed. tbb and workqueue survive forks.
    """
    if _POOL_PID is None or _POOL_PID == os.getpid() or numba.threading_layer() != "omp":
        return None
    return ("numba's OpenMP thread pool does not survive fork() (this process was forked after it started); "
            "use the 'spawn' start method or NUMBA_THREADING_LAYER=workqueue")


def _flat(t: torch.Tensor) -> np.ndarray:
    """``t``'s storage as a 1-D numpy array in memory order (a view, never a copy)."""
    t = t.detach()
    half = t.dtype == torch.float16
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    if t.dim() >= 4 and memory_format_of(t) != torch.contiguous_format:
        t = t.permute(0, *range(2, t.dim()), 1)
    if not t.is_contiguous():
        raise ValueError(f"cpu backend: expected a dense tensor, got strides {t.stride()} "
                         f"for shape {tuple(t.shape)}")
    a = t.numpy().reshape(-1)
    return a.view(np.uint16) if half else a


def _np(v: torch.Tensor | np.ndarray, sd: torch.dtype) -> np.ndarray:
    """A small per-channel vector as a contiguous numpy array of the stat dtype."""
    if isinstance(v, torch.Tensor):
        v = v.detach().to(sd).contiguous().numpy()
    return np.ascontiguousarray(v, dtype=np.float64 if sd == torch.float64 else np.float32).reshape(-1)


def _geometry(x: torch.Tensor) -> tuple[int, int, int, bool]:
    """(N, C, S, channels_last_order) of ``x`` = (N, C, *spatial)."""
    n = x.shape[0]
    c = x.shape[1] if x.dim() > 1 else 1
    s = x.numel() // max(n * c, 1)
    cl = x.dim() == 2 or s == 1 or memory_format_of(x) != torch.contiguous_format
    return n, c, s, cl


def _rows(nn: int, ns: int) -> int:
    """Positions per block in CL order: about :data:`_TARGET_BLOCKS` blocks in all."""
    per_sample = max(1, -(-_TARGET_BLOCKS // max(nn, 1)))
    return max(1, -(-ns // per_sample))


def _dummy(a: np.ndarray) -> np.ndarray:
    return np.zeros(1, dtype=a.dtype)


def _out(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _same(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``t`` in ``x``'s dtype and layout (the ops already give the layout)."""
    if t is None:
        return None
    if t.dtype != x.dtype:
        t = t.to(x.dtype)
    fmt = memory_format_of(x)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _first_values(x: torch.Tensor) -> torch.Tensor:
    """``x[n, c, 0, ...]`` for every (n, c): a sample value per channel, the shift of the sums."""
    return x[(slice(None), slice(None)) + (0,) * (x.dim() - 2)] if x.dim() > 2 else x


class CpuBackend(Backend):
    """Every entry point of :mod:`normkit.backends` on Numba kernels (CPU tensors)."""

    name = "cpu"

    def __init__(self) -> None:
        self._fallback = ReferenceBackend()

    def unsupported(self, op: str, x: torch.Tensor) -> str | None:
        if op not in OPS:
            return f"unknown op {op!r}"
        if x.device.type != "cpu":
            return f"the cpu backend runs CPU tensors, got a {x.device.type} tensor"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} is not one of float32, float64, float16, bfloat16"
        if op.startswith("ln2d_") and _channel_rows(x) is None:
            return "LayerNorm2d on NCHW input needs the column-reduction kernel, not built yet (channels_last runs)"
        return _forked_pool_problem()

    # ------------------------------------------------------------------ channel family
    def _channel_view(self, x):
        """(xa, nn, ns, nc, cl): BatchNorm's view of x — all N·S positions are one sample in CL."""
        n, c, s, cl = _geometry(x)
        return (1, n * s, c, True) if cl else (n, s, c, False)

    def _reduce_blocks(self, parts: np.ndarray, c: int) -> np.ndarray:
        return parts.reshape(-1, c).sum(axis=0)  # numpy's pairwise sum: fixed order

    @_kernel_entry
    def channel_stats(self, x):
        sd = stat_dtype(x.dtype)
        xa = _flat(x)
        nn, ns, nc, cl = self._channel_view(x)
        k = _np(_first_values(x)[0], sd)
        s1, s2 = self._sums(xa, nn, ns, nc, cl, k, False)
        s1, s2 = self._reduce_blocks(s1, nc), self._reduce_blocks(s2, nc)
        count = x.numel() // nc
        d = s1 / count
        mean = k.astype(np.float64) + d
        var = np.maximum(s2 / count - d * d, 0.0)
        return torch.from_numpy(mean).to(sd), torch.from_numpy(var).to(sd)

    def _sums(self, xa, nn, ns, nc, cl, k, per_sample):
        if cl:
            rows = _rows(nn, ns)
            nb = -(-ns // rows)
            s1, s2 = np.empty(nn * nb * nc), np.empty(nn * nb * nc)
            K.sums_cl(xa, nn, ns, nc, rows, k, per_sample, s1, s2)
        else:
            s1, s2 = np.empty(nn * nc), np.empty(nn * nc)
            K.sums_nchw(xa, nn, nc, ns, k, per_sample, s1, s2)
        return s1, s2

    def _apply(self, x, a, b, residual, act, per_sample, nn, ns, nc, cl):
        residual = _same(residual, x)
        out = _out(x)
        xa, oa = _flat(x), _flat(out)
        ra = _flat(residual) if residual is not None else _dummy(xa)
        code = K.ACT_CODES[act]
        if cl:
            K.apply_cl(xa, ra, residual is not None, code, nn, ns, nc, _rows(nn, ns), a, b, per_sample, oa)
        else:
            K.apply_nchw(xa, ra, residual is not None, code, nn, nc, ns, a, b, per_sample, oa)
        return out

    @_kernel_entry
    def channel_apply(self, x, scale, shift, residual, act):
        sd = stat_dtype(x.dtype)
        nn, ns, nc, cl = self._channel_view(x)
        return self._apply(x, _np(scale, sd), _np(shift, sd), residual, act, False, nn, ns, nc, cl)

    def _bwd_sums(self, x, dy, residual, act, fa, fb, m, per_sample, nn, ns, nc, cl):
        xa, da = _flat(x), _flat(_same(dy, x))
        residual = _same(residual, x)
        ra = _flat(residual) if residual is not None else _dummy(xa)
        code, has = K.ACT_CODES[act], residual is not None
        if cl:
            rows = _rows(nn, ns)
            nb = -(-ns // rows)
            sa, sb = np.empty(nn * nb * nc), np.empty(nn * nb * nc)
            K.bwd_sums_cl(xa, da, ra, has, code, nn, ns, nc, rows, fa, fb, m, per_sample, sa, sb)
            return sa.reshape(nn, nb, nc).sum(axis=1), sb.reshape(nn, nb, nc).sum(axis=1)
        sa, sb = np.empty(nn * nc), np.empty(nn * nc)
        K.bwd_sums_nchw(xa, da, ra, has, code, nn, nc, ns, fa, fb, m, per_sample, sa, sb)
        return sa.reshape(nn, nc), sb.reshape(nn, nc)

    def _bwd_dx(self, x, dy, residual, act, fa, fb, p, q, m, r, per_sample, need_dz, nn, ns, nc, cl):
        dy, residual = _same(dy, x), _same(residual, x)
        dx = _out(x)
        dz = _out(x) if need_dz else None
        xa, da, dxa = _flat(x), _flat(dy), _flat(dx)
        ra = _flat(residual) if residual is not None else _dummy(xa)
        dza = _flat(dz) if need_dz else _dummy(xa)
        code, has = K.ACT_CODES[act], residual is not None
        if cl:
            K.bwd_dx_cl(xa, da, ra, has, code, nn, ns, nc, _rows(nn, ns), fa, fb, p, q, m, r, per_sample,
                        need_dz, dxa, dza)
        else:
            K.bwd_dx_nchw(xa, da, ra, has, code, nn, nc, ns, fa, fb, p, q, m, r, per_sample, need_dz,
                          dxa, dza)
        return dx, dz

    @_kernel_entry
    def channel_backward_reduce(self, x, dy, mean, rstd, scale, shift, residual, act):
        sd = stat_dtype(x.dtype)
        nn, ns, nc, cl = self._channel_view(x)
        sa, sb = self._bwd_sums(x, dy, residual, act, _np(scale, sd), _np(shift, sd), _np(mean, sd), False,
                                nn, ns, nc, cl)
        sum_dz = sa.sum(axis=0)
        sum_dz_xhat = sb.sum(axis=0) * _np(rstd, torch.float64)
        return torch.from_numpy(sum_dz).to(sd), torch.from_numpy(sum_dz_xhat).to(sd)

    @_kernel_entry
    def channel_backward_dx(self, x, dy, mean, rstd, scale, shift, residual, act, mean_dz, mean_dz_xhat,
                            need_dz):
        sd = stat_dtype(x.dtype)
        f64 = torch.float64
        sc, rs = _np(scale, f64), _np(rstd, f64)
        p = sc
        q = -sc * rs * _np(mean_dz_xhat, f64)
        r = -sc * _np(mean_dz, f64)
        nn, ns, nc, cl = self._channel_view(x)
        return self._bwd_dx(x, dy, residual, act, _np(scale, sd), _np(shift, sd), _np(p, sd), _np(q, sd),
                            _np(mean, sd), _np(r, sd), False, need_dz, nn, ns, nc, cl)

    def _whole_channels(self, x) -> tuple | None:
        """How the whole-BatchNorm kernels run ``x``, or ``None`` for the composed passes.

        ``("nchw", N, C, S, block)``: the blocked NCHW kernels, from C >= 8 (channels are their
        parallel unit); they win at every size measured, from 3 MB (less launch and merge
        overhead than the separate passes) to 51 MB (x and dy come from memory once).
        ``("cl", positions, C, rows)``: channels_last / BatchNorm1d order, one call instead of
        four. The choice depends on the shape only, never on the thread count (the block
        width, which does, changes no result).
        """
        nn, ns, nc, cl = self._channel_view(x)
        if cl:
            return "cl", ns, nc, _rows(1, ns)
        if nc < _MIN_CHANNELS_WHOLE:
            return None
        return "nchw", nn, nc, ns, min(-(-_MIN_RUN // ns), max(1, nc // (4 * numba.get_num_threads())))

    @_kernel_entry
    def channel_forward(self, x, weight, bias, eps, residual, act):
        plan = self._whole_channels(x)
        if plan is None:
            return super().channel_forward(x, weight, bias, eps, residual, act)
        nc = plan[2]
        sd = stat_dtype(x.dtype)
        npd = np.float64 if sd == torch.float64 else np.float32
        residual = _same(residual, x)
        y = _out(x)
        xa = _flat(x)
        ra = _flat(residual) if residual is not None else _dummy(xa)
        w = _np(weight, sd) if weight is not None else np.ones(nc, dtype=npd)
        b = _np(bias, sd) if bias is not None else np.zeros(nc, dtype=npd)
        mean, var = np.empty(nc, dtype=npd), np.empty(nc, dtype=npd)
        head = (xa, ra, residual is not None, K.ACT_CODES[act])
        if plan[0] == "cl":
            K.bn_forward_cl(*head, *plan[1:], w, b, float(eps), _flat(y), mean, var)
        else:
            K.bn_forward_nchw(*head, *plan[1:4], w, b, float(eps), plan[4], _flat(y), mean, var)
        return y, torch.from_numpy(mean), torch.from_numpy(var)

    @_kernel_entry
    def channel_backward(self, x, dy, mean, rstd, scale, shift, residual, act, batch_stats, need_dz):
        plan = self._whole_channels(x)
        if plan is None:
            return super().channel_backward(x, dy, mean, rstd, scale, shift, residual, act, batch_stats, need_dz)
        nc = plan[2]
        sd = stat_dtype(x.dtype)
        npd = np.float64 if sd == torch.float64 else np.float32
        dy, residual = _same(dy, x), _same(residual, x)
        dx = _out(x)
        dz = _out(x) if need_dz else None
        xa = _flat(x)
        ra = _flat(residual) if residual is not None else _dummy(xa)
        dza = _flat(dz) if need_dz else _dummy(xa)
        sum_dz, sum_dz_xhat = np.empty(nc, dtype=npd), np.empty(nc, dtype=npd)
        head = (xa, _flat(dy), ra, residual is not None, K.ACT_CODES[act])
        coeffs = (_np(scale, sd), _np(shift, sd), _np(mean, sd), _np(rstd, sd), bool(batch_stats), bool(need_dz))
        if plan[0] == "cl":
            K.bn_backward_cl(*head, *plan[1:], *coeffs, _flat(dx), dza, sum_dz, sum_dz_xhat)
        else:
            K.bn_backward_nchw(*head, *plan[1:4], *coeffs, plan[4], _flat(dx), dza, sum_dz, sum_dz_xhat)
        return dx, torch.from_numpy(sum_dz), torch.from_numpy(sum_dz_xhat), dz

    # ------------------------------------------------------------------ row family: LN, RMS
    @_kernel_entry
    def row_forward(self, x2d, weight, bias, eps, rms):
        m, k = x2d.shape
        sd = stat_dtype(x2d.dtype)
        x2d = x2d.contiguous()
        y = torch.empty_like(x2d)
        npd = np.float64 if sd == torch.float64 else np.float32
        mean, rstd = np.empty(m, dtype=npd), np.empty(m, dtype=npd)
        w = _np(weight, sd) if weight is not None else np.ones(k, npd)
        b = _np(bias, sd) if bias is not None else np.zeros(k, npd)
        K.row_fwd(_flat(x2d), m, k, w, b, float(eps), bool(rms), _flat(y), mean, rstd)
        return y, (None if rms else torch.from_numpy(mean)), torch.from_numpy(rstd)

    @_kernel_entry
    def row_backward(self, x2d, dy2d, mean, rstd, weight, rms, need_dweight):
        m, k = x2d.shape
        sd = stat_dtype(x2d.dtype)
        x2d = x2d.contiguous()
        dy2d = _same(dy2d, x2d)
        dx = torch.empty_like(x2d)
        rows = max(1, -(-m // _TARGET_BLOCKS))
        nb = -(-m // rows)
        dwp = np.empty(nb * k if need_dweight else 1)
        dbp = np.empty(nb * k if need_dweight and not rms else 1)
        rs = _np(rstd, sd)
        mu = _np(mean, sd) if not rms else np.zeros(1, dtype=rs.dtype)
        w = _np(weight, sd) if weight is not None else np.ones(k, dtype=rs.dtype)
        K.row_bwd(_flat(x2d), _flat(dy2d), m, k, mu, rs, w, bool(rms), bool(need_dweight), rows, _flat(dx),
                  dwp, dbp)
        if not need_dweight:
            return dx, None, None
        dw = torch.from_numpy(dwp.reshape(nb, k).sum(axis=0)).to(sd)
        db = None if rms else torch.from_numpy(dbp.reshape(nb, k).sum(axis=0)).to(sd)
        return dx, dw, db

    # ------------------------------------------------------------------ row family: GN, IN
    def _group_view(self, x):
        n, c, s, cl = _geometry(x)
        return n, s, c, cl

    def _expand(self, v: np.ndarray, n: int, g: int, cg: int) -> np.ndarray:
        """(N, G) → (N, C): each group's value repeated over its channels."""
        return np.repeat(v.reshape(n, g), cg, axis=1)

    @_kernel_entry
    def group_forward(self, x, num_groups, weight, bias, eps, residual, act):
        sd = stat_dtype(x.dtype)
        n, s, c, cl = self._group_view(x)
        g, cg = num_groups, c // num_groups
        if not cl or n >= _MIN_SAMPLES_WHOLE:
            return self._group_forward_whole(x, g, weight, bias, eps, residual, act, n, s, c, sd, cl)
        first = _first_values(x).to(torch.float64).reshape(n, g, cg)[:, :, 0].numpy()  # shift per group
        k = _np(self._expand(first, n, g, cg), sd)
        s1, s2 = self._sums(_flat(x), n, s, c, cl, k, True)
        s1 = s1.reshape(n, -1, c).sum(axis=1).reshape(n, g, cg).sum(axis=2)
        s2 = s2.reshape(n, -1, c).sum(axis=1).reshape(n, g, cg).sum(axis=2)
        count = cg * s
        d = s1 / count
        kg = k.astype(np.float64).reshape(n, g, cg)[:, :, 0]
        mean = kg + d
        var = np.maximum(s2 / count - d * d, 0.0)
        # rstd as torch computes it in the stat dtype, so forward and backward agree bit for bit
        rstd = torch.rsqrt(torch.from_numpy(var).to(sd) + eps).to(torch.float64).numpy()
        w = _np(weight, torch.float64) if weight is not None else np.ones(c)
        b = _np(bias, torch.float64) if bias is not None else np.zeros(c)
        a = self._expand(rstd, n, g, cg) * w
        sh = b - self._expand(mean, n, g, cg) * a
        y = self._apply(x, _np(a, sd), _np(sh, sd), residual, act, True, n, s, c, cl)
        return y, torch.from_numpy(mean).to(sd), torch.from_numpy(var).to(sd)

    def _group_forward_whole(self, x, g, weight, bias, eps, residual, act, n, s, c, sd, cl):
        """One kernel reading each (sample, group) block (NCHW) or sample (channels_last) once."""
        residual = _same(residual, x)
        y = _out(x)
        xa = _flat(x)
        ra = _flat(residual) if residual is not None else _dummy(xa)
        npd = np.float64 if sd == torch.float64 else np.float32
        mean, var = np.empty(n * g, dtype=npd), np.empty(n * g, dtype=npd)
        w = _np(weight, sd) if weight is not None else np.ones(c, dtype=npd)
        b = _np(bias, sd) if bias is not None else np.zeros(c, dtype=npd)
        kernel = K.group_fwd_cl if cl else K.group_fwd_nchw
        kernel(xa, ra, residual is not None, K.ACT_CODES[act], *((n, s, c) if cl else (n, c, s)), g, w, b, float(eps),
               _flat(y), mean, var)
        return y, torch.from_numpy(mean).view(n, g), torch.from_numpy(var).view(n, g)

    def _group_backward_whole(self, x, dy, mean, rstd, g, weight, bias, residual, act, need_dweight, need_dz,
                              n, s, c, sd, cl):
        dy, residual = _same(dy, x), _same(residual, x)
        dx = _out(x)
        dz = _out(x) if need_dz else None
        xa = _flat(x)
        ra = _flat(residual) if residual is not None else _dummy(xa)
        npd = np.float64 if sd == torch.float64 else np.float32
        w = _np(weight, sd) if weight is not None else np.ones(c, dtype=npd)
        b = _np(bias, sd) if bias is not None else np.zeros(c, dtype=npd)
        sa, sb = np.empty(n * c), np.empty(n * c)
        dza = _flat(dz) if need_dz else _dummy(xa)
        kernel = K.group_bwd_cl if cl else K.group_bwd_nchw
        kernel(xa, _flat(dy), ra, residual is not None, K.ACT_CODES[act], *((n, s, c) if cl else (n, c, s)), g,
               _np(mean, sd), _np(rstd, sd), w, b, need_dz, _flat(dx), dza, sa, sb)
        if not need_dweight:
            return dx, None, None, dz
        dw = torch.from_numpy(sb.reshape(n, c).sum(axis=0)).to(sd)
        db = torch.from_numpy(sa.reshape(n, c).sum(axis=0)).to(sd)
        return dx, dw, db, dz

    @_kernel_entry
    def group_backward(self, x, dy, mean, rstd, num_groups, weight, bias, residual, act, need_dweight,
                       need_dz):
        sd = stat_dtype(x.dtype)
        f64 = torch.float64
        n, s, c, cl = self._group_view(x)
        g, cg = num_groups, c // num_groups
        if not cl or n >= _MIN_SAMPLES_WHOLE:
            return self._group_backward_whole(x, dy, mean, rstd, g, weight, bias, residual, act, need_dweight,
                                              need_dz, n, s, c, sd, cl)
        mc = self._expand(_np(mean, f64), n, g, cg)
        rc = self._expand(_np(rstd, f64), n, g, cg)
        w = _np(weight, f64) if weight is not None else np.ones(c)
        b = _np(bias, f64) if bias is not None else np.zeros(c)
        fa = rc * w
        fb = b - mc * fa
        fa_s, fb_s, m_s = _np(fa, sd), _np(fb, sd), _np(mc, sd)
        sa, sb = self._bwd_sums(x, dy, residual, act, fa_s, fb_s, m_s, True, n, s, c, cl)
        sbx = sb * rc  # Σ_s dz·x̂ per (n, c)
        count = cg * s
        mg = (sa * w).reshape(n, g, cg).sum(axis=2) / count
        mgx = (sbx * w).reshape(n, g, cg).sum(axis=2) / count
        p = rc * w
        q = -rc * rc * self._expand(mgx, n, g, cg)
        r = -rc * self._expand(mg, n, g, cg)
        dx, dz = self._bwd_dx(x, dy, residual, act, fa_s, fb_s, _np(p, sd), _np(q, sd), m_s, _np(r, sd), True,
                              need_dz, n, s, c, cl)
        dw = torch.from_numpy(sbx.sum(axis=0)).to(sd) if need_dweight else None
        db = torch.from_numpy(sa.sum(axis=0)).to(sd) if need_dweight else None
        return dx, dw, db, dz


    # ------------------------------------------------------------------ LayerNorm over channels (2d)
    # channels_last: the (N·S, C) view of x is a contiguous row matrix, so the row kernels run it as is.
    def ln2d_forward(self, x, weight, bias, eps):
        x2d, restore = _channel_rows(x)
        y2d, mean, rstd = self.row_forward(x2d, weight, bias, eps, False)
        stat_shape = (x.shape[0], *x.shape[2:])
        return restore(y2d), mean.view(stat_shape), rstd.view(stat_shape)

    def ln2d_backward(self, x, dy, mean, rstd, weight, need_dweight):
        x2d, restore = _channel_rows(x)
        dy2d, _ = _channel_rows(_same(dy, x))
        dx2d, dw, db = self.row_backward(x2d, dy2d, mean.reshape(-1), rstd.reshape(-1), weight, False,
                                         need_dweight)
        return restore(dx2d), dw, db


__all__ = ["CpuBackend"]
