"""Look inside the norm layers of a model on one batch: statistics, dead channels, gradients.

The most frequent BatchNorm report is "my model is good in train() and bad in eval()". Its cause
is almost always running statistics that do not describe the features the layer now receives
(stale after a weight change, computed on other data, corrupted, or never updated because the
layer was frozen). :func:`inspect` measures exactly that, layer by layer.

The forward pass runs the BN layers with batch statistics (training mode), every other module
in the mode it is in; each layer's input is then the feature the network computes in training,
and each layer is judged on its own (a corrupted layer does not make all the layers after it
look corrupted). Running statistics, ``num_batches_tracked`` and ``.grad`` are left unchanged.

Per norm layer (channel c; μ_B, σ²_B: this batch's per-channel mean and unbiased variance of the
layer's input; μ_r, σ²_r: running statistics; ε: the layer's eps):

* ``score = mean_c |μ_B − μ_r| / sqrt(σ²_r + ε)  +  mean_c |log((σ²_B + ε) / (σ²_r + ε))|``
  — the mean shift in running standard deviations plus the variance ratio in log units. 0 when
  the running statistics are this batch's; for a healthy layer it is of the order of the
  sampling noise, about ``0.8/sqrt(m) + 1.1/sqrt(m)`` for m values per channel. ``None`` for
  layers other than BatchNorm (LayerNorm, GroupNorm, RMSNorm; InstanceNorm, whose running
  statistics average per-instance statistics and are not comparable to pooled batch ones).
* ``dead_batch``: share of channels that are near-dead with batch statistics — a channel is
  near-dead when at least 99 % of its normalized outputs are ≤ 0, so a following ReLU outputs 0
  there and passes no gradient (SiLU and GELU are ≈ 0 too; for fused norm+activation layers the
  output already is post-activation, and for ReLU/SiLU/GELU ``act(z) ≤ 0`` ⟺ ``z ≤ 0``).
* ``dead_running``: the same with the running statistics (what ``eval()`` computes).
* ``grad_weight``, ``grad_bias``: L2 norms of ∂loss/∂γ and ∂loss/∂β when ``loss_fn`` is given.

A warning (``warnings.warn``) names every layer whose score exceeds ``threshold``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .fold import is_batch_norm_like

__all__ = ["inspect", "LayerRecord", "discrepancy_score"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_DEAD_SHARE = 0.99


@dataclass
class LayerRecord:
    """What :func:`inspect` measured on one norm layer (tensors are per channel, float64, CPU)."""

    name: str
    kind: str
    channels: int
    batch_mean: Tensor
    batch_var: Tensor
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    mean_shift: float | None = None
    log_var_ratio: float | None = None
    score: float | None = None
    dead_batch: float | None = None
    dead_running: float | None = None
    grad_weight: float | None = None
    grad_bias: float | None = None


def discrepancy_score(batch_mean: Tensor, batch_var: Tensor, running_mean: Tensor, running_var: Tensor,
                      eps: float) -> tuple[float, float, float]:
    """(score, mean_shift, log_var_ratio) as defined in the module docstring."""
    rm, rv = running_mean.to(torch.float64), running_var.to(torch.float64).clamp_min(0)
    shift = ((batch_mean - rm).abs() / torch.sqrt(rv + eps)).mean().item()
    ratio = torch.log((batch_var.clamp_min(0) + eps) / (rv + eps)).abs().mean().item()
    return shift + ratio, shift, ratio


def _has_running(m: nn.Module) -> bool:
    return getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None


def _channels_first(m: nn.Module, t: Tensor) -> Tensor:
    """``(C, values)``: channels on dim 1 for BN/IN/GN, the normalized features for LN/RMS."""
    t = t.detach()
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        k = math.prod(m.normalized_shape)
        return t.reshape(-1, k).transpose(0, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _dead_share(z: Tensor) -> float:
    """Share of channels (rows of ``z``) with ≥ 99 % of values ≤ 0."""
    if z.numel() == 0:
        return 0.0
    return ((z <= 0).to(torch.float64).mean(dim=1) >= _DEAD_SHARE).to(torch.float64).mean().item()


def _eval_preactivation(m: nn.Module, xc: Tensor) -> Tensor:
    """The layer's output before any activation with the running statistics (channels first)."""
    rstd = torch.rsqrt(m.running_var.to(torch.float64) + float(getattr(m, "eps", 1e-5)))
    scale = rstd if getattr(m, "weight", None) is None else m.weight.detach().to(torch.float64) * rstd
    shift = -m.running_mean.to(torch.float64) * scale
    if getattr(m, "bias", None) is not None:
        shift = shift + m.bias.detach().to(torch.float64)
    return xc * scale[:, None] + shift[:, None]


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _NORMS) or is_batch_norm_like(m)


