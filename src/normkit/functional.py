"""Stateless normalization functions with the signatures of ``torch.nn.functional`` — and the front door
of every normkit layer.

Each function here is the one way into a norm's computation (DESIGN.md §7): it asks
:func:`normkit.route.choose` once which path the call takes, checks its inputs once
(:mod:`normkit._checks`) and computes on that path:

* ONE_CALL / ONE_CALL_ATEN — plain eager on CPU: one C++ call (:mod:`normkit._fast`), which only
  recognises what the checks accept and hands anything else back (then the KERNELS or TORCH path);
* KERNELS — normkit's kernels in plain eager mode (:data:`normkit.ops.eager`);
* OP — normkit's custom op, opaque to ``torch.compile`` (``torch.ops.normkit.*``);
* TORCH — torch's own operators (:mod:`normkit.aten_path`): under ``torch.compile`` (so Inductor
  fuses), ``torch.export``, tracing, ``torch.func``, forward-mode AD, tensor subclasses such as
  DTensor, the meta device.

The layers call the ``*_module`` functions, which add the layer's own state: its expectations
(``num_features``, accepted ranks) and its running statistics, moved by the rules of
:mod:`normkit.running_stats`. For batch and instance norm in training the plain functions update
given running statistics in place exactly as torch does::

    running_mean ← (1 − momentum)·running_mean + momentum·μ_B
    running_var  ← (1 − momentum)·running_var  + momentum·σ²_B·m/(m − 1)     (unbiased)

Besides torch's arguments, ``batch_norm`` and ``group_norm`` take keyword-only ``residual`` and
``act`` (``"relu"``, ``"silu"``, ``"gelu"``) for the fused form ``y = act(norm(x) + residual)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks as C
from . import _fast, activations, aten_path, ops, route, running_stats
from ._checks import NormInputError, fail  # noqa: F401  (for the layers: functional is their door)
from .route import KERNELS, ONE_CALL, ONE_CALL_ATEN, OP, TORCH

__all__ = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "layer_norm_2d", "rms_norm_2d",
           "NormInputError", "CASTINGS", "ACTIVATIONS"]

_ACT_NAMES = activations.names()
_ACT_CODES = activations.codes()

#: the names of the activations normkit fuses (``""`` = none): ``act=`` of the fused forms
ACTIVATIONS = _ACT_NAMES
_ANY_RANK = sum(1 << d for d in range(2, 9))  # (N, C, *) up to 8-D, as a bit mask of accepted ranks
_BN_TRAIN, _BN_INFER = "batch_norm_train", "batch_norm_infer"


def _kernels(path: int):
    """The forward ops of a kernel path: the custom ops (OP) or their eager twins (KERNELS)."""
    return torch.ops.normkit if path == OP else ops.eager


def _declined(path: int) -> int:
    """Where a call the ONE_CALL path handed back goes: the kernels, or torch's operators for aten's."""
    return KERNELS if path == ONE_CALL else TORCH


# ----------------------------------------------------------------------------- for the layers
def check_input_dim(where: str, input: Tensor, accepted_dims: Sequence[int] | None) -> None:
    """A layer's rank check (torch.nn's ``_check_input_dim``): one of ``accepted_dims``, or ≥ 2 for None."""
    C.layer_input(where, input, accepted_dims, None)


def check_activation(where: str, act: str | None) -> str:
    """``act`` as a fused activation's name (``None`` → ``""``), or :class:`NormInputError` naming it."""
    return activations.check(where, act)


def activation_name(module) -> str | None:
    """The fused activation's name for an activation module that one reproduces exactly, else None."""
    return activations.from_module(module)


def activation(y: Tensor, act: str) -> Tensor:
    """``act(y)`` by torch's own function for the fused activation ``act`` (``""``: ``y``)."""
    return aten_path.activation(y, act)


def distributed_active(group) -> bool:
    """Whether ``torch.distributed`` runs with more than one rank in ``group`` (SyncBatchNorm syncs then)."""
    from . import distributed

    return distributed.is_active(group)


