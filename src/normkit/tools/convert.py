"""Swap the normalization layers of any model between torch.nn and normkit.

``convert(model, to="normkit")`` replaces every torch.nn norm layer (found at any depth) by its
normkit counterpart; ``to="torch"`` goes back. The replacement keeps the very same parameter and
buffer tensors (an optimizer built before the conversion still updates them), hooks and the
training flag. Subclasses of torch.nn norms that normkit does not know are left alone, with a
warning: their forward may do something a swap would lose.

timm's ``LayerNorm2d`` (``permute → LayerNorm → permute``) is recognised by its class name and
becomes :class:`normkit.LayerNorm2d` (same state; it stays normkit's under ``to="torch"``, which has
no such layer).

Other issues extend the table with :func:`register_conversion` (e.g. fused layers).

``convert(model, fuse=True)`` also fuses, inside every ``nn.Sequential``, a BatchNorm1d/2d/3d or
GroupNorm directly followed by ``nn.ReLU``, ``nn.SiLU`` or ``nn.GELU(approximate="none")`` into
:class:`normkit.BatchNormAct1d/2d/3d` / :class:`normkit.GroupNormAct` (same parameter and buffer
tensors). The activation's slot becomes ``nn.Identity`` so indices, names and state_dict keys
stay valid. Activations called from a ``forward`` (not listed in a Sequential) are not seen.
The fused layers convert back to torch only as far as torch has them: ``to="torch"`` leaves
them alone (with a warning), since undoing the fusion would need a new activation module.

``fuse=True`` also fuses patterns written in a ``forward()`` (:mod:`._fx_fuse`): in every module
with a :class:`normkit.BatchNorm2d` child, the torchvision BasicBlock / Bottleneck tail
``relu(bn(h) + shortcut)`` and ``relu(bn(h))``, found with ``torch.fx``, run as one fused
BatchNorm + add + ReLU. A forward that cannot be traced is left as it is, with a warning naming
it and the reason.
"""

from __future__ import annotations

import warnings

from torch import nn

from .. import activations
from .. import nn as nk

__all__ = ["convert", "register_conversion"]

# torch.nn class -> normkit class with the same state (normkit classes subclass their torch twin).
_TO_NORMKIT: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nk.BatchNorm1d,
    nn.BatchNorm2d: nk.BatchNorm2d,
    nn.BatchNorm3d: nk.BatchNorm3d,
    nn.InstanceNorm1d: nk.InstanceNorm1d,
    nn.InstanceNorm2d: nk.InstanceNorm2d,
    nn.InstanceNorm3d: nk.InstanceNorm3d,
    nn.LayerNorm: nk.LayerNorm,
    nn.GroupNorm: nk.GroupNorm,
    nn.RMSNorm: nk.RMSNorm,
    nn.SyncBatchNorm: nk.SyncBatchNorm,  # same state; normkit's works on CPU/gloo too
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_NORMKIT.items()}
_NORM_BASES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def register_conversion(torch_cls: type[nn.Module], normkit_cls: type[nn.Module]) -> None:
    """Teach :func:`convert` a pair of classes whose instances share one state layout."""
    _TO_NORMKIT[torch_cls] = normkit_cls
    _TO_TORCH[normkit_cls] = torch_cls


def retype(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new ``cls`` instance holding ``module``'s parameters, buffers, hooks and flags."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new


def _is_timm_layer_norm_2d(module: nn.Module) -> bool:
    """timm's ``LayerNorm2d`` (LayerNorm over the channels of NCHW input), known by name: timm is optional."""
    cls = type(module)
    return cls.__name__ == "LayerNorm2d" and isinstance(module, nn.LayerNorm) and cls is not nk.LayerNorm2d


def _convert_one(module: nn.Module, table: dict, known: set) -> nn.Module:
    if table is _TO_NORMKIT and _is_timm_layer_norm_2d(module):
        return retype(module, nk.LayerNorm2d)
    cls = table.get(type(module))
    if cls is not None:
        return retype(module, cls)
    own = type(module).__module__.startswith("normkit.")  # normkit's other layers need no swap
    if isinstance(module, _NORM_BASES) and type(module) not in known and not own:
        warnings.warn(
            f"normkit.convert: left {type(module).__qualname__} alone (a subclass of a torch.nn norm that "
            "normkit does not know)",
            stacklevel=3,
        )
    return module


def _activation_name(module: nn.Module) -> str | None:
    """"relu"/"silu"/"gelu" for an activation module a fused layer reproduces exactly, else None
    (``nn.Identity`` too: there is nothing to fuse)."""
    return activations.from_module(module) or None


def _fuse_sequentials(model: nn.Module) -> None:
    from ..nn.fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, GroupNormAct  # late: import cycle

    fusable = {nk.BatchNorm1d: BatchNormAct1d, nk.BatchNorm2d: BatchNormAct2d, nk.BatchNorm3d: BatchNormAct3d,
               nk.GroupNorm: GroupNormAct}
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:], strict=False):
            norm, act_mod = seq._modules[first], seq._modules[second]
            cls = fusable.get(type(norm))
            act = _activation_name(act_mod) if act_mod is not None else None
            if cls is None or act is None:
                continue
            if not activations.fuse_pays("gn" if cls is GroupNormAct else "bn", act):
                continue  # measured slower fused than norm → activation (activations.FUSE_PAYS): left as it is
            fused = retype(norm, cls)
            fused.act = act
            seq._modules[first] = fused
            seq._modules[second] = nn.Identity()


def convert(model: nn.Module, to: str = "normkit", fuse: bool = False) -> nn.Module:
    """Replace every norm layer of ``model`` in place and return the model.

    Args:
        model: any ``nn.Module``; the model itself is converted when it is a norm layer.
        to: ``"normkit"`` (torch.nn → normkit) or ``"torch"`` (normkit → torch.nn).
        fuse: with ``to="normkit"``, also fuse ``norm → activation`` pairs of an
            ``nn.Sequential`` into one layer, and ``relu(bn(h) [+ shortcut])`` written in a
            ``forward()`` (see the module docstring).
    """
    if to not in ("normkit", "torch"):
        raise ValueError(f"convert: to: expected 'normkit' or 'torch', got {to!r}")
    if fuse and to != "normkit":
        raise ValueError("convert: fuse: expected fuse=True only with to='normkit', got to='torch'")
    table = _TO_NORMKIT if to == "normkit" else _TO_TORCH
    known = set(_TO_NORMKIT) | set(_TO_TORCH)
    done: dict[int, nn.Module] = {}  # a layer used in several places stays one layer
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None:
                if id(child) not in done:
                    done[id(child)] = _convert_one(child, table, known)
                if done[id(child)] is not child:
                    parent._modules[name] = done[id(child)]
    model = _convert_one(model, table, known)
    if fuse:
        from ._fx_fuse import fuse_forward_patterns

        _fuse_sequentials(model)
        fuse_forward_patterns(model)
    return model
