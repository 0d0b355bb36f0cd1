"""Swap the normalization layers of any model between torch.nn and normkit.

``convert(model, to="normkit")`` replaces every norm layer (found at any depth) by a normkit layer
that computes what it computed; ``to="torch"`` goes back where torch.nn has the layer. The
replacement keeps the very same parameter and buffer tensors (state_dict keys unchanged, so
checkpoints load both ways, and an optimizer built before the conversion still updates them),
hooks and the training flag.

* torch.nn's norms become their normkit twins (same class layout).
* The ecosystem's norm classes — timm's, torchvision's and transformers' — are swapped by the
  recipes of :mod:`.recipes`, without importing those libraries: timm's and torchvision's classes
  are known by module and qualified name, transformers' families (Llama-, Gemma-, T5-style RMSNorm,
  ConvNeXt's channels-first LayerNorm, DETR's FrozenBatchNorm2d, …) by the text of their forward.
  Each recipe builds the normkit layer that reproduces that class's own forward (where it casts,
  eps, the activation and drop path it holds, ``(1 + w)``, channels-first input and the layout it
  returns), and refuses where an attribute it relies on is not as expected.
* ``verify=True`` (the default) runs every recipe's layer beside the original on small probes
  (fp32, the layer's mode, a non-zero-mean and a tiny-scale input, plus the layer's own dtype if
  it is fp16/bf16) and keeps the original, with a warning naming the class and the difference,
  where they differ beyond rounding — third-party classes change between versions. The probes
  run on hook-less copies: no buffer, running statistic or random generator changes.
* Layers no recipe reproduces exactly are left, with one warning per class and reason (the
  table in docs/ecosystem.md lists them). ``report=True`` returns ``(model, ConversionReport)``:
  per class, what was swapped into what, fused, and left with the reason.

Other issues extend the table with :func:`register_conversion` (e.g. fused layers).

``convert(model, fuse=True)`` also fuses, inside every ``nn.Sequential``, a BatchNorm1d/2d/3d or
GroupNorm directly followed by ``nn.ReLU``, ``nn.SiLU`` or ``nn.GELU(approximate="none")`` into
:class:`normkit.BatchNormAct1d/2d/3d` / :class:`normkit.GroupNormAct` (same parameter and buffer
tensors). The activation's slot becomes ``nn.Identity`` so indices, names and state_dict keys
stay valid. Activations called from a ``forward`` (not listed in a Sequential) are not seen.
The fused layers convert back to torch only as far as torch has them: ``to="torch"`` leaves
them alone (with a warning), since undoing the fusion would need a new activation module; so it
does with a layer a recipe built whose options torch.nn lacks (``casting``, ``offset``, …).

``inplace=True`` swaps exact ``BatchNorm → LeakyReLU/ELU`` pairs, and BatchNorms that only feed a
convolution or linear layer, for :class:`normkit.InPlaceABN` (same function, only the output saved for
backward); ``inplace_abn``'s and timm's in-place ABN classes are swapped for it by name in every conversion
(:mod:`.inplace`, with the ``|γ| + ε`` caveat of weights trained with the ``inplace_abn`` package).

``fuse=True`` also fuses patterns written in a ``forward()`` (:mod:`._fx_fuse`): in every module
with a :class:`normkit.BatchNorm2d` child, the torchvision BasicBlock / Bottleneck tail
``relu(bn(h) + shortcut)`` and ``relu(bn(h))``, found with ``torch.fx``, run as one fused
BatchNorm + add + ReLU. A forward that cannot be traced is left as it is, with a warning naming
it and the reason.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

from torch import nn

from .. import activations
from .. import nn as nk
from ..nn.fused import fused_act
from . import recipes
from .report import ConversionReport

__all__ = ["convert", "register_conversion", "ConversionReport"]

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


def register_conversion(torch_cls: type[nn.Module], normkit_cls: type[nn.Module]) -> None:
    """Teach :func:`convert` a pair of classes whose instances share one state layout."""
    _TO_NORMKIT[torch_cls] = normkit_cls
    _TO_TORCH[normkit_cls] = torch_cls


def retype(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new ``cls`` instance holding ``module``'s parameters, buffers, hooks and flags."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new


@dataclass
class _Pass:
    """One conversion's bookkeeping: what happened to each layer (by id) and verify's counts."""

    to: str
    verify: bool
    outcome: dict = field(default_factory=dict)  # id(original) -> ("swapped", recipe) | ("left", reason)
    verified: int = 0
    verify_failed: int = 0
    verify_seconds: float = 0.0


_NO_TWIN = "torch.nn has no such layer"
# options of normkit layers that torch.nn's twin does not have, with their torch.nn values
_TORCH_DEFAULTS = {"casting": "torch", "offset": 0.0, "promote": False, "layout": "input"}


def _torch_option(module: nn.Module) -> str | None:
    for name, plain in _TORCH_DEFAULTS.items():
        value = module.__dict__.get(name, plain)
        if value != plain:
            return f"{name}={value!r}"
    return None


def _to_normkit(module: nn.Module, run: _Pass) -> nn.Module:
    cls = _TO_NORMKIT.get(type(module))
    if cls is not None:
        run.outcome[id(module)] = ("swapped", "torch.nn twin")
        return retype(module, cls)
    if type(module).__module__.startswith("normkit.") or not recipes.is_norm_layer(module):
        return module
    plan = recipes.plan(module)
    if isinstance(plan, str):
        run.outcome[id(module)] = ("left", plan)
        return module
    try:
        new = recipes.build(module, plan)
    except recipes.Refused as err:
        run.outcome[id(module)] = ("left", str(err))
        return module
    if run.verify and recipes.probe_device(module).type != "meta":  # (no values on the meta device to compare)
        t0 = time.perf_counter()
        err = recipes.verify(module, new, plan.probe)
        run.verify_seconds += time.perf_counter() - t0
        if err is not None:
            run.verify_failed += 1
            run.outcome[id(module)] = ("left", f"verify: {plan.recipe} → {plan.cls.__name__}: {err}")
            return module
        run.verified += 1
    run.outcome[id(module)] = ("swapped", plan.recipe)
    return new


def _to_torch(module: nn.Module, run: _Pass) -> nn.Module:
    if not type(module).__module__.startswith("normkit."):
        return module
    cls = _TO_TORCH.get(type(module))
    option = _torch_option(module)
    if cls is None or option is not None:
        if recipes.is_norm_layer(module):
            run.outcome[id(module)] = ("left", _NO_TWIN if cls is None else
                                       f"{option}: torch.nn.{cls.__name__} has no such option")
        return module
    run.outcome[id(module)] = ("swapped", "torch.nn twin")
    return retype(module, cls)


def _convert_one(module: nn.Module, run: _Pass) -> nn.Module:
    return _to_normkit(module, run) if run.to == "normkit" else _to_torch(module, run)


def fused_activation(module: nn.Module) -> str | None:
    """The activation a normkit layer computes inside its kernel (None: none, or run after the norm)."""
    if not type(module).__module__.startswith("normkit."):
        return None
    return fused_act(module) or None


def _report(census: list[tuple[str, nn.Module]], model: nn.Module, run: _Pass) -> ConversionReport:
    rep = ConversionReport(run.to, verified=run.verified, verify_failed=run.verify_failed,
                           verify_seconds=run.verify_seconds)
    now = dict(model.named_modules())
    for path, orig in census:
        e = rep.entry(recipes.class_name(orig))
        e.layers += 1
        was_normkit = type(orig).__module__.startswith("normkit.")
        if was_normkit == (run.to == "normkit"):
            e.already += 1
            continue
        new = now.get(path)
        kind, what = run.outcome.get(id(orig), ("left", None))
        if new is not None and new is not orig and type(new).__module__.startswith("normkit.") == (run.to == "normkit"):
            e.became[recipes.class_name(new)] += 1
            e.recipes[what or "?"] += 1
            act = fused_activation(new)
            if act:
                e.fused[act] += 1
        else:
            e.left[what if kind == "left" and what else "no recipe knows this class"] += 1
    return rep


def _warn_left(rep: ConversionReport) -> None:
    """One warning per class and reason left (normkit's own layers that torch lacks stay silent)."""
    for name, c in rep.classes.items():
        for reason, n in c.left.items():
            if reason == _NO_TWIN:
                continue
            what = "kept" if reason.startswith("verify:") else "left"
            warnings.warn(f"normkit.convert: {what} {n} × {name.split('.', 1)[-1]} ({name.split('.')[0]}): {reason}",
                          stacklevel=3)


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


def convert(model: nn.Module, to: str = "normkit", fuse: bool = False, *, inplace: bool = False,
            verify: bool = True, report: bool = False):
    """Replace every norm layer of ``model`` in place and return the model.

    Args:
        model: any ``nn.Module``; the model itself is converted when it is a norm layer.
        to: ``"normkit"`` (torch.nn and the ecosystem's norms → normkit) or ``"torch"``
            (normkit → torch.nn).
        fuse: with ``to="normkit"``, also fuse ``norm → activation`` pairs of an
            ``nn.Sequential`` into one layer, and ``relu(bn(h) [+ shortcut])`` written in a
            ``forward()`` (see the module docstring).
        inplace: with ``to="normkit"``, also swap ``BatchNorm → LeakyReLU/ELU`` pairs, and BatchNorms that
            only feed convolutions or linear layers, for :class:`normkit.InPlaceABN`, which saves only its
            output for backward (:mod:`.inplace`); the function is unchanged.
        verify: run each layer a recipe built beside the original on probes and keep the
            original, with a warning, where they differ beyond rounding (module docstring).
        report: return ``(model, ConversionReport)`` instead of the model.
    """
    if to not in ("normkit", "torch"):
        raise ValueError(f"convert: to: expected 'normkit' or 'torch', got {to!r}")
    if fuse and to != "normkit":
        raise ValueError("convert: fuse: expected fuse=True only with to='normkit', got to='torch'")
    if inplace and to != "normkit":
        raise ValueError("convert: inplace: expected inplace=True only with to='normkit', got to='torch'")
    t0 = time.perf_counter()
    if to == "normkit":  # inplace_abn's and timm's in-place ABN classes, by name (tools/inplace.py)
        from .inplace import swap_abn_classes

        model = swap_abn_classes(model)
    run = _Pass(to, bool(verify))
    census = [(path, m) for path, m in model.named_modules() if recipes.is_norm_layer(m)]
    done: dict[int, nn.Module] = {}  # a layer used in several places stays one layer
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None:
                if id(child) not in done:
                    done[id(child)] = _convert_one(child, run)
                if done[id(child)] is not child:
                    parent._modules[name] = done[id(child)]
    model = _convert_one(model, run)
    if inplace:
        from .inplace import make_inplace

        make_inplace(model)
    if fuse:
        from ._fx_fuse import fuse_forward_patterns

        _fuse_sequentials(model)
        fuse_forward_patterns(model)
    rep = _report(census, model, run)
    rep.seconds = time.perf_counter() - t0
    _warn_left(rep)
    return (model, rep) if report else model