def _call(model, batch):
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def inspect(model: nn.Module, batch, loss_fn=None, target=None, *, threshold: float = 1.0,
            print_table: bool = True) -> list[LayerRecord]:
    """Per-norm-layer statistics of ``model`` on ``batch``; prints a table, warns on stale statistics.

    Args:
        model: any model; nothing in it is changed (flags, buffers and ``.grad`` are restored).
        batch: the input tensor, or a tuple of positional inputs.
        loss_fn: optional; ``loss_fn(output, target)`` (or ``loss_fn(output)`` when ``target`` is
            None) gives a scalar whose gradients w.r.t. each layer's γ and β are reported.
        target: passed to ``loss_fn``.
        threshold: warn for layers whose discrepancy score is above it.
        print_table: print the table (``format_table(records)`` gives the text).

    Returns one :class:`LayerRecord` per norm layer, in module order.
    """
    layers = [(name, m) for name, m in model.named_modules() if _is_norm(m)]
    records: dict[int, LayerRecord] = {}
    flags = {m: m.training for m in model.modules()}
    saved = {id(m): {k: v.clone() for k, v in m.named_buffers(recurse=False)} for _, m in layers}
    names = {id(m): name for name, m in layers}

    def pre(module, args):
        xc = _channels_first(module, args[0]).to(torch.float64)
        n = max(xc.shape[1] - 1, 1)
        mean = xc.mean(dim=1)
        var = (xc - mean[:, None]).square().sum(dim=1) / n
        rec = LayerRecord(names[id(module)] or "(model)", type(module).__name__, xc.shape[0], mean, var)
        # (InstanceNorm's running statistics average per-instance ones: not comparable, no score)
        if _has_running(module) and is_batch_norm_like(module):
            rec.running_mean = module.running_mean.detach().to(torch.float64).cpu()
            rec.running_var = module.running_var.detach().to(torch.float64).cpu()
            rec.score, rec.mean_shift, rec.log_var_ratio = discrepancy_score(
                mean.cpu(), var.cpu(), rec.running_mean, rec.running_var, float(getattr(module, "eps", 1e-5)))
            rec.dead_running = _dead_share(_eval_preactivation(module, xc))
        records[id(module)] = rec

    def post(module, args, output):
        if isinstance(output, Tensor) and id(module) in records:
            records[id(module)].dead_batch = _dead_share(_channels_first(module, output))

    handles = [m.register_forward_pre_hook(pre) for _, m in layers]
    handles += [m.register_forward_hook(post) for _, m in layers]
    try:
        for _, m in layers:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()  # batch statistics, as in training (see the module docstring)
        with torch.set_grad_enabled(loss_fn is not None):
            out = _call(model, batch)
            if loss_fn is not None:
                _gradients(layers, records, loss_fn(out, target) if target is not None else loss_fn(out))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.train(flag)
        with torch.no_grad():
            for _, m in layers:
                for k, v in m.named_buffers(recurse=False):
                    v.copy_(saved[id(m)][k])
    result = [records[id(m)] for _, m in layers if id(m) in records]
    if print_table:
        print(format_table(result, threshold))
    bad = [r for r in result if r.score is not None and r.score > threshold]
    if bad:
        which = ", ".join(f"{r.name} ({r.score:.2f})" for r in bad)
        warnings.warn(
            f"normkit.inspect: running statistics far from this batch's (score > {threshold}) in {which}. "
            "In eval() these layers normalize with statistics that do not describe their input — the usual "
            "cause of 'accuracy drops in eval()'. Recompute them with normkit.recalibrate(model, batches).",
            stacklevel=2,
        )
    return result


def _gradients(layers, records, loss: Tensor) -> None:
    params: list[tuple[LayerRecord, str, Tensor]] = []
    for _, m in layers:
        for attr in ("weight", "bias"):
            p = getattr(m, attr, None)
            if isinstance(p, nn.Parameter) and p.requires_grad and id(m) in records:
                params.append((records[id(m)], attr, p))
    if not params:
        return
    grads = torch.autograd.grad(loss, [p for _, _, p in params], allow_unused=True)
    for (rec, attr, _), g in zip(params, grads, strict=True):
        setattr(rec, f"grad_{attr}", 0.0 if g is None else g.detach().norm().item())


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(records: list[LayerRecord], threshold: float = 1.0) -> str:
    head = ["layer", "type", "C", "score", "|dmu|/sd", "|log var|", "dead(batch)", "dead(run)", "|dgamma|",
            "|dbeta|"]
    rows = []
    for r in records:
        flag = " !" if r.score is not None and r.score > threshold else ""
        rows.append([r.name, r.kind, str(r.channels), _fmt(r.score) + flag, _fmt(r.mean_shift),
                     _fmt(r.log_var_ratio), _fmt(r.dead_batch, ".1%"), _fmt(r.dead_running, ".1%"),
                     _fmt(r.grad_weight, ".3g"), _fmt(r.grad_bias, ".3g")])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
