"""normkit: Batch Normalization and its family for PyTorch.

Drop-in replacements for torch.nn's normalization layers, computed by hand-written forward and
backward kernels behind ``torch.library`` custom ops, plus the tools around them.

    >>> import normkit
    >>> layer = normkit.BatchNorm2d(64)           # same arguments and state_dict as torch.nn
    >>> with normkit.backend("reference"):        # or NORMKIT_BACKEND=reference
    ...     y = layer(x)
"""

from . import func, functional, nn, ops  # noqa: F401  (ops registers torch.ops.normkit.*)
from ._checks import NormInputError
from .backends import BackendUnavailableError, backend
from .nn import *  # noqa: F403  (every layer of normkit.nn: a new layer needs no line here)
from .running_stats import get_nonfinite_policy, set_nonfinite_policy
from .tools import convert, export_onnx, fold, freeze, inspect, recalibrate, unfreeze

__version__ = "0.1.0"

__all__ = [
    *nn.__all__,
    "freeze",
    "unfreeze",
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
