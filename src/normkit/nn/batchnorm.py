"""BatchNorm1d/2d/3d and their lazy forms: torch.nn's layers, computed by normkit's ops.

Each class subclasses its ``torch.nn`` namesake, so constructor arguments, defaults,
parameters (``weight``, ``bias``), buffers (``running_mean``, ``running_var``,
``num_batches_tracked``), ``state_dict`` keys and versioning are torch's own, and
``isinstance(layer, torch.nn.BatchNorm2d)`` holds. Only ``forward`` differs:

* input checks run first; a refused batch changes no buffer (torch.nn increments
  ``num_batches_tracked`` before it refuses);
* a forward recomputed by ``torch.utils.checkpoint`` changes no buffer, and a batch with
  non-finite statistics is skipped (:mod:`normkit.running_stats`);
* training: ``y = γ·(x − μ_B)/sqrt(σ²_B + ε) + β`` with the batch's per-channel mean and biased
  variance; ``running_mean``/``running_var`` (unbiased) move by ``momentum``, or by
  ``1/num_batches_tracked`` (a cumulative average) when ``momentum=None``;
* eval: the running statistics, or the batch's when ``track_running_stats=False``.

Shapes: BatchNorm1d ``(N, C)`` or ``(N, C, L)``; BatchNorm2d ``(N, C, H, W)``; BatchNorm3d
``(N, C, D, H, W)``. channels_last input gives channels_last output.

Reference: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as F
from .. import running_stats
from .scripting import twin

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"]


class _BatchNormForward:
    """The forward shared by every normkit BatchNorm (mixed in before the torch.nn class, whose
    constructor, signature and state stay torch's own)."""

    _accepted_dims: tuple[int, ...] = ()
    _any_rank = False  # any (N, C, *) input: its checks ask for at least 2 dimensions, not for _accepted_dims
    _script_twin: type | None = None  # what torch.jit.script compiles instead (nn/scripting.py)
    # for the one-call path: the accepted input ranks as a bit mask (bit d: d-D input), and whether the
    # class moves its statistics by the standard update (no subclass override)
    _dims_mask = 0
    _one_call_update = True
    skipped_batches = running_stats.SkippedBatches()  # training batches skipped for non-finite statistics

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._dims_mask = sum(1 << d for d in cls._accepted_dims)
        cls._one_call_update = cls._update_running_stats is _BatchNormForward._update_running_stats

    def __prepare_scriptable__(self) -> nn.Module:
        if self._script_twin is None:
            raise NotImplementedError(
                f"torch.jit.script: {type(self).__name__}'s training forward has no TorchScript form; "
                "use torch.jit.trace, torch.export or torch.compile, or script the model after "
                "normkit.convert(model, to='torch') / normkit.freeze(model)"
            )
        return twin(self, self._script_twin)

    def _check_input_dim(self, input: Tensor) -> None:
        F.check_input_dim(type(self).__name__, input, self._accepted_dims)

    def _use_batch_stats(self) -> bool:
        return self.training or self._state()[2] is None

    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        """The one place a training batch moves the running statistics and num_batches_tracked:
        once per forward (not again when checkpointing recomputes it), finite batches only
        (:mod:`normkit.running_stats`)."""
        running_stats.update_running_stats(self, mean, var, count)

    def _state(self) -> tuple:
        """(weight, bias, running_mean, running_var), read from the module's dictionaries directly
        (``Module.__getattr__`` costs a microsecond a name)."""
        p, b = self._parameters, self._buffers
        if "weight" in p and "bias" in p and "running_mean" in b and "running_var" in b:  # every torch.nn BN
            return p["weight"], p["bias"], b["running_mean"], b["running_var"]
        return tuple(p[k] if k in p else b[k] if k in b else getattr(self, k, None)
                     for k in ("weight", "bias", "running_mean", "running_var"))

    def _normalize(self, input: Tensor, residual: Tensor | None = None, act: str = "") -> Tensor:
        return F.batch_norm_module(self, input, residual, act)

    def forward(self, input: Tensor) -> Tensor:
        return F.batch_norm_module(self, input)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """Batch Normalization over ``(N, C)`` or ``(N, C, L)`` input; drop-in for ``torch.nn.BatchNorm1d``.

    ``forward(input, mask=None)``: with ``mask`` ``(N, L)`` bool (True = real position) for
    ``(N, C, L)`` input, padded positions are left out of the statistics and get output 0 and
    gradient 0 (:mod:`normkit.masked`).
    """

    _accepted_dims = (2, 3)
    _script_twin = nn.BatchNorm1d

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            return F.batch_norm_module(self, input)
        return F.masked_batch_norm1d_module(self, input, mask)


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """Batch Normalization over ``(N, C, H, W)`` input; drop-in for ``torch.nn.BatchNorm2d``."""

    _accepted_dims = (4,)
    _script_twin = nn.BatchNorm2d


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """Batch Normalization over ``(N, C, D, H, W)`` input; drop-in for ``torch.nn.BatchNorm3d``."""

    _accepted_dims = (5,)
    _script_twin = nn.BatchNorm3d


class _LazyBatchNormMixin:
    """What normkit's lazy BatchNorms add to torch's: ``num_features`` follows a loaded state_dict.

    torch's lazy load materializes the parameters from a checkpoint but leaves ``num_features`` at
    0 (torch.nn never reads it again); normkit's forward checks the input against it.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for key in ("weight", "running_mean"):
            t = state_dict.get(prefix + key)
            if self.num_features == 0 and isinstance(t, Tensor) and t.dim() == 1:
                self.num_features = t.shape[0]


class LazyBatchNorm1d(_LazyBatchNormMixin, nn.LazyBatchNorm1d, BatchNorm1d):
    """BatchNorm1d whose ``num_features`` is inferred from the first input's ``input.size(1)``;
    a ``torch.nn.LazyBatchNorm1d``, and a :class:`BatchNorm1d` once initialised."""

    cls_to_become = BatchNorm1d
    _check_input_dim = _BatchNormForward._check_input_dim


class LazyBatchNorm2d(_LazyBatchNormMixin, nn.LazyBatchNorm2d, BatchNorm2d):
    """BatchNorm2d whose ``num_features`` is inferred from the first input's ``input.size(1)``;
    a ``torch.nn.LazyBatchNorm2d``, and a :class:`BatchNorm2d` once initialised."""

    cls_to_become = BatchNorm2d
    _check_input_dim = _BatchNormForward._check_input_dim


class LazyBatchNorm3d(_LazyBatchNormMixin, nn.LazyBatchNorm3d, BatchNorm3d):
    """BatchNorm3d whose ``num_features`` is inferred from the first input's ``input.size(1)``;
    a ``torch.nn.LazyBatchNorm3d``, and a :class:`BatchNorm3d` once initialised."""

    cls_to_become = BatchNorm3d
    _check_input_dim = _BatchNormForward._check_input_dim