# ----------------------------------------------------------------------------- batch norm
def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    act: str | None = None,
) -> Tensor:
    """Batch Normalization (Ioffe & Szegedy, 2015) over ``input`` of shape ``(N, C, *)``.

    ``y = act(γ·(x − μ)/sqrt(σ² + ε) + β + residual)`` with the batch statistics per channel
    (biased variance) when ``training``, else ``running_mean``/``running_var``.
    """
    if isinstance(input, Tensor) and input.dim() < 2 and input.numel() == 0:
        # torch accepts an empty 1-D input (and returns it): nothing to normalize
        return aten_path.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    residual, C.act_name("batch_norm", act, _ACT_NAMES))
    act = act or ""
    fused = residual is not None or act != ""
    path = route.choose(_BN_TRAIN if training else _BN_INFER, fused, input, weight, bias, residual, running_mean,
                        running_var)
    moves = training and running_mean is not None
    if path <= ONE_CALL_ATEN:
        code = _ACT_CODES.get(act)
        if not moves and code is not None and input.dim() >= 2:
            # (a training call that moves running statistics stays on the Python paths: the aten route
            # moves them by aten's formula, the kernel route by this module's _update_running)
            served = _fast.entries().batch_norm(input, weight, bias, running_mean, running_var, None, _ANY_RANK,
                                                input.shape[1], training, False, None, eps, residual, code, False,
                                                path == ONE_CALL_ATEN)
            if served is not None:
                return served[0]
        path = _declined(path)
    act = C.batch_norm("batch_norm", input, running_mean, running_var, weight, bias, training, eps, residual, act,
                       _ACT_NAMES)
    return _batch_norm_on(path, input, running_mean, running_var, weight, bias, training, momentum, eps,
                          residual, act)


def _batch_norm_on(path, input, running_mean, running_var, weight, bias, training, momentum, eps, residual, act,
                   on_stats=None) -> Tensor:
    """A checked BatchNorm call on ``path``.

    ``on_stats(mean, var, count)``, when given, receives the batch statistics (biased variance) in
    place of the update of ``running_mean``/``running_var`` (a layer's running-statistics rules,
    :mod:`normkit.running_stats`); the layers then pass no running statistics.
    """
    if path == TORCH:
        if training and on_stats is not None and torch.compiler.is_compiling() and not aten_path.exporting():
            # one reduction for the output and the statistics, which Inductor fuses as it fuses torch.nn's
            y, mean, var = aten_path.batch_norm_with_stats(input, weight, bias, eps, residual, act)
            on_stats(mean, var, input.numel() // input.shape[1])
            return y
        y = aten_path.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, residual,
                                 act)
        if training and on_stats is not None:
            on_stats(*running_stats.batch_moments(input))  # aten computed them too, but does not return them
        return y
    kernels = _kernels(path)
    if not training:
        return kernels.batch_norm_infer(input, running_mean, running_var, weight, bias, residual, eps, act)
    y, mean, var = kernels.batch_norm_train(input, weight, bias, residual, eps, act)
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if on_stats is not None:
        on_stats(mean, var, count)
    elif count > 0 and running_mean is not None and running_var is not None:
        with torch.no_grad():
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, var * (count / max(count - 1, 1)), momentum)
    return y


def _update_running(running: Tensor, batch: Tensor, momentum: float | Tensor) -> None:
    running.mul_(1 - momentum).add_(batch.to(running.dtype) * momentum)


