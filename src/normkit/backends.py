"""Which backend computes an op, and the interface every backend implements.

A *backend* is an object with the kernel entry points of DESIGN.md §1 for the two kernel
families. The custom ops in :mod:`normkit.ops` call ``resolve(x)`` at run time and hand the
tensors to the backend it returns; backends never see modules, parameters or buffers.

Selection
---------
``NORMKIT_BACKEND`` (environment) or ``with normkit.backend(name):`` chooses one of
``auto`` (default), ``reference``, ``cpu``, ``triton``.

* An explicit choice that cannot run the tensor at hand (missing package, wrong device,
  unsupported dtype) raises :class:`BackendUnavailableError` naming the reason.
* ``auto`` tries, in order, ``triton`` (CUDA tensors) → ``cpu`` (CPU tensors) → ``reference``
  and uses the first that can run; when a preferred backend exists but cannot run, it warns
  once per (backend, reason) and falls back.

The interface (every tensor argument is a ``torch.Tensor``; "stat dtype" is float32, or
float64 for float64 input)
-------------------------------------------------------------------------------------

Channel family — BatchNorm and friends. ``x`` is ``(N, C, *spatial)`` in any dense layout
(contiguous or channels_last); statistics are per channel ``C`` over ``N × spatial``:

``channel_stats(x) -> (mean, var)``
    per-channel mean and *biased* variance, shape ``(C,)``, stat dtype. Together with
    ``count = x.numel() // C`` they are the mergeable triple (count, mean, m2 = var·count).
    Must be exact for large means (two-pass or Welford, never E[x²] − E[x]²).

``channel_apply(x, scale, shift, residual, act) -> y``
    ``y = act(x · scale[c] + shift[c] + residual)`` with ``scale = γ·rstd`` and
    ``shift = β − mean·scale`` precomputed (stat dtype, ``(C,)``); ``residual`` is ``None`` or
    shaped like ``x``; ``act`` is ``""`` (identity), ``"relu"``, ``"silu"`` or ``"gelu"``
    (exact erf GELU). ``y`` has ``x``'s dtype and memory format.

``channel_backward_reduce(x, dy, mean, rstd, scale, shift, residual, act) -> (sum_dz, sum_dz_xhat)``
    with ``z = x·scale + shift + residual`` the pre-activation and ``dz = dy · act'(z)``:
    ``sum_dz = Σ dz`` and ``sum_dz_xhat = Σ dz · (x − mean)·rstd`` per channel, stat dtype.
    These are dβ and dγ, and the two sums SyncBatchNorm all-reduces before forming dx.

``channel_backward_dx(x, dy, mean, rstd, scale, shift, residual, act, mean_dz, mean_dz_xhat, need_dz)
-> (dx, dz)``
    ``dx = scale · (dz − mean_dz − x̂ · mean_dz_xhat)`` per element, with ``x̂ = (x−mean)·rstd``.
    Training passes ``mean_dz = sum_dz / count`` (and likewise for the second sum); eval mode
    (running statistics, which are constants) passes zeros. ``dz`` (the residual's gradient)
    is returned only when ``need_dz`` is true, else ``None``. ``dx``/``dz`` have ``x``'s dtype
    and memory format.

Whole-BatchNorm entry points. The channel family's four passes are what SyncBatchNorm and
BatchRenorm need (they act between them); plain BatchNorm calls two composed entry points,
which :class:`Backend` implements with the four above and a backend may override with kernels
that keep data in cache between the passes:

``channel_forward(x, weight, bias, eps, residual, act) -> (y, mean, var)``
    training BatchNorm: ``channel_stats``, ``scale = γ·rsqrt(var + eps)``, ``shift = β −
    mean·scale`` (see :func:`scale_shift`), ``channel_apply``.

``channel_backward(x, dy, mean, rstd, scale, shift, residual, act, batch_stats, need_dz)
-> (dx, sum_dz, sum_dz_xhat, dz)``
    ``channel_backward_reduce``, then ``channel_backward_dx`` with ``mean_dz = sum_dz / count``
    (and likewise ``mean_dz_xhat``) when ``batch_stats``, zeros otherwise.

Row family — LayerNorm, RMSNorm (rows of a 2-D contiguous view) and GroupNorm,
InstanceNorm (``x`` is ``(N, C, *spatial)``, statistics per (sample, group)):

``row_forward(x2d, weight, bias, eps, rms) -> (y2d, mean, rstd)``
    ``x2d`` is ``(M, K)`` contiguous; per row ``mean`` and ``rstd = 1/sqrt(var + eps)``
    (stat dtype, ``(M,)``); ``weight``/``bias`` are ``(K,)`` or ``None``. With ``rms=True``
    there is no centring: ``rstd = 1/sqrt(mean(x²) + eps)`` and ``mean`` is returned as
    ``None``.

``row_backward(x2d, dy2d, mean, rstd, weight, rms, need_dweight) -> (dx2d, dweight, dbias)``
    ``dx = rstd · (g − mean(g) − x̂ · mean(g·x̂))`` with ``g = dy·γ`` (RMS: without the
    ``mean(g)`` term and with ``x̂ = x·rstd``); ``dweight = Σ_rows dy·x̂`` and
    ``dbias = Σ_rows dy`` in stat dtype when ``need_dweight``, else ``None`` (``dbias`` is
    ``None`` for RMS, which has no bias).

``group_forward(x, num_groups, weight, bias, eps, residual, act) -> (y, mean, var)``
    GroupNorm: statistics per (sample, group) over ``C/G × spatial``; ``mean``/``var``
    (biased) shaped ``(N, G)`` in stat dtype; per-channel affine ``(C,)`` or ``None``;
    ``y = act(x̂·γ + β + residual)``. InstanceNorm is ``num_groups = C``.

``group_backward(x, dy, mean, rstd, num_groups, weight, bias, residual, act, need_dweight, need_dz)
-> (dx, dweight, dbias, dz)``
    the GroupNorm backward, ``dweight``/``dbias`` ``(C,)`` in stat dtype or ``None``;
    ``dz`` as for the channel family.

LayerNorm over channels — LayerNorm2d (:mod:`normkit.ops_channels`). ``x`` is ``(N, C, *spatial)``
contiguous or channels_last; statistics per position ``(n, s)`` over the ``C`` channels:

``ln2d_forward(x, weight, bias, eps) -> (y, mean, rstd)``
    ``y = γ_c·(x − μ)·rstd + β_c`` in ``x``'s dtype and memory format; ``mean``/``rstd`` shaped
    ``(N, *spatial)`` in stat dtype; ``weight``/``bias`` ``(C,)`` or ``None``. channels_last
    input is the row family on the ``(N·S, C)`` view (no copy); NCHW needs a reduction across
    strided channels.

``ln2d_backward(x, dy, mean, rstd, weight, need_dweight) -> (dx, dweight, dbias)``
    ``dx = rstd·(g − mean_c(g) − x̂·mean_c(g·x̂))`` with ``g = γ·dy``; ``dweight = Σ dy·x̂`` and
    ``dbias = Σ dy`` over ``(n, s)`` in stat dtype when ``need_dweight``, else ``None``.

A backend may implement a subset: ``unsupported(op, x)`` returns ``None`` when it can run
``op`` (one of the method names above) on ``x``, else a short reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

BACKEND_NAMES = ("auto", "reference", "cpu", "triton")
ENV_VAR = "NORMKIT_BACKEND"
try:  # the key as os.environ stores it (bytes on POSIX), and the store (mutated in place by os.environ[...] = )
    _ENV_KEY = os.environ.encodekey(ENV_VAR)
    _ENV_DATA = os.environ._data
except AttributeError:  # pragma: no cover - a Python without these internals
    _ENV_KEY = _ENV_DATA = None

OPS = (
    "channel_stats",
    "channel_apply",
    "channel_backward_reduce",
    "channel_backward_dx",
    "channel_forward",
    "channel_backward",
    "row_forward",
    "row_backward",
    "group_forward",
    "group_backward",
    "ln2d_forward",
    "ln2d_backward",
)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given tensor."""


