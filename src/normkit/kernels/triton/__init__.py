"""Triton kernels and their launchers for the two kernel families (DESIGN.md §1).

Only tensors, sizes, strides and compile-time flags cross this boundary; nothing of normkit is
imported here. ``normkit.triton_backend`` adapts these launchers to the backend interface; ``act``
is the integer activation code of ``_common`` (``normkit.activations`` holds the names).

    channel   BatchNorm family: split per-channel statistics, apply, backward reduce / dx
    row       LayerNorm and RMSNorm over the rows of an (M, K) matrix
    group     GroupNorm / InstanceNorm per (sample, group), NCHW and channels_last
    channel_rows  LayerNorm2d on NCHW input: LayerNorm across strided channels at each position

Whether the kernels were built for the interpreter (``TRITON_INTERPRET=1`` at import time, CPU
tensors) or for the GPU is fixed when this package is imported: ``INTERPRETED`` records it.
"""

from .channel import channel_apply, channel_backward_dx, channel_backward_reduce, channel_stats
from .channel import channel_apply_kernel as _probe
from .channel_rows import ln2d_backward, ln2d_forward
from .group import group_backward, group_forward
from .row import row_backward, row_forward

# triton.jit returns an InterpretedFunction instead of a JITFunction when TRITON_INTERPRET was set.
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"

__all__ = [
    "INTERPRETED",
    "channel_apply",
    "channel_backward_dx",
    "channel_backward_reduce",
    "channel_stats",
    "group_backward",
    "group_forward",
    "ln2d_backward",
    "ln2d_forward",
    "row_backward",
    "row_forward",
]