def batch_norm_module(layer, input: Tensor, residual: Tensor | None = None, act: str = "") -> Tensor:
    """The forward of every normkit BatchNorm layer (``nn/batchnorm.py``): ``act(bn(x) + residual)``.

    Batch statistics in training (or without running statistics), the running ones in eval; a
    training batch moves the running statistics by the layer's ``_update_running_stats``
    (:mod:`normkit.running_stats`: once per real forward, finite batches only).
    """
    weight, bias, running_mean, running_var = layer._state()
    batch_stats = layer.training or running_mean is None
    update = layer.training and layer.track_running_stats and running_mean is not None
    path = route.choose(_BN_TRAIN if batch_stats else _BN_INFER, residual is not None or act != "", input, weight,
                        bias, residual, running_mean, running_var)
    if path <= ONE_CALL_ATEN:
        code = _ACT_CODES.get(act)
        # an update that someone intercepts (normkit.func.functional_call patches _update_running_stats) or a
        # subclass overrides stays on the Python paths
        if code is not None and not (update and (not layer._one_call_update or
                                                 "_update_running_stats" in layer.__dict__)):
            policy = running_stats.update_policy(layer) if update else None
            served = _fast.entries().batch_norm(
                input, weight, bias, running_mean, running_var, layer._buffers.get("num_batches_tracked"),
                layer._dims_mask, layer.num_features, batch_stats, policy is not None, layer.momentum, layer.eps,
                residual, code, policy == "skip", path == ONE_CALL_ATEN)
            if served is not None:
                if served[1]:
                    running_stats.count_skipped(layer, running_mean.device)
                return served[0]
        path = _declined(path)
    act = C.batch_norm(type(layer).__name__, input, running_mean, running_var, weight, bias, batch_stats, layer.eps,
                       residual, act, _ACT_NAMES, num_features=layer.num_features,
                       accepted_dims=None if layer._any_rank else layer._accepted_dims)
    return _batch_norm_on(path, input, None if batch_stats else running_mean, None if batch_stats else running_var,
                          weight, bias, batch_stats, 0.0, layer.eps, residual, act,
                          on_stats=layer._update_running_stats if update else None)


def check_batch_norm(where: str, input: Tensor, running_mean, running_var, weight, bias, training: bool,
                     residual: Tensor | None = None, act: str | None = None, eps: float = 1e-5, *,
                     num_features: int | None = None, accepted_dims: Sequence[int] | None = None,
                     count_rule: bool = True) -> str:
    """BatchNorm's checks (:func:`normkit._checks.batch_norm`) for the layers that compute their own
    forms of BatchNorm (renorm, ghost, frozen); returns the normalised ``act``."""
    return C.batch_norm(where, input, running_mean, running_var, weight, bias, training, eps, residual, act,
                        _ACT_NAMES, num_features=num_features, accepted_dims=accepted_dims, count_rule=count_rule)


def batch_norm_checked(input: Tensor, running_mean, running_var, weight, bias, training: bool, eps: float,
                       residual: Tensor | None = None, act: str = "", *, on_stats=None) -> Tensor:
    """BatchNorm after :func:`check_batch_norm` has passed, on the path :func:`normkit.route.choose`
    picks: the building block of BatchRenorm (γ·r, β + γ·d), GhostBatchNorm (per virtual batch) and
    FrozenBatchNorm. ``on_stats`` as in training BatchNorm (the layer's running-statistics update)."""
    path = route.choose(_BN_TRAIN if training else _BN_INFER, residual is not None or act != "", input, weight,
                        bias, residual, running_mean, running_var)
    if path <= ONE_CALL_ATEN:
        path = _declined(path)
    return _batch_norm_on(path, input, running_mean, running_var, weight, bias, training, 0.0, eps, residual, act,
                          on_stats=on_stats)


def masked_batch_norm1d_module(layer, input: Tensor, mask: Tensor) -> Tensor:
    """BatchNorm1d over the real positions of ``(N, C, L)`` input (:mod:`normkit.masked`)."""
    from .masked import masked_batch_norm1d

    return masked_batch_norm1d(layer, input, mask, batch_norm_module)


