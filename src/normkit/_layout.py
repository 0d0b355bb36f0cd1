"""Memory-format helpers shared by the reference backend and the ops."""

from __future__ import annotations

import torch


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) when ``x`` is laid out that way and not also plainly contiguous (an empty tensor,
    contiguous in every format, by its strides, as torch's ``suggest_memory_format``)."""
    if x.numel() == 0 and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return fmt if x.stride() == torch.empty(x.shape, memory_format=fmt, device="meta").stride() else \
            torch.contiguous_format
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def own_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or, when ``t`` is a view, the same memory as a tensor of its own.

    autograd refuses an in-place change to an autograd Function's output that is a view (``y.relu_()``
    after a layer whose kernel returned ``y`` as a view of a reshaped or permuted result): the layers'
    outputs must be tensors of their own, as torch.nn's are.
    """
    if not t._is_view():
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())