class Backend:
    """Base class: the interface documented in this module's docstring."""

    name: str = "?"

    def unsupported(self, op: str, x: torch.Tensor) -> str | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def channel_forward(self, x, weight, bias, eps, residual, act):
        mean, var = self.channel_stats(x)
        scale, shift = scale_shift(weight, bias, mean, torch.rsqrt(var + eps))
        return self.channel_apply(x, scale, shift, residual, act), mean, var

    def channel_backward(self, x, dy, mean, rstd, scale, shift, residual, act, batch_stats, need_dz):
        sum_dz, sum_dz_xhat = self.channel_backward_reduce(x, dy, mean, rstd, scale, shift, residual, act)
        if batch_stats:
            count = max(x.numel() // max(x.shape[1] if x.dim() > 1 else 1, 1), 1)
            mean_dz, mean_dz_xhat = sum_dz / count, sum_dz_xhat / count
        else:
            mean_dz, mean_dz_xhat = torch.zeros_like(sum_dz), torch.zeros_like(sum_dz)
        dx, dz = self.channel_backward_dx(x, dy, mean, rstd, scale, shift, residual, act, mean_dz, mean_dz_xhat,
                                          need_dz)
        return dx, sum_dz, sum_dz_xhat, dz


def scale_shift(weight, bias, mean, rstd):
    """Per-channel ``scale = γ·rstd`` and ``shift = β − mean·scale`` in the statistics' dtype."""
    scale = rstd if weight is None else weight.to(rstd.dtype) * rstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(rstd.dtype)
    return scale, shift


# name -> zero-argument factory returning a Backend, or raising ImportError/RuntimeError with
# the reason it cannot be built here (e.g. the C++ extension not built). Factories run lazily, once.
_FACTORIES: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend | str] = {}  # a Backend, or the reason building it failed
_WARNED: set[tuple[str, str]] = set()
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("normkit_backend", default=None)


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make ``factory`` the provider of backend ``name`` (one of :data:`BACKEND_NAMES`)."""
    if name not in BACKEND_NAMES or name == "auto":
        raise ValueError(f"backend name must be one of {BACKEND_NAMES[1:]}, got {name!r}")
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def _instance(name: str) -> Backend | str:
    """The backend called ``name``, or a string saying why it cannot be had here."""
    if name not in _INSTANCES:
        factory = _FACTORIES.get(name)
        if factory is None:
            _INSTANCES[name] = f"backend {name!r} is not part of this build of normkit"
        else:
            try:
                _INSTANCES[name] = factory()
            except (ImportError, RuntimeError) as err:
                _INSTANCES[name] = f"backend {name!r} cannot be loaded: {err}"
    return _INSTANCES[name]


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def current() -> str:
    """The requested backend name: the innermost ``normkit.backend(...)``, else the environment."""
    name = _current.get()
    if name is None:
        # os.environ's own store, read in place (every call of every layer asks; os.environ.get costs a
        # microsecond of key encoding)
        raw = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else _env_backend()
        if raw is None:
            return "auto"
        raw = os.environ.decodevalue(raw) if isinstance(raw, bytes) else raw
        name = "auto" if raw == "auto" else _check_name(raw or "auto")
    return name


def _env_backend() -> str | None:
    """``os.environ.get(ENV_VAR)``, read from the mapping's own store: every normkit call asks, and
    ``os.environ.get`` costs a microsecond (key encoding) where this costs a tenth of one."""
    data, key = getattr(os.environ, "_data", None), _ENV_KEY
    if data is None or key is None:
        return os.environ.get(ENV_VAR)
    raw = data.get(key)
    return None if raw is None else os.environ.decodevalue(raw)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the enclosed normkit ops on backend ``name`` (``auto``, ``reference``, ``cpu``, ``triton``).

    >>> with normkit.backend("reference"):
    ...     y = layer(x)
    """
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