def sync_batch_norm_module(layer, input: Tensor, residual: Tensor | None, act: str, group) -> Tensor:
    """SyncBatchNorm in training across the ranks of ``group``: the per-channel statistics of every
    rank's batch together (:mod:`normkit.channel`, :mod:`normkit.distributed`)."""
    from . import channel
    from . import distributed as D

    where = type(layer).__name__
    # the one-value rule is checked below on the *global* count
    act = C.batch_norm(where, input, layer.running_mean, layer.running_var, layer.weight, layer.bias, True,
                       layer.eps, residual, act, _ACT_NAMES, num_features=layer.num_features, count_rule=False)
    if route.choose(_BN_TRAIN, False, input, layer.weight, layer.bias, residual) in (TORCH, OP):
        raise NotImplementedError(
            f"{where}: batch statistics across {D.world_size(group)} ranks under torch.func, forward-mode AD, "
            "tracing, export, torch.compile or a tensor subclass are not supported (nor are they by "
            "torch.nn.SyncBatchNorm on CPU); call the model in eval() mode, or convert it to BatchNorm for "
            "this (normkit.convert)"
        )
    x = ops.dense(input)
    count, mean, var = channel.local_stats(x, for_merge=True)
    count, mean, var = D.merge_stats(count, mean, var, group)  # collective: same result on every rank
    mean = mean.to(var.dtype)  # stat dtype (local_stats may have refined a large mean to float64)
    if count == 1:
        raise fail(
            where,
            "input",
            "more than 1 value per channel over all ranks when training (batch statistics of one value "
            "are undefined; use eval(), GroupNorm or LayerNorm)",
            f"input of {C.shape_str(input)} on this rank and 1 value per channel in total over "
            f"{D.world_size(group)} ranks",
        )
    layer._update_running_stats(mean, var, count)  # every check has passed: now state may change
    rstd = torch.rsqrt(var + layer.eps)
    return channel.normalize_with_stats(x, layer.weight, layer.bias, residual, mean, rstd, count, act, group,
                                        sync=True)


# ----------------------------------------------------------------------------- instance norm
def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance Normalization (Ulyanov et al., 2016): statistics per (sample, channel) over space."""
    path = route.choose("group_norm", False, input, weight, bias, running_mean, running_var)
    C.instance_norm("instance_norm", input, running_mean, running_var, weight, bias, use_input_stats)
    return _instance_norm_on(path, input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def _instance_norm_on(path, input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    if path == TORCH:
        return aten_path.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
                                       eps)
    kernels = _kernels(path)
    input = input.contiguous()  # torch returns a contiguous output for any input layout
    if not use_input_stats:
        # copies, as torch.nn's instance norm makes (repeat): a training step may move the buffers in place
        # before this output's backward reads them
        return kernels.batch_norm_infer(input, running_mean.clone(), running_var.clone(), weight, bias, None, eps,
                                        "")
    y, mean, var = kernels.group_norm(input, input.shape[1], weight, bias, None, eps, "")
    spatial = math.prod(input.shape[2:])
    if running_mean is not None and running_var is not None and input.shape[0] > 0:
        # torch averages the per-instance statistics over the batch (unbiased variance)
        with torch.no_grad():
            _update_running(running_mean, mean.mean(dim=0), momentum)
            _update_running(running_var, (var * (spatial / max(spatial - 1, 1))).mean(dim=0), momentum)
    return y


def instance_norm_module(layer, input: Tensor) -> Tensor:
    """The forward of normkit's InstanceNorm1d/2d/3d (unbatched ``(C, *spatial)`` input too)."""
    p = layer._parameters
    weight, bias = p.get("weight"), p.get("bias")
    running_mean, running_var = layer.running_mean, layer.running_var
    path = route.choose("group_norm", False, input, weight, bias, running_mean, running_var)
    batched = layer._spatial_dims + 2
    if path == ONE_CALL and not layer.track_running_stats and input.dim() == batched \
            and input.numel() > input.shape[0] * input.shape[1]:  # batched, more than one value per instance
        # GroupNorm with a group per channel on the contiguous input, as the KERNELS path computes it
        y = _fast.entries().group_norm(input.contiguous(), layer.num_features, layer.num_features, weight, bias,
                                       layer.eps, None, 0)
        if y is not None:
            return y
    if path <= ONE_CALL_ATEN:
        path = _declined(path)
    where = type(layer).__name__
    names = {1: "L", 2: "H, W", 3: "D, H, W"}[layer._spatial_dims]
    C.check_tensor(where, "input", input)
    C.check_ndim(where, input, (batched - 1, batched), f"(N, C, {names}) or unbatched (C, {names})")
    if input.dim() == batched - 1:
        return instance_norm_module(layer, input.unsqueeze(0)).squeeze(0)
    if input.shape[1] != layer.num_features:
        if layer.affine or layer.track_running_stats:
            C.check_channels(where, input, layer.num_features)
        import warnings

        warnings.warn(
            f"{where}: input has {input.shape[1]} channels but num_features={layer.num_features}; "
            "without affine parameters or running statistics, num_features is not used",
            stacklevel=3,
        )
    use_input_stats = layer.training or not layer.track_running_stats
    C.instance_norm(where, input, running_mean, running_var, weight, bias, use_input_stats)
    update = layer.training and layer.track_running_stats
    if update and running_mean is not None and running_stats.in_recomputation():
        # activation checkpointing recomputes this forward: the same computation (checkpointing
        # compares what it saves), but its update lands on copies (normkit.running_stats)
        running_mean, running_var = running_mean.clone(), running_var.clone()
    return _instance_norm_on(path, input, running_mean if update or not use_input_stats else None,
                             running_var if update or not use_input_stats else None, weight, bias, use_input_stats,
                             0.0 if layer.momentum is None else layer.momentum, layer.eps)


