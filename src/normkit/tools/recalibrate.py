"""Precise BatchNorm statistics: replace running statistics by exact population statistics.

The running statistics a BN layer keeps are an exponential moving average over training steps:
they lag behind the weights, mix statistics of old weights in, and are wrong after any change
of the weights without training (pruning, weight averaging, fine-tuning with frozen BNs, a new
input domain). :func:`recalibrate` recomputes them from data, exactly:

    μ  = 1/m Σ xᵢ                      over every sample and position of every batch
    σ² = 1/(m − 1) Σ (xᵢ − μ)²         (unbiased, as torch stores ``running_var``)

Each batch gives per-channel partial statistics (count n, mean, M2 = Σ(x − mean)²), computed in
float64 by two passes; batches are merged with Chan et al.'s parallel formula

    n = n_a + n_b,  δ = mean_b − mean_a,  mean = mean_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n

so the result is the statistics of the concatenation of all batches. This is not what
``torch.optim.swa_utils.update_bn`` computes: it averages per-batch variances (a cumulative
moving average with ``momentum=None``), which misses the variance *between* the batch means and
is biased whenever batches differ (e.g. unshuffled or class-sorted data, small batches).

Which features are measured (the mode): a BN layer's input depends on every BN before it. We
run the forward with the BN layers in **training mode** — each layer normalizes with the
statistics of the batch at hand, exactly as during training — and every other module in eval
mode (no dropout: the features are those of inference). This is Precise BN as in Wu & Johnson,
"Rethinking 'Batch' in BatchNorm" (2021, §3), one forward pass per batch for all layers at
once. The alternative, eval-mode forwards with the new statistics of upstream layers, would need
one pass over the data per BN depth level (the input of layer k depends on the not-yet-known
population statistics of layers < k), and its features differ from the training-mode ones
only by the batch-vs-population normalization upstream, which is small for batches of
reasonable size (that is what the paper measures).

SyncBatchNorm: when ``torch.distributed`` is initialized, the partial statistics of each
SyncBatchNorm are all-gathered over its process group and merged, so every rank gets the
statistics of all ranks' data (ranks may see different numbers of samples, or none).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["recalibrate", "ChannelMoments"]

_PROGRESS_MIN_BATCHES = 20


class ChannelMoments:
    """Mergeable per-channel (count, mean, M2) in float64 (Chan/Welford)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add_batch(self, x: Tensor) -> None:
        """Add an ``(N, C, *)`` batch: channel dim 1, reduced over every other dim."""
        x = x.detach().to(torch.float64)
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)
        n = flat.shape[1]
        if n == 0:
            return
        mean = flat.mean(dim=1)
        m2 = (flat - mean[:, None]).square().sum(dim=1)
        self.merge(n, mean, m2)

    def merge(self, n: int, mean: Tensor, m2: Tensor) -> None:
        if n == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def all_gather(self, num_channels: int, device: torch.device, group=None) -> None:
        """Merge the moments of every rank of ``group`` (every rank must call this)."""
        import torch.distributed as dist

        packed = torch.zeros(2 * num_channels + 1, dtype=torch.float64, device=device)
        if self.count > 0:
            packed[0] = self.count
            packed[1:num_channels + 1] = self.mean
            packed[num_channels + 1:] = self.m2
        parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, packed, group=group)
        merged = ChannelMoments()
        for p in parts:  # same order on every rank: bit-identical results everywhere
            merged.merge(int(p[0].item()), p[1:num_channels + 1], p[num_channels + 1:])
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2

    def unbiased_var(self) -> Tensor:
        return self.m2 / max(self.count - 1, 1)


def _recalibratable(m: nn.Module) -> bool:
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None)


def _is_sync(m: nn.Module) -> bool:
    """torch.nn.SyncBatchNorm or normkit's (which need not subclass torch's)."""
    return isinstance(m, nn.SyncBatchNorm) or "SyncBatchNorm" in type(m).__name__


def _first_input(batch):
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(f"recalibrate: batches: expected tensors or tuples whose first item is the input, got "
                    f"{type(batch).__name__}")


def _to_device(x, device):
    if device is None:
        return x
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _total(batches, max_batches):
    try:
        n = len(batches)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable, max_batches: int | None = None,
                progress: bool | None = None) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact statistics of ``batches``.

    Args:
        model: a model with BatchNorm layers (torch.nn's, normkit's, SyncBatchNorm, any subclass
            of ``torch.nn.modules.batchnorm._BatchNorm`` with running statistics). Changed in
            place and returned. Frozen BNs and layers with ``track_running_stats=False`` are
            left alone.
        batches: an iterable of input tensors, or of tuples/lists whose first item is the input
            (a DataLoader of ``(x, y)`` works). Inputs are moved to the device of the model's
            first parameter.
        max_batches: use at most this many batches.
        progress: show a tqdm bar; ``None`` = only for runs of ≥ 20 batches on a terminal.

    After the call, for each layer: ``running_mean`` = mean, ``running_var`` = unbiased variance
    of the layer's input over all samples and positions seen (float64, stored in the buffer's
    dtype); ``num_batches_tracked`` = number of batches used, so a later ``momentum=None``
    cumulative average continues with the right weight. Every module's training flag is restored;
    no gradient is computed. A layer that never received input keeps its statistics (warning).
    """
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"recalibrate: max_batches: expected a positive number or None, got {max_batches}")
    layers = [(name, m) for name, m in model.named_modules() if _recalibratable(m)]
    if not layers:
        warnings.warn("recalibrate: the model has no BatchNorm layer with running statistics", stacklevel=2)
        return model
    moments = {id(m): ChannelMoments() for _, m in layers}
    flags = {m: m.training for m in model.modules()}
    saved = {id(m): (m.running_mean.clone(), m.running_var.clone(),
                     None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for _, m in layers}

    def capture(module, args):
        moments[id(module)].add_batch(args[0])

    handles = [m.register_forward_pre_hook(capture) for _, m in layers]
    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = param.device if param is not None else None
    total = _total(batches, max_batches)
    used = 0
    try:
        model.eval()
        for _, m in layers:
            m.train()  # normalize with batch statistics, as in training (see the module docstring)
        from tqdm.auto import tqdm

        show = progress if progress is not None else (total is None or total >= _PROGRESS_MIN_BATCHES)
        bar = tqdm(total=total, desc="recalibrate", unit="batch", disable=None if show else True, leave=False)
        with bar:
            for batch in itertools.islice(batches, max_batches):
                model(_to_device(_first_input(batch), device))
                used += 1
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.train(flag)
        for _, m in layers:  # undo the momentum updates of the passes
            mean, var, nbt = saved[id(m)]
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
    if used == 0:
        raise ValueError("recalibrate: batches: expected at least one batch, got none")
    _write(layers, moments, used)
    return model


def _write(layers, moments: dict[int, ChannelMoments], used: int) -> None:
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    never = []
    for name, m in layers:
        mom = moments[id(m)]
        if distributed and _is_sync(m):
            mom.all_gather(m.running_mean.numel(), m.running_mean.device, getattr(m, "process_group", None))
        if mom.count == 0:
            never.append(name or "(model)")
            continue
        m.running_mean.copy_(mom.mean.to(m.running_mean.dtype))
        m.running_var.copy_(mom.unbiased_var().to(m.running_var.dtype))
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(used)
    if never:
        warnings.warn(f"recalibrate: no input reached {', '.join(never)}; their statistics are unchanged",
                      stacklevel=3)