def _preference(x: torch.Tensor) -> tuple[str, ...]:
    if x.device.type == "cuda":
        return ("triton", "reference")
    if x.device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def _why_not(name: str, op: str, x: torch.Tensor) -> tuple[Backend | None, str | None]:
    inst = _instance(name)
    if isinstance(inst, str):
        return None, inst
    reason = inst.unsupported(op, x)
    if reason is not None:
        return None, f"backend {name!r} cannot run {op} on {x.device.type} {x.dtype}: {reason}"
    return inst, None


def resolve(op: str, x: torch.Tensor) -> Any:
    """The backend that runs ``op`` on ``x`` under the current selection."""
    name = current()
    if name != "auto":
        inst, reason = _why_not(name, op, x)
        if inst is None:
            raise BackendUnavailableError(f"{reason} (requested via normkit.backend / {ENV_VAR})")
        return inst
    for candidate in _preference(x):
        if candidate not in _FACTORIES:
            continue
        inst, reason = _why_not(candidate, op, x)
        if inst is not None:
            return inst
        key = (candidate, reason or "")
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"normkit: {reason}; falling back", RuntimeWarning, stacklevel=3)
    raise BackendUnavailableError(f"no normkit backend can run {op} on {x.device.type} {x.dtype}")


def available() -> dict[str, str]:
    """Each backend name mapped to ``"available"`` or the reason it is not (for ``normkit info``)."""
    out = {}
    for name in BACKEND_NAMES[1:]:
        inst = _instance(name)
        out[name] = "available" if not isinstance(inst, str) else inst
    return out