# ----------------------------------------------------------------------------- group norm
def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    act: str | None = None,
) -> Tensor:
    """Group Normalization (Wu & He, 2018): statistics per (sample, group of C/G channels)."""
    return _group_norm(input, num_groups, weight, bias, eps, residual, act or "", "group_norm", None)


def group_norm_module(layer, input: Tensor, residual: Tensor | None = None, act: str = "") -> Tensor:
    """The forward of normkit's GroupNorm and GroupNormAct."""
    p = layer._parameters
    return _group_norm(input, layer.num_groups, p.get("weight"), p.get("bias"), layer.eps, residual, act,
                       type(layer).__name__, layer.num_channels)


def _group_norm(input, num_groups, weight, bias, eps, residual, act, where, num_channels) -> Tensor:
    path = route.choose("group_norm", residual is not None or act != "", input, weight, bias, residual)
    if path <= ONE_CALL_ATEN:
        code = _ACT_CODES.get(act)
        if code is not None and isinstance(input, Tensor) and input.dim() >= 2:
            y = _fast.entries().group_norm(input, num_groups, input.shape[1] if num_channels is None else num_channels,
                                 weight, bias, eps, residual, code)
            if y is not None:
                return y
        path = _declined(path)
    act = C.group_norm(where, input, num_groups, weight, bias, residual, act, _ACT_NAMES, num_channels=num_channels)
    if path == TORCH:
        return aten_path.group_norm(input, num_groups, weight, bias, eps, residual, act)
    return _kernels(path).group_norm(input, num_groups, weight, bias, residual, eps, act)[0]


# ----------------------------------------------------------------------------- layer / RMS norm
def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    casting: str = "torch",
    offset: float = 0.0,
) -> Tensor:
    """Layer Normalization (Ba et al., 2016): per sample over the trailing ``normalized_shape``.

    ``y = γ'·(x − μ)/sqrt(σ² + ε) + β`` with ``γ' = γ + offset`` (added in γ's dtype, as NVIDIA's
    ``LayerNorm1P`` does). Where the result is rounded (``casting``, :data:`CASTINGS`), for the model
    families that round elsewhere than torch:

    * ``"torch"`` — ``F.layer_norm``'s: statistics and affine in float32, rounded once to x's dtype;
    * ``"fp32"`` — timm's ``LayerNormFp32``, Cohere's: the same in float32 with the parameters upcast,
      so any parameter dtype is accepted; output in x's dtype;
    * ``"llama"`` — DeBERTa's: ``x̂`` rounded to x's dtype first, then ``γ'·x̂ + β`` in torch's type
      promotion of the parameters and x.
    """
    if casting != "torch" or offset:
        return _layer_norm_cast(input, normalized_shape, weight, bias, eps, casting, offset)
    return _layer_norm(input, normalized_shape, weight, bias, eps)


