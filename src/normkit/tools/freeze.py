"""Freeze and unfreeze the BatchNorm layers of a whole model.

``freeze(model)`` replaces every BatchNorm-like layer that has running statistics —
torch.nn's and normkit's ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``BatchRenorm``,
``GhostBatchNorm`` and fused norm + activation layers — by a :class:`normkit.nn.frozen.
FrozenBatchNorm` of the same dimensionality (``FrozenBatchNorm2d`` for 2d layers) holding
*copies* of its statistics and affine (ones / zeros without affine). The frozen model computes,
in training and eval, what the original computes in eval. Layers without running statistics
(``track_running_stats=False``) cannot be frozen and are left alone with a warning.

``unfreeze(model)`` turns every FrozenBatchNorm back into a trainable layer: the class it was
frozen from, with its arguments (eps, momentum, affine, process group, activation) and
``num_batches_tracked`` — or, for a layer built or loaded as FrozenBatchNorm,
``normkit.BatchNorm1d/2d/3d`` (``SyncBatchNorm`` for the any-dim form) with ``affine=True``.
Weight and bias become new ``nn.Parameter``s holding the frozen values.

Both work in place and return the model (the model itself is replaced when it is such a layer).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..nn.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from ..nn.sync_batchnorm import SyncBatchNorm

__all__ = ["freeze", "unfreeze"]

_ORIGIN = "_normkit_unfrozen"  # attribute of a FrozenBatchNorm: how to rebuild what it was frozen from


def _frozen_class(module: _BatchNorm) -> type[FrozenBatchNorm]:
    """The FrozenBatchNorm accepting the same input dimensions as ``module``."""
    for torch_cls, frozen_cls in ((nn.BatchNorm1d, FrozenBatchNorm1d), (nn.BatchNorm2d, FrozenBatchNorm2d),
                                  (nn.BatchNorm3d, FrozenBatchNorm3d)):
        if isinstance(module, torch_cls):
            return frozen_cls
    dims = tuple(getattr(module, "_accepted_dims", ()))  # normkit's BatchRenorm, GhostBatchNorm
    for frozen_cls in (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d):
        if dims == frozen_cls._accepted_dims:
            return frozen_cls
    return FrozenBatchNorm  # SyncBatchNorm and others: any (N, C, *) input


def _freeze_one(module: nn.Module) -> nn.Module:
    if isinstance(module, FrozenBatchNorm) or not isinstance(module, _BatchNorm):
        return module
    if module.running_mean is None or module.running_var is None:
        warnings.warn(
            f"normkit.freeze: left {type(module).__qualname__} alone (track_running_stats=False: no "
            "statistics to freeze)",
            stacklevel=3,
        )
        return module
    # a fused layer's activation (a name, or the module it holds) and drop path go with it
    act = module.__dict__.get("act", module._modules.get("act"))
    frozen = _frozen_class(module)(module.num_features, module.eps, act=act, drop=module._modules.get("drop"))
    with torch.no_grad():
        c = module.num_features
        ref = module.running_mean
        weight = (
            module.weight if module.weight is not None else torch.ones(c, dtype=ref.dtype, device=ref.device)
        )
        bias = module.bias if module.bias is not None else torch.zeros(c, dtype=ref.dtype, device=ref.device)
        frozen.weight = weight.detach().clone()
        frozen.bias = bias.detach().clone()
        frozen.running_mean = module.running_mean.clone()
        frozen.running_var = module.running_var.clone()
    setattr(
        frozen,
        _ORIGIN,
        {
            "cls": type(module),
            "dict": {k: v for k, v in module.__dict__.items() if not k.startswith("_") and k != "training"},
            "affine": module.affine,
            "num_batches_tracked": None
            if module.num_batches_tracked is None
            else module.num_batches_tracked.clone(),
        },
    )
    frozen.train(module.training)
    return frozen


def _unfreeze_one(module: nn.Module) -> nn.Module:
    if not isinstance(module, FrozenBatchNorm):
        return module
    origin = getattr(module, _ORIGIN, None)
    ref = module.running_mean
    if origin is None:
        cls = {
            FrozenBatchNorm1d: BatchNorm1d,
            FrozenBatchNorm2d: BatchNorm2d,
            FrozenBatchNorm3d: BatchNorm3d,
        }.get(type(module), SyncBatchNorm)
        new = cls(module.num_features, eps=module.eps, device=ref.device, dtype=ref.dtype)
        affine = True
    else:
        cls = origin["cls"]
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update(origin["dict"])
        for name in ("act", "drop"):  # the activation and drop modules the frozen layer carried
            if name in module._modules:
                new._modules[name] = module._modules[name]
        affine = origin["affine"]
        if not affine:
            new.register_parameter("weight", None)
            new.register_parameter("bias", None)
        new.register_buffer("running_mean", None)
        new.register_buffer("running_var", None)
        new.register_buffer("num_batches_tracked", origin["num_batches_tracked"])
    with torch.no_grad():
        if affine:
            new.weight = nn.Parameter(module.weight.clone())
            new.bias = nn.Parameter(module.bias.clone())
        new.running_mean = module.running_mean.clone()
        new.running_var = module.running_var.clone()
    act = module.__dict__.get("act", module._modules.get("act"))
    if act and origin is None:
        warnings.warn(
            f"normkit.unfreeze: {type(new).__name__} has no activation; act={act!r} of the frozen "
            "layer is dropped",
            stacklevel=3,
        )
    new.train(module.training)
    return new


def _swap(model: nn.Module, one) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None:
                new = one(child)
                if new is not child:
                    parent._modules[name] = new
    return one(model)


def freeze(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` with running statistics by a FrozenBatchNorm."""
    return _swap(model, _freeze_one)


def unfreeze(model: nn.Module) -> nn.Module:
    """Replace every FrozenBatchNorm of ``model`` by a trainable BatchNorm (module docstring)."""
    return _swap(model, _unfreeze_one)
