"""SyncBatchNorm: Batch Normalization whose batch is the union of every rank's batch.

In training, under an initialised ``torch.distributed`` with more than one rank in
``process_group``, the per-channel statistics are those of all ranks' inputs together:

    (n_r, μ_r, σ²_r)  = stats of this rank's x                     (channel_stats kernel)
    (N, μ, σ²)        = Chan merge of every rank's triple           (normkit.distributed)
    y                 = act(γ·(x − μ)/sqrt(σ² + ε) + β + residual)  (channel_apply kernel)

and the backward reduces Σdz and Σdz·x̂ locally, adds them over the ranks and forms dx locally
with the global count ``N`` (:mod:`normkit.channel`). Ranks may hold different batch sizes,
including zero; a global count of one value per channel is refused on every rank. The running
statistics (the same on every rank) move with the global ``μ`` and unbiased ``σ²·N/(N−1)``.

Outside that case — not distributed, a world of one, or ``eval()`` — it is exactly
:class:`normkit.BatchNorm2d`'s computation (any input with at least 2 dims).

Parameters, buffers and ``state_dict`` are torch.nn.SyncBatchNorm's (= BatchNorm's).
Input ``(N, C, *)``; channels_last stays channels_last.
Works with gloo (CPU tensors) and NCCL (CUDA tensors): the collectives run on the input's device.

Reference: the cross-GPU BN of Peng et al., "MegDet: A Large Mini-Batch Object Detector",
CVPR 2018 (and Zhang et al., "Context Encoding for Semantic Segmentation", CVPR 2018).
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormForward
from .inplace_abn import InPlaceABN, InPlaceABNSync

__all__ = ["SyncBatchNorm", "SyncBatchNormAct"]


def _fused_act_name(act) -> str | None:
    """The kernel's name for ``act`` (a string or an activation module), or None if it has none
    (a module no fused activation reproduces exactly: it runs after the kernel)."""
    if act is None:
        return ""
    if isinstance(act, str):
        return act.lower()
    return F.activation_name(act)


class SyncBatchNorm(_BatchNormForward, _BatchNorm):
    """Batch Normalization over the batches of all ranks; drop-in for ``torch.nn.SyncBatchNorm``.

    Args: as ``torch.nn.SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None, dtype=None, *, bias=True)``.

    ``forward(input, residual=None)``: ``y = γ·x̂ + β (+ residual)``; input ``(N, C, *)``.

    Not a subclass of ``torch.nn.SyncBatchNorm`` (unlike normkit's other layers and their twins):
    DistributedDataParallel refuses any ``torch.nn.SyncBatchNorm`` in a CPU module, and this
    layer is meant to run on CPU with gloo too. The state is the same, so checkpoints move both
    ways and :func:`normkit.convert` swaps the two.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        # ``bias`` (torch >= 2.10's keyword) is passed on only when set, so older torch still works
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        self.process_group = process_group

    # any (N, C, *) input (the fast checks and the one-call forward take up to 8-D; more goes the detailed way)
    _accepted_dims = tuple(range(2, 9))
    _any_rank = True

    def _check_input_dim(self, input: Tensor) -> None:
        F.check_input_dim(type(self).__name__, input, None)

    def _sync_now(self) -> bool:
        return self.training and F.distributed_active(self.process_group)

    def _act_split(self) -> tuple[str, nn.Module | None]:
        """(activation fused into the kernel, module applied after it)."""
        # an instance attribute or a submodule (no class attribute: it would shadow the submodule)
        act = self.__dict__.get("act", self._modules.get("act"))
        name = _fused_act_name(act)
        if name is None:
            return "", act
        return name, None

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        act, after = self._act_split()
        y = (
            self._sync_forward(input, residual, act)
            if self._sync_now()
            else self._normalize(input, residual, act)
        )
        return after(y) if after is not None else y

    def _sync_forward(self, input: Tensor, residual: Tensor | None, act: str) -> Tensor:
        return F.sync_batch_norm_module(self, input, residual, act, self.process_group)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm of ``module`` by a :class:`SyncBatchNorm` and return the model.

        Converted: ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``, normkit's
        ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, and any BatchNorm subclass with an ``act``
        attribute (normkit's fused norm + activation layers), which becomes a
        :class:`SyncBatchNormAct` keeping that activation (computed as
        ``act(bn(x) + residual)``); :class:`normkit.InPlaceABN` becomes :class:`normkit.InPlaceABNSync`.
        The new layers hold the very same parameter and buffer
        tensors (an optimizer built before still updates them), hooks and training flag.
        Other BatchNorm subclasses (BatchRenorm, GhostBatchNorm, yours) are left alone with a
        warning: their forward is not BatchNorm's.
        """
        out = module
        if isinstance(module, _BatchNorm):
            target = _sync_class_for(module)
            if target is None:
                warnings.warn(
                    f"convert_sync_batchnorm: left {type(module).__qualname__} alone (not a plain "
                    "BatchNorm: its forward would be lost)",
                    stacklevel=2,
                )
            else:
                if any(
                    isinstance(p, nn.parameter.UninitializedParameter)
                    for p in module.parameters(recurse=False)
                ):
                    raise F.fail(
                        "convert_sync_batchnorm",
                        "module",
                        "initialised parameters (run a forward through a Lazy BatchNorm first)",
                        f"an uninitialised {type(module).__qualname__}",
                    )
                out = target.__new__(target)
                out.__dict__.update(
                    {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
                )
                out.process_group = process_group
        for name, child in module.named_children():
            out._modules[name] = cls.convert_sync_batchnorm(child, process_group)
        return out


class SyncBatchNormAct(SyncBatchNorm):
    """SyncBatchNorm followed by an activation (and an optional residual before it).

    ``forward(input, residual=None) = act(SyncBatchNorm(input) + residual)``. ``act`` is one of
    ``"relu"``, ``"silu"``, ``"gelu"`` (computed inside the apply kernel) or any ``nn.Module``
    (``nn.ReLU``/``nn.SiLU``/exact ``nn.GELU`` are fused too; others run after the kernel).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        act: str | nn.Module = "relu",
        bias: bool = True,
    ) -> None:
        if isinstance(act, str) and act.lower() not in F.ACTIVATIONS:
            raise F.fail("SyncBatchNormAct", "act", f"one of {[a for a in F.ACTIVATIONS if a]} or an nn.Module",
                         repr(act))
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype, bias=bias
        )
        self.act = act

    def extra_repr(self) -> str:
        act = f"act={self.act!r}" if isinstance(self.act, str) else ""
        return super().extra_repr() + (", " + act if act else "")


_PLAIN = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    SyncBatchNorm,
)


def _sync_class_for(module: nn.Module) -> type[nn.Module] | None:
    if type(module) in (InPlaceABN, InPlaceABNSync):  # stays in place, statistics over the ranks
        return InPlaceABNSync
    if "act" in module.__dict__ or "act" in module._modules:  # a fused norm + activation layer
        return SyncBatchNormAct
    if type(module) in _PLAIN:
        return SyncBatchNorm
    return None