def _layer_norm_cast(input, normalized_shape, weight, bias, eps, casting, offset) -> Tensor:
    """:func:`layer_norm` with a ``casting`` or ``offset`` of a model family, composed from the plain one."""
    casting = _casting("layer_norm", casting, ("torch", "fp32", "llama"))
    if offset and weight is not None:
        weight = weight + offset
    if casting == "llama" and (weight is not None or bias is not None):
        return _affine(_layer_norm(input, normalized_shape, None, None, eps), weight, bias)
    if casting == "fp32":
        weight, bias = _upcast(weight), _upcast(bias)
        if input.dtype == torch.float64:
            return _layer_norm(input.float(), normalized_shape, weight, bias, eps).to(input.dtype)
    return _layer_norm(input, normalized_shape, weight, bias, eps)


def _layer_norm(input, normalized_shape, weight, bias, eps) -> Tensor:
    """LayerNorm with torch's casting: the front door proper."""
    path = route.choose("layer_norm", False, input, weight, bias)
    if path <= ONE_CALL_ATEN:
        y = _fast.entries().layer_norm(input, normalized_shape, weight, bias, eps)
        if y is not None:
            return y
        path = _declined(path)
    shape = C.row_norm("layer_norm", input, normalized_shape, weight, bias)
    if path == TORCH:
        return aten_path.layer_norm(input, shape, weight, bias, eps)
    return _kernels(path).layer_norm(input, shape, weight, bias, eps)[0]


#: where a model family rounds a norm's result (``casting=`` of RMSNorm, LayerNorm, LayerNorm2d)
CASTINGS = ("torch", "fp32", "llama", "t5")
_CASTINGS_OF = {"layer_norm": ("torch", "fp32", "llama"), "rms_norm": ("torch", "llama", "t5")}


def check_casting(where: str, casting: str, norm: str) -> str:
    """``casting`` when ``norm`` (``"layer_norm"`` or ``"rms_norm"``) has it, else :class:`NormInputError`."""
    return _casting(where, casting, _CASTINGS_OF[norm])


def options_repr(layer) -> str:
    """``, casting=…, offset=…, layout=…`` for the options of a layer that differ from torch's defaults."""
    parts = [f"{name}={getattr(layer, name)!r}" for name, default in
             (("casting", "torch"), ("offset", 0.0), ("layout", "input")) if getattr(layer, name, default) != default]
    return "".join(", " + p for p in parts)


def _casting(where: str, casting: str, allowed: tuple[str, ...]) -> str:
    if casting not in allowed:
        raise fail(where, "casting", f"one of {allowed}", repr(casting))
    return casting


def _upcast(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.dtype == torch.float32 else t.float()


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int | None = None) -> Tensor:
    """``weight·y + bias`` in torch's ops and type promotion (per channel of dim 1 when ``channel_dim``)."""
    if channel_dim is not None:
        shape = (-1,) + (1,) * (y.dim() - 2)
        weight = None if weight is None else weight.reshape(shape)
        bias = None if bias is None else bias.reshape(shape)
    if weight is not None:
        y = weight * y
    return y if bias is None else y + bias


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    casting: str = "torch",
    offset: float = 0.0,
) -> Tensor:
    """RMS Normalization (Zhang & Sennrich, 2019): ``y = γ'·x/sqrt(mean(x²) + ε)``, ``γ' = γ + offset``.

    ``eps=None`` uses the epsilon of the dtype the statistics are computed in — float32's for float16,
    bfloat16 and float32 input, float64's for float64 — as torch's ``rms_norm`` does (its documentation
    says ``torch.finfo(input.dtype).eps``; its kernels, CPU and CUDA, use the accumulation type's).
    Complex input (which torch accepts) and channels_last input (whose layout torch keeps) are computed by
    torch's own op. torch accepts any floating weight dtype here, and so does normkit.

    Where the result is rounded (``casting``), for the model families that round elsewhere than torch
    (docs/ecosystem.md):

    * ``"torch"`` — ``F.rms_norm``'s: ``(x₃₂·r·γ'₃₂)`` rounded once to x's dtype, ``γ'`` formed in
      float32 (Gemma: ``offset=1.0``, its weight stored without the 1);
    * ``"llama"`` — Llama's and its 137 relatives': ``γ'·(x₃₂·r)`` with the normalized value rounded to
      x's dtype first; output dtype torch's promotion of γ and x;
    * ``"t5"`` — T5's: ``h = x₃₂·r`` in float32, rounded to γ's dtype only when γ is float16/bfloat16,
      then ``γ·h``: γ's dtype, or float32 (even for half input) beside a float32 γ.
    """
    if casting != "torch" or offset:
        return _rms_norm_cast(input, normalized_shape, weight, eps, casting, offset)
    return _rms_norm(input, normalized_shape, weight, eps)


