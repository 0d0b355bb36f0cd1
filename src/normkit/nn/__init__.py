"""normkit's nn.Modules: torch.nn's normalization layers, computed by normkit's ops."""

from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .fused import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    GroupNormAct,
    LayerNormAct,
    LayerNormAct2d,
    RMSNormAct,
    RMSNormAct2d,
)
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d
from .groupnorm import GroupNorm
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layernorm import LayerNorm, RMSNorm
from .layernorm2d import LayerNorm2d, RMSNorm2d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sync_batchnorm import SyncBatchNorm, SyncBatchNormAct

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
    "SyncBatchNormAct",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "GroupNormAct",
    "LayerNormAct",
    "LayerNormAct2d",
    "RMSNormAct",
    "RMSNormAct2d",
    "RMSNorm2d",
]
