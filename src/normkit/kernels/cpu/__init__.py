"""Numba CPU kernels: flat numpy arrays in, arrays out (see :mod:`.channel`, :mod:`.row`).

Nothing compiles at import: every kernel is compiled on its first call for the argument types
it meets (float32, float64, float16 bits as uint16, bfloat16 bits as int16) and cached on disk
(``cache=True``), so the next process loads the machine code instead of recompiling.
"""

from ._scalar import ACT_CODES
from .channel import (
    apply_cl,
    apply_nchw,
    bn_backward_cl,
    bn_backward_nchw,
    bn_forward_cl,
    bn_forward_nchw,
    bwd_dx_cl,
    bwd_dx_nchw,
    bwd_sums_cl,
    bwd_sums_nchw,
    sums_cl,
    sums_nchw,
)
from .group import group_bwd_cl, group_bwd_nchw, group_fwd_cl, group_fwd_nchw
from .row import row_bwd, row_fwd

__all__ = [
    "ACT_CODES",
    "sums_nchw",
    "sums_cl",
    "apply_nchw",
    "apply_cl",
    "bn_forward_nchw",
    "bn_backward_nchw",
    "bn_forward_cl",
    "bn_backward_cl",
    "bwd_sums_nchw",
    "bwd_sums_cl",
    "bwd_dx_nchw",
    "bwd_dx_cl",
    "group_fwd_nchw",
    "group_bwd_nchw",
    "group_fwd_cl",
    "group_bwd_cl",
    "row_fwd",
    "row_bwd",
]
