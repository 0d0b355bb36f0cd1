"""InPlaceABN / InPlaceABNSync: BatchNorm → activation that keeps only its output for backward.

In-Place Activated BatchNorm (Rota Bulò, Porzi & Kontschieder, CVPR 2018) saves one tensor per layer for the
backward — its output, which the next convolution keeps anyway — instead of BatchNorm's input and the
activation's input, and writes that output over its input, by inverting the activation and the affine step
in the backward (:mod:`normkit.ops_inplace`). normkit's layers compute exactly ``act(BatchNorm(x))`` with
torch's ``γ``: the ``inplace_abn`` package's kernels scale by ``|γ| + ε`` instead (so that ``γ`` never reaches
0), which changes the function wherever ``γ < 0`` and by ``ε`` everywhere. Where inversion would not be exact
to rounding — a channel whose ``|β|/|γ|`` exceeds :data:`normkit.ops_inplace.INVERT_LIMIT` (``γ`` at or near
0), ELU deep in saturation, a zero slope — a call keeps ``x`` instead (BatchNorm + activation's ordinary
backward): the results are the same, only the memory is not saved, and the layer warns once.

Constructor as the ``inplace_abn`` package's ``InPlaceABN(num_features, eps=1e-5, momentum=0.1, affine=True,
track_running_stats=True, activation="leaky_relu", activation_param=0.01)`` (``activation``: ``"leaky_relu"``
— ``activation_param`` its negative slope —, ``"elu"`` — its α — or ``"identity"``), plus keyword-only
``inplace`` (default True: write the output over the input where autograd allows it; False: never write the
input, still save only the output) and ``device``, ``dtype``. Parameters, buffers and ``state_dict`` are
torch.nn's BatchNorm's (and the package's), so checkpoints load both ways — with the ``|γ| + ε`` caveat above
for weights trained with the package (docs/inplace-abn.md).

In eval mode: BatchNorm with the running statistics, then the activation (torch's functions). Under
``torch.compile``, export, ``torch.func`` and the other features of docs/compatibility.md: torch's BatchNorm →
activation (no in-place write there). Running statistics follow :mod:`normkit.running_stats` (checkpoint-safe,
non-finite batches skipped). Input ``(N, C, *)``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from .batchnorm import _BatchNormForward

__all__ = ["InPlaceABN", "InPlaceABNSync"]


def _activation_module(activation: str, param: float) -> nn.Module:
    if activation == "leaky_relu":
        return nn.LeakyReLU(param)
    if activation == "elu":
        return nn.ELU(param)
    return nn.Identity()


class InPlaceABN(_BatchNormForward, _BatchNorm):
    """``act(BatchNorm(x))`` saving only its output, written over its input (module docstring).

    ``layer.act`` is the activation as a torch.nn module (``nn.LeakyReLU(slope)``, ``nn.ELU(α)``,
    ``nn.Identity()``), kept in step with ``activation`` / ``activation_param``, for the tools that read a
    fused layer's activation (``normkit.fold``, ``normkit.freeze``); it is not a child module.
    """

    _accepted_dims = tuple(range(2, 9))
    _any_rank = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "leaky_relu", activation_param: float = 0.01,
                 *, inplace: bool = True, device=None, dtype=None) -> None:
        F.check_inplace_abn_activation(type(self).__name__, activation, activation_param)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation
        self.activation_param = float(activation_param)
        self.inplace = bool(inplace)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in ("activation", "activation_param") and "activation_param" in self.__dict__ \
                and "activation" in self.__dict__:
            object.__setattr__(self, "act", _activation_module(self.activation, self.activation_param))

    def _check_input_dim(self, input: Tensor) -> None:
        F.check_input_dim(type(self).__name__, input, None)

    def forward(self, input: Tensor) -> Tensor:
        return F.inplace_abn_module(self, input)

    def extra_repr(self) -> str:
        rep = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
               f"activation={self.activation}")
        if self.activation != "identity":
            rep += f"[{self.activation_param}]"
        if not self.track_running_stats:
            rep += ", track_running_stats=False"
        return rep + ("" if self.inplace else ", inplace=False")

    def __prepare_scriptable__(self) -> nn.Module:
        raise NotImplementedError(f"torch.jit.script: {type(self).__name__} has no TorchScript twin; use "
                                  "torch.jit.trace, torch.export or torch.compile")


class InPlaceABNSync(InPlaceABN):
    """:class:`InPlaceABN` whose training batch is the union of every rank's batch in ``group`` (the default
    group when None), as :class:`normkit.SyncBatchNorm`: statistics merged over the ranks, the backward's two
    sums all-reduced; each rank still keeps only its output. Outside ``torch.distributed`` (or in eval) it is
    :class:`InPlaceABN`. Arguments as the ``inplace_abn`` package's, ``group`` after ``activation_param``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "leaky_relu", activation_param: float = 0.01,
                 group=None, *, inplace: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, activation_param,
                         inplace=inplace, device=device, dtype=dtype)
        self.group = group

    @property
    def process_group(self):
        """``group`` under SyncBatchNorm's name (``convert_sync_batchnorm`` sets it)."""
        return self.group

    @process_group.setter
    def process_group(self, value) -> None:
        self.group = value

    def set_group(self, group) -> None:
        """Set the process group (the ``inplace_abn`` package's method; not between forward and backward)."""
        self.group = group

    def forward(self, input: Tensor) -> Tensor:
        from torch import distributed as dist

        group = self.group
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        return F.inplace_abn_module(self, input, group if self.training else None)
