"""Batch Renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", NeurIPS 2017).

Training normalizes with the batch statistics but corrects them towards the running ones, so
that training and inference compute the same function in expectation:

    μ_B, σ_B = batch mean and sqrt(biased batch variance + ε)
    σ        = sqrt(running_var + ε),  μ = running_mean
    r = clip(σ_B/σ, 1/r_max, r_max),   d = clip((μ_B − μ)/σ, −d_max, d_max)   (constants: no gradient)
    x̂ = (x − μ_B)/σ_B,                 y = γ·(x̂·r + d) + β

``y`` is BatchNorm with ``γ' = γ·r`` and ``β' = β + γ·d``, so it runs as BatchNorm (the same
route and kernels, :func:`normkit.functional.batch_norm`) with those two vectors. Because r and d
are treated as constants, the gradient is BatchNorm's with ``γ·r`` in place of ``γ``:

    dx = γ·r/σ_B · (dy − mean(dy) − x̂·mean(dy·x̂))
    dγ = r·Σ dy·x̂ + d·Σ dy,     dβ = Σ dy

(the first line is BatchNorm's dx for weight γ'; the last two are the chain rule through
γ' = γ·r, β' = β + γ·d, done by autograd on those two (C,)-vectors). With r = 1 and d = 0 it
is BatchNorm exactly: ``BatchRenorm(r_max=1, d_max=0)`` gives the same numbers as
``BatchNorm``. Eval mode is BatchNorm with the running statistics.

Warm-up: the paper starts as plain BatchNorm (r_max = 1, d_max = 0) and relaxes the limits
later (r_max to 3 over steps 5k–40k, d_max to 5 over 5k–25k, batch 32 on Inception). Here one
linear ramp over the first ``warmup_steps`` training batches (counted by ``num_batches_tracked``)
goes from (1, 0) to (r_max, d_max):  ``r_max(t) = 1 + (r_max − 1)·min(t/warmup_steps, 1)``, and
likewise ``d_max(t) = d_max·min(t/warmup_steps, 1)``. Default ``warmup_steps=25_000`` (where
the paper's d_max ramp ends); 0 applies the full limits from the first step.

Running statistics: BatchNorm's (``running_var`` is the unbiased variance; the paper averages
σ instead), so the buffers and ``state_dict`` are BatchNorm's and a checkpoint moves between the
two. ``momentum`` defaults to 0.01 rather than 0.1: r and d lean on the running statistics, and
the paper's Algorithm 1 uses a small update rate. ``track_running_stats`` is always True (the
method needs running statistics).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from .. import running_stats
from .batchnorm import _BatchNormForward

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


def _check_limits(where: str, r_max: float, d_max: float, warmup_steps: int) -> None:
    if not isinstance(r_max, (int, float)) or not math.isfinite(r_max) or r_max < 1:
        raise F.fail(where, "r_max", "a finite number >= 1 (1 = no correction of the scale)", repr(r_max))
    if not isinstance(d_max, (int, float)) or not math.isfinite(d_max) or d_max < 0:
        raise F.fail(where, "d_max", "a finite number >= 0 (0 = no correction of the shift)", repr(d_max))
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise F.fail(where, "warmup_steps", "an int >= 0", repr(warmup_steps))


class _BatchRenorm(_BatchNormForward, _BatchNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 25_000,
        device=None,
        dtype=None,
    ) -> None:
        _check_limits(type(self).__name__, r_max, d_max, warmup_steps)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.r_max, self.d_max, self.warmup_steps = float(r_max), float(d_max), warmup_steps

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"
        )

    def limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` in force for the next training batch (after the warm-up ramp)."""
        r_lim, d_lim = self._limits()
        return float(r_lim), float(d_lim)

    def _limits(self) -> tuple[Tensor, Tensor]:
        """:meth:`limits` as 0-d tensors: no host sync, no graph break under ``torch.compile``."""
        done = self.num_batches_tracked.to(torch.float64)
        frac = torch.ones_like(done) if self.warmup_steps == 0 else (done / self.warmup_steps).clamp(max=1.0)
        return 1.0 + (self.r_max - 1.0) * frac, self.d_max * frac

    def _statistics_before_update(self):
        """(running_mean, running_var, limits) this training forward corrects towards.

        A forward recomputed by activation checkpointing must compute what the original one did,
        but the original already moved the statistics: it keeps a copy of those it used, and the
        recomputation reuses it (the last training forward's, so a layer called once per
        checkpointed step recomputes exactly).
        """
        saved = self.__dict__.get("_renorm_inputs")
        if saved is not None and running_stats.in_recomputation():
            return saved
        used = (self.running_mean, self.running_var, self._limits())
        if not torch.compiler.is_compiling():
            self._renorm_inputs = (used[0].clone(), used[1].clone(), used[2])
        return used

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.running_mean is None:
            return self._normalize(input)  # eval: BatchNorm with the running statistics
        F.check_batch_norm(type(self).__name__, input, self.running_mean, self.running_var, self.weight, self.bias,
                           True, eps=self.eps, num_features=self.num_features, accepted_dims=self._accepted_dims)
        sd = torch.float64 if input.dtype == torch.float64 else torch.float32  # the statistics' dtype
        running_mean, running_var, (r_lim, d_lim) = self._statistics_before_update()
        with torch.no_grad():
            # the batch statistics that set r and d (aten's two-pass var_mean); the BatchNorm below
            # computes them again, and moves the running statistics with them exactly as BatchNorm does
            dims = [0] + list(range(2, input.dim()))
            var_b, mean_b = torch.var_mean(input.detach().to(sd), dim=dims, correction=0)
            sigma = torch.sqrt(running_var.to(sd) + self.eps)
            r = (torch.sqrt(var_b + self.eps) / sigma).clamp(min=(1.0 / r_lim).to(sd), max=r_lim.to(sd))
            d = ((mean_b - running_mean.to(sd)) / sigma).clamp(min=-d_lim.to(sd), max=d_lim.to(sd))
        if self.weight is not None:
            weight = self.weight.to(sd) * r
            bias = self.bias.to(sd) + self.weight.to(sd) * d
        else:
            weight, bias = r, d
        pd = self.running_mean.dtype  # the dtype of the module's per-channel tensors (torch's mixed-dtype rule)
        weight, bias = weight.to(pd), bias.to(pd)
        # BatchNorm with γ' = γ·r, β' = β + γ·d (r, d constants): BatchNorm's dx with weight γ',
        # and autograd carries dγ' and dβ' on to γ and β
        return F.batch_norm_checked(input, None, None, weight, bias, True, self.eps,
                                    on_stats=self._update_running_stats)


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` input (module docstring for the math)."""

    _accepted_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization over ``(N, C, H, W)`` input (module docstring for the math)."""

    _accepted_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization over ``(N, C, D, H, W)`` input (module docstring for the math)."""

    _accepted_dims = (5,)