def rms_norm_module(layer, input: Tensor) -> Tensor:
    """The forward of normkit's RMSNorm."""
    weight = layer._parameters.get("weight")
    if layer.casting == "torch" and not layer.offset:  # (the common case without keyword arguments)
        return _rms_norm(input, layer.normalized_shape, weight, layer.eps)
    return _rms_norm_cast(input, layer.normalized_shape, weight, layer.eps, layer.casting, layer.offset)


def _rms_norm_cast(input, normalized_shape, weight, eps, casting, offset) -> Tensor:
    """:func:`rms_norm` with a ``casting`` or ``offset`` of a model family, composed from the plain one."""
    casting = _casting("rms_norm", casting, ("torch", "llama", "t5"))
    if casting != "torch" and weight is not None:
        if offset:
            weight = weight + offset
        if casting == "llama":
            return weight * _rms_norm(input, normalized_shape, None, eps)
        # t5: x·r in float32 (x half: upcast first, its product with the float32 r promotes), then γ's dtype
        half_weight = weight.dtype in (torch.float16, torch.bfloat16)
        if half_weight and input.dtype == weight.dtype:
            h = _rms_norm(input, normalized_shape, None, eps)  # one rounding from float32 to γ's dtype
        else:
            x32 = input if input.dtype in (torch.float32, torch.float64) else input.float()
            h = _rms_norm(x32, normalized_shape, None, eps)
            h = h.to(weight.dtype) if half_weight else h
        return weight * h
    if offset and weight is not None:
        weight = offset + _upcast(weight)
    return _rms_norm(input, normalized_shape, weight, eps)


def _rms_norm(input, normalized_shape, weight, eps) -> Tensor:
    """RMSNorm with torch's casting: the front door proper."""
    path = route.choose("rms_norm", False, input, weight)
    if path <= ONE_CALL_ATEN:
        y = _fast.entries().rms_norm(input, normalized_shape, weight, eps)
        if y is not None:
            return y
        path = _declined(path)
    shape = C.row_norm("rms_norm", input, normalized_shape, weight, None, allow_complex=True, param_dtypes=False)
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    complex_ = input.is_complex() or (weight is not None and weight.is_complex())
    if path == TORCH or complex_ or not input.is_contiguous():
        return aten_path.rms_norm(input, shape, weight, eps)
    return _kernels(path).rms_norm(input, shape, weight, eps)[0]


def layer_norm_module(layer, input: Tensor, mask: Tensor | None = None) -> Tensor:
    """The forward of normkit's LayerNorm; ``mask`` (bool, the input's shape before ``normalized_shape``,
    True = real position): padded positions get output 0 and gradient 0 (:mod:`normkit.masked`)."""
    p = layer._parameters
    if mask is None:
        if layer.casting == "torch" and not layer.offset:  # (the common case without keyword arguments)
            return _layer_norm(input, layer.normalized_shape, p.get("weight"), p.get("bias"), layer.eps)
        return layer_norm(input, layer.normalized_shape, p.get("weight"), p.get("bias"), layer.eps,
                          casting=layer.casting, offset=layer.offset)
    from .masked import masked_layer_norm

    def rows_norm(rows: Tensor) -> Tensor:
        return layer_norm(rows, layer.normalized_shape, layer.weight, layer.bias, layer.eps, casting=layer.casting,
                          offset=layer.offset)

    return masked_layer_norm(layer, input, mask, rows_norm)


