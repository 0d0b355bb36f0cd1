"""normkit: Batch Normalization and its family for PyTorch.

Drop-in replacements for torch.nn's normalization layers, computed by hand-written forward and
backward kernels behind ``torch.library`` custom ops, plus the tools around them.

    >>> import normkit
    >>> layer = normkit.BatchNorm2d(64)           # same arguments and state_dict as torch.nn
    >>> with normkit.backend("reference"):        # or NORMKIT_BACKEND=reference
    ...     y = layer(x)
"""

from . import func, functional, ops  # noqa: F401  (ops registers torch.ops.normkit.*)
from ._checks import NormInputError
from .backends import BackendUnavailableError, backend
from .nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GroupNorm,
    GroupNormAct,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    LayerNormAct,
    LayerNormAct2d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    RMSNorm,
    RMSNorm2d,
    RMSNormAct,
    RMSNormAct2d,
    SyncBatchNorm,
)
from .running_stats import get_nonfinite_policy, set_nonfinite_policy
from .tools import convert, export_onnx, fold, freeze, inspect, recalibrate, unfreeze

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "GroupNorm",
    "RMSNorm",
    "SyncBatchNorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "FrozenBatchNorm2d",
    "freeze",
    "unfreeze",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "GroupNormAct",
    "LayerNormAct",
    "LayerNormAct2d",
    "RMSNorm2d",
    "RMSNormAct",
    "RMSNormAct2d",
    "functional",
    "backend",
    "convert",
    "fold",
    "recalibrate",
    "export_onnx",
    "inspect",
    "NormInputError",
    "set_nonfinite_policy",
    "get_nonfinite_policy",
    "BackendUnavailableError",
    "__version__",
]
