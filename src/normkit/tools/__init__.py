"""Operations on whole models."""

from torch import nn as _torch_nn

from .. import nn as _nk
from .convert import convert, register_conversion
from .freeze import freeze, unfreeze

# normkit's SyncBatchNorm has torch.nn.SyncBatchNorm's state: convert() swaps them both ways.
register_conversion(_torch_nn.SyncBatchNorm, _nk.SyncBatchNorm)

__all__ = ["convert", "register_conversion", "freeze", "unfreeze"]