# ----------------------------------------------------------------------------- LayerNorm over channels
def layer_norm_2d(input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6, *,
                  casting: str = "torch", layout: str = "input") -> Tensor:
    """LayerNorm over dim 1 of ``(N, C, H, W)`` input at every pixel (:mod:`normkit.nn.layernorm2d`).

    ``casting`` as :func:`layer_norm`'s (``"llama"``: Hugging Face's ConvNeXt LayerNorm, channels_first);
    ``layout``: ``"input"`` returns the input's memory format, ``"channels_last"`` a channels_last output
    whatever the input's — what ``permute → layer_norm → permute`` returns (timm's, torchvision's and
    Hugging Face's LayerNorm2d), so the next convolution runs in the layout it does in the original model.
    """
    return _layer_norm_2d(input, weight, bias, eps, "layer_norm_2d", None, casting, layout)


def layer_norm_2d_module(layer, input: Tensor) -> Tensor:
    """The forward of normkit's LayerNorm2d."""
    p = layer._parameters
    return _layer_norm_2d(input, p.get("weight"), p.get("bias"), layer.eps, type(layer).__name__,
                          layer.normalized_shape[0], layer.casting, layer.layout)


_LAYOUTS = ("input", "channels_last")


def check_layout(where: str, layout: str) -> str:
    """``layout`` (``"input"`` or ``"channels_last"``) or :class:`NormInputError` naming it."""
    if layout not in _LAYOUTS:
        raise fail(where, "layout", f"one of {_LAYOUTS}", repr(layout))
    return layout


def _to_layout(where: str, input: Tensor, layout: str) -> Tensor:
    if layout == "input":
        return input
    check_layout(where, layout)
    if isinstance(input, Tensor) and input.dim() == 4:
        return input.contiguous(memory_format=torch.channels_last)
    return input


def _layer_norm_2d(input, weight, bias, eps, where, num_channels, casting="torch", layout="input") -> Tensor:
    input = _to_layout(where, input, layout)
    if casting != "torch":
        casting = _casting(where, casting, ("torch", "fp32", "llama"))
        if casting == "llama" and (weight is not None or bias is not None):
            y = _layer_norm_2d(input, None, None, eps, where, num_channels)
            return _affine(y, weight, bias, channel_dim=1)
        weight, bias = _upcast(weight), _upcast(bias)
    path = route.choose("layer_norm_2d", False, input, weight, bias)
    if path <= ONE_CALL_ATEN:
        if isinstance(input, Tensor) and input.dim() == 4:
            channels = input.shape[1] if num_channels is None else num_channels
            y = _fast.entries().layer_norm_2d(input, weight, bias, channels, eps)
            if y is not None:
                return y
        path = _declined(path)
    C.layer_norm_2d(where, input, weight, bias, num_channels)
    if path == TORCH:
        return aten_path.layer_norm_2d(input, weight, bias, eps)
    return _kernels(path).layer_norm_2d(input, weight, bias, eps)[0]


def rms_norm_2d(input: Tensor, weight: Tensor | None = None, eps: float = 1e-6, *, layout: str = "input") -> Tensor:
    """RMSNorm over dim 1 of ``(N, C, H, W)`` input at every pixel (timm's ``RmsNorm2d``):
    ``y = γ_c·x/sqrt(mean_c(x²) + ε)``, computed as RMSNorm over the rows of the channels_last form (a copy
    for NCHW input); ``layout`` as :func:`layer_norm_2d`'s."""
    C.layer_norm_2d("rms_norm_2d", input, weight, None)
    rows = input.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # (N, H, W, C), contiguous
    y = rms_norm(rows, (input.shape[1],), weight, eps).permute(0, 3, 1, 2)  # channels_last strides
    if check_layout("rms_norm_2d", layout) == "channels_last":
        return y
    return y.contiguous(memory_format=ops.memory_format_of(input))
