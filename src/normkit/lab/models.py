"""Small models for the lab, built from normkit's public layers only.

``norm`` names one normalization per layer: ``none``, ``bn`` (BatchNorm), ``ln`` (LayerNorm
over all of a sample's features), ``gn`` (GroupNorm), ``in`` (InstanceNorm2d), ``brn`` (batch
renorm), ``gbn`` (ghost BN), ``noisy_bn`` (BN followed by the random shift and scale of
Santurkar et al. 2018). ``brn``/``gbn`` need layers that a build may lack: :func:`available`
says so, and the claims skip that arm rather than fake it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import normkit

# norm -> the normkit attributes it needs (1d, 2d)
_NEEDS = {"brn": ("BatchRenorm1d", "BatchRenorm2d"), "gbn": ("GhostBatchNorm1d", "GhostBatchNorm2d")}


def available(norm: str) -> bool:
    """Whether this build of normkit has the layers ``norm`` needs."""
    return all(hasattr(normkit, name) for name in _NEEDS.get(norm, ()))


def missing_note(norm: str) -> str:
    names = " / ".join(f"normkit.{n}" for n in _NEEDS.get(norm, ()))
    return f"arm '{norm}' skipped: {names} is not available in this build of normkit"


class NoisyBatchNorm(nn.Module):
    """BatchNorm followed by a per-step random scale and shift (Santurkar et al. 2018, §2).

    In training, every step draws for each channel ``s ~ U(0.5, 2)`` and ``m ~ U(-1, 1)`` and
    returns ``s·BN(x) + m``: the distribution the next layer sees moves at every step — an
    injected "internal covariate shift" far larger than BN removes. In eval it is plain BN.
    """

    def __init__(self, bn: nn.Module, channels: int, generator: torch.Generator | None = None):
        super().__init__()
        self.bn = bn
        self.channels = channels
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if not self.training:
            return y
        shape = (1, self.channels) + (1,) * (x.dim() - 2)
        s = torch.empty(shape, device=x.device).uniform_(0.5, 2.0, generator=self.generator)
        m = torch.empty(shape, device=x.device).uniform_(-1.0, 1.0, generator=self.generator)
        return y * s + m


class ChannelLayerNorm(nn.Module):
    """LayerNorm over (C, H, W) of an image, with per-channel affine (as Wu & He compare it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gn = normkit.GroupNorm(1, channels)  # GN with one group IS this LayerNorm (checked by claim 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gn(x)


def norm_layer(
    norm: str, channels: int, dim: int, *, steps: int = 1000, virtual_batch: int = 16, groups: int = 4
) -> nn.Module:
    """A ``norm`` layer for ``channels`` features; ``dim`` 1: input (N, C), 2: input (N, C, H, W)."""
    two = dim == 2
    if norm == "none":
        return nn.Identity()
    if norm == "bn":
        return normkit.BatchNorm2d(channels) if two else normkit.BatchNorm1d(channels)
    if norm == "noisy_bn":
        return NoisyBatchNorm(norm_layer("bn", channels, dim), channels)
    if norm == "ln":
        return ChannelLayerNorm(channels) if two else normkit.LayerNorm(channels)
    if norm == "gn":
        return normkit.GroupNorm(math.gcd(groups, channels), channels)
    if norm == "in":
        if not two:
            raise ValueError("InstanceNorm needs spatial input (dim=2)")
        return normkit.InstanceNorm2d(channels, affine=True)
    if norm == "brn":
        cls = normkit.BatchRenorm2d if two else normkit.BatchRenorm1d
        # Ioffe 2017 relaxes r_max 1 -> 3 and d_max 0 -> 5 after a BN warm-up. momentum 0.1 as every BN
        # here: the lab trains for a few hundred steps, where the layer's default 0.01 (meant for long
        # training) would leave the running statistics it corrects towards near their initial values.
        return cls(channels, momentum=0.1, r_max=3.0, d_max=5.0, warmup_steps=max(1, steps // 4))
    if norm == "gbn":
        cls = normkit.GhostBatchNorm2d if two else normkit.GhostBatchNorm1d
        return cls(channels, virtual_batch_size=virtual_batch)
    raise ValueError(f"norm: expected one of none, bn, noisy_bn, ln, gn, in, brn, gbn, got {norm!r}")


_ACTS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def mlp(
    in_features: int,
    n_classes: int,
    *,
    width: int = 128,
    depth: int = 3,
    norm: str = "none",
    act: str = "relu",
    placement: str = "before",
    **norm_kw,
) -> nn.Sequential:
    """``depth`` hidden layers: Linear → norm → act (``placement='before'``, as Ioffe & Szegedy)
    or Linear → act → norm.

    Linear layers keep their bias (a no-op before BN, kept so every arm has the same parameters).
    """
    if placement not in ("before", "after"):
        raise ValueError(f"placement: expected 'before' or 'after', got {placement!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for _ in range(depth):
        layers.append(nn.Linear(d, width))
        pair = [norm_layer(norm, width, 1, **norm_kw), _ACTS[act]()]
        layers.extend(pair if placement == "before" else pair[::-1])
        d = width
    layers.append(nn.Linear(d, n_classes))
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


def cnn(
    in_channels: int,
    n_classes: int,
    *,
    width: int = 16,
    norm: str = "none",
    placement: str = "before",
    **norm_kw,
) -> nn.Sequential:
    """conv3x3(width) → norm → ReLU → conv3x3 stride 2 (2·width) → norm → ReLU → 2x2 average pool → linear.

    The adaptive pool makes it fit any image size (8x8 digits, 28x28 MNIST, the user's data).
    """

    def block(cin, cout, stride):
        pair = [norm_layer(norm, cout, 2, **norm_kw), nn.ReLU()]
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1)] + (
            pair if placement == "before" else pair[::-1]
        )

    layers = [
        *block(in_channels, width, 1),
        *block(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, n_classes),
    ]
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


def scale_init(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every Linear/Conv weight by ``factor`` (the initialization-scale sweep)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(factor)
    return model


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm-like modules of ``model`` (those with running statistics)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and getattr(m, "running_mean", None) is not None
    ]


class NormLSTM(nn.Module):
    """An LSTM whose gate pre-activations and cell are normalized (recurrent BN or LayerNorm).

    Cooijmans et al. 2016, eq. 6-8 (``norm`` = ``bn_step`` or ``bn_shared``)::

        (f, i, o, g) = BN(W_h·h_{t-1}) + BN(W_x·x_t) + b
        c_t = σ(f)⊙c_{t-1} + σ(i)⊙tanh(g)
        h_t = σ(o)⊙tanh(BN(c_t))

    ``bn_step`` keeps separate statistics (and running averages) for each time step up to
    ``max_steps`` and reuses the last step's beyond it, as Cooijmans et al. do for longer test
    sequences: one BatchNorm1d module per step for ``W_h·h`` and ``c``; for ``W_x·x``, which is
    known for all steps at once, one BatchNorm1d over the (step, feature) pairs — per-step
    statistics in one call. ``bn_shared`` uses one module for every step (``W_x·x`` pooled over
    batch and time). BN's γ starts at 0.1 (their recommendation, to keep tanh/sigmoid
    unsaturated). ``ln`` is Layer Normalization in the same places (Ba et al. 2016); ``none`` a
    plain LSTM. Input ``(N, T, D)``, output ``(N, out_features)`` from the last hidden state.
    """

    NORMS = ("none", "bn_step", "bn_shared", "ln")

    def __init__(
        self, in_features: int, hidden: int, out_features: int, *, norm: str = "none", max_steps: int = 1
    ):
        super().__init__()
        if norm not in self.NORMS:
            raise ValueError(f"norm: expected one of {self.NORMS}, got {norm!r}")
        self.norm, self.hidden, self.max_steps = norm, hidden, max_steps
        self.wx = nn.Linear(in_features, 4 * hidden, bias=False)
        self.wh = nn.Linear(hidden, 4 * hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * hidden))
        with torch.no_grad():
            self.bias[:hidden].fill_(1.0)  # forget-gate bias 1: the usual LSTM start
        copies = max_steps if norm == "bn_step" else 1
        self.norm_x = self._make(4 * hidden * copies)
        self.norm_h = nn.ModuleList(self._make(4 * hidden) for _ in range(copies))
        self.norm_c = nn.ModuleList(self._make(hidden) for _ in range(copies))
        self.head = nn.Linear(hidden, out_features)

    def _make(self, features: int) -> nn.Module:
        if self.norm == "none":
            return nn.Identity()
        if self.norm == "ln":
            return normkit.LayerNorm(features)
        bn = normkit.BatchNorm1d(features)
        with torch.no_grad():
            bn.weight.fill_(0.1)
        return bn

    def _input_projection(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized W_x·x_t for every step, ``(N, T, 4H)``."""
        z = self.wx(x)
        n, steps, f = z.shape
        if self.norm in ("none", "ln"):
            return self.norm_x(z)
        if self.norm == "bn_shared":
            return self.norm_x(z.reshape(n * steps, f)).reshape(n, steps, f)
        bn, k = self.norm_x, min(steps, self.max_steps)
        parts = [self._bn_slice(bn, z[:, :k].reshape(n, k * f), 0, k * f).reshape(n, k, f)]
        if steps > k:  # beyond the trained length: the last step's statistics
            tail = z[:, k:].transpose(1, 2)  # (N, F, T - k)
            lo = (self.max_steps - 1) * f
            parts.append(self._bn_slice(bn, tail, lo, lo + f).transpose(1, 2))
        return torch.cat(parts, dim=1)

    def _bn_slice(self, bn: nn.Module, z: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``bn`` restricted to features lo:hi (views of its parameters and running buffers)."""
        return normkit.functional.batch_norm(
            z,
            bn.running_mean[lo:hi],
            bn.running_var[lo:hi],
            bn.weight[lo:hi],
            bn.bias[lo:hi],
            training=self.training,
            momentum=bn.momentum,
            eps=bn.eps,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, steps, _ = x.shape
        zx = self._input_projection(x)
        h = x.new_zeros(n, self.hidden)
        c = x.new_zeros(n, self.hidden)
        last = len(self.norm_h) - 1
        for t in range(steps):
            k = min(t, last)
            z = self.norm_h[k](self.wh(h)) + zx[:, t] + self.bias
            f, i, o, g = z.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.norm_c[k](c))
        return self.head(h)
