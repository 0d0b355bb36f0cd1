"""In-place activated BatchNorm in a model: the drop-ins for ``inplace_abn``'s and timm's classes, and
``convert(model, inplace=True)``, which swaps BatchNorm → activation pairs for :class:`normkit.InPlaceABN`.

**The classes** (:func:`swap_abn_classes`, run by every ``convert(to="normkit")``): ``inplace_abn``'s
``InPlaceABN``, ``InPlaceABNSync`` and ``ABN`` and timm's ``InplaceAbn`` — known by module and qualified name,
never imported — become :class:`normkit.InPlaceABN` / :class:`normkit.InPlaceABNSync` holding the very same
parameter and buffer tensors (state_dict keys unchanged; timm's layer has no ``num_batches_tracked`` and the
swapped one has none either). The ``inplace_abn`` package's kernels (its ``InPlaceABN``, ``InPlaceABNSync``,
and timm's ``InplaceAbn``, which calls them) compute ``act(x̂·(|γ| + ε) + β)``, normkit ``act(γ·x̂ + β)``: so
that the swap is exact, the swap rewrites ``γ ← |γ| + ε`` in place (warned once). A checkpoint the package
saved, loaded into the converted model later, needs the same rewrite: :func:`reparameterize_abn_weights`
after the load. ``ABN`` is plain BatchNorm → activation: swapped as it is.

**convert(model, inplace=True)** (:func:`make_inplace`) swaps, with the function unchanged:

* a BatchNorm1d/2d/3d (torch.nn's or normkit's, exact class, no hooks, used once) directly followed by an
  exact ``nn.LeakyReLU`` or ``nn.ELU`` — in an ``nn.Sequential``, or module calls in a ``forward()`` found
  with ``torch.fx`` — for ``InPlaceABN(activation="leaky_relu" | "elu")``, the activation's slot becoming
  ``nn.Identity``;
* a BatchNorm whose output feeds a convolution or linear layer (which keeps it for its own backward anyway),
  and nothing that writes it in place (MobileNetV2 / EfficientNet projection layers, found with ``torch.fx``
  across modules), for ``InPlaceABN(activation="identity")``.

Since the swapped layer saves its output, nothing may write that output in place afterwards (autograd would
raise at backward): the traced graph is checked for in-place users (``+=``, ``relu_``, ``inplace=True``
modules) of the output.

The swapped layer writes its output over its input (``inplace=True``) only where that input is provably
nobody else's: the fresh output of an ``nn.Conv*`` / ``nn.Linear`` that only the BatchNorm reads. Elsewhere
(a pre-activation block's BatchNorm, whose input is also the shortcut) it gets ``inplace=False``: it still
saves only its output for backward, and never writes its input.

The whole model is traced once with ``torch.fx`` (torch.nn's and normkit's layers as leaves); a model that
does not trace is handled by its ``nn.Sequential`` containers alone, with a warning naming the reason.
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch import fx, nn

from .. import nn as nk

__all__ = ["swap_abn_classes", "make_inplace", "reparameterize_abn_weights"]

# (module, qualified name) of the classes swapped by name; the bool says the package's |γ| + ε kernels
_ABN_PACKAGE = "inplace_abn"
_TIMM_MODULES = ("timm.layers.inplace_abn", "timm.models.layers.inplace_abn")

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nk.BatchNorm1d, nk.BatchNorm2d, nk.BatchNorm3d)
_FRESH_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                    nn.Linear)
_ABS_MARK = "_abn_abs_weight"  # a layer swapped from a |γ| + ε class of the package


def _abn_kind(module: nn.Module) -> tuple[type, bool] | None:
    """(normkit class, uses |γ| + ε) for an ``inplace_abn`` / timm class, by name; None for anything else."""
    cls = type(module)
    mod, name = cls.__module__, cls.__qualname__
    if mod == _ABN_PACKAGE or mod.startswith(_ABN_PACKAGE + "."):
        if name == "InPlaceABNSync":
            return nk.InPlaceABNSync, True
        if name in ("InPlaceABN", "ABN"):
            return nk.InPlaceABN, name == "InPlaceABN"
    if mod in _TIMM_MODULES and name == "InplaceAbn":
        return nk.InPlaceABN, True
    return None


def _retype(module: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return new


def _from_abn(module: nn.Module) -> nn.Module | None:
    found = _abn_kind(module)
    if found is None:
        return None
    cls, absolute = found
    d = module.__dict__
    activation = d.get("activation", d.get("act_name", "leaky_relu")) or "identity"
    param = float(d.get("activation_param", d.get("act_param", 0.01)))
    if activation not in ("leaky_relu", "elu", "identity"):
        return None  # ABN with "relu": not an in-place form (convert leaves it)
    new = _retype(module, cls)
    for key in ("act_name", "act_param"):  # timm's names
        new.__dict__.pop(key, None)
    if "num_batches_tracked" not in new._buffers:  # timm's layer has none: keep its state_dict keys
        new._buffers["num_batches_tracked"] = None
    if "track_running_stats" not in new.__dict__:
        new.track_running_stats = new._buffers.get("running_mean") is not None
    new.inplace = True
    new.activation_param = param
    new.activation = activation
    if cls is nk.InPlaceABNSync and "group" not in new.__dict__:
        new.group = None
    if absolute and new._parameters.get("weight") is not None:
        new.__dict__[_ABS_MARK] = True
    return new


def swap_abn_classes(model: nn.Module) -> nn.Module:
    """Swap every ``inplace_abn`` / timm in-place ABN layer of ``model`` (and ``model`` itself) for normkit's,
    rewriting the weights of the package's ``|γ| + ε`` layers so that the function is unchanged (module
    docstring); warns once when it rewrote any."""
    done: dict[int, nn.Module | None] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                done[id(child)] = _from_abn(child)
            if done[id(child)] is not None:
                parent._modules[name] = done[id(child)]
    top = _from_abn(model)
    model = top if top is not None else model
    rewritten = sum(_reparameterize(m) for m in done.values() if m is not None) + (
        _reparameterize(top) if top is not None else 0)
    if rewritten:
        warnings.warn(
            f"normkit.convert: {rewritten} in-place ABN layer(s) of the inplace_abn package (or timm's InplaceAbn, "
            "which calls it) became normkit.InPlaceABN, which computes act(γ·x̂ + β) where the package computed "
            "act((|γ| + ε)·x̂ + β): their weight now holds |γ| + ε, so the model computes what it computed. A "
            "checkpoint saved by the package and loaded into the converted model needs the same rewrite: "
            "normkit.tools.inplace.reparameterize_abn_weights(model) after loading it", stacklevel=3)
    return model


@torch.no_grad()
def _reparameterize(layer: nn.Module) -> int:
    if not layer.__dict__.get(_ABS_MARK):
        return 0
    layer.weight.abs_().add_(layer.eps)
    return 1


def reparameterize_abn_weights(model: nn.Module) -> int:
    """``γ ← |γ| + ε`` in place in every layer :func:`swap_abn_classes` made from a ``|γ| + ε`` class: call it
    after loading a checkpoint saved by the ``inplace_abn`` package (or timm's ``InplaceAbn``) into a converted
    model, so that the model computes what the package's did (convert itself already did it for the weights the
    model held). Returns how many layers it rewrote."""
    return sum(_reparameterize(m) for m in model.modules())


# ----------------------------------------------------------------------------- convert(inplace=True)
def _activation_of(module: nn.Module) -> tuple[str, float] | None:
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if type(module) is nn.ELU:
        return "elu", float(module.alpha)
    return None


def _plain_bn(module: nn.Module) -> bool:
    return (type(module) in _BN_TYPES and not (module._forward_hooks or module._forward_pre_hooks
                                               or module._backward_hooks or module._backward_pre_hooks))


def _hookless(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _to_inplace(bn: nn.Module, activation: str, param: float, inplace: bool) -> nn.Module:
    new = _retype(bn, nk.InPlaceABN)
    new.inplace = inplace
    new.activation_param = param
    new.activation = activation
    return new


class _LeafTracer(fx.Tracer):
    """torch.nn's and normkit's layers are leaves; the model's own modules are traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("normkit.nn") or super().is_leaf_module(m, qualname)


def _swap_at(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = new


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow, torch.relu_,
                      torch.nn.functional.relu_, torch.nn.functional.leaky_relu_, torch.nn.functional.elu_}


def _mutates(node: fx.Node, arg: fx.Node, model: nn.Module) -> bool:
    """Whether ``node`` writes ``arg`` in place (which would invalidate a saved output)."""
    if arg not in node.all_input_nodes:
        return False
    first = node.args[0] if node.args else None
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS and first is arg
    if node.op == "call_method":
        return node.target.endswith("_") and first is arg
    if node.op == "call_module":
        return getattr(model.get_submodule(node.target), "inplace", False) is True and first is arg
    return False


def _graph_plan(model: nn.Module, shared: set[int]) -> list[tuple[str, str, float, bool, str | None]]:
    """(bn path, activation, param, inplace, activation module path or None) for every swap the traced
    graph of the whole model allows."""
    graph = _LeafTracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    plan = []

    def module_of(node):
        return model.get_submodule(node.target) if node.op == "call_module" else None

    def keeps_input(node, arg):  # a convolution or linear layer reading arg: it saves arg for its backward
        m = module_of(node)
        return m is not None and type(m) in _FRESH_PRODUCERS and node.args[:1] == (arg,)

    for node in graph.nodes:
        bn = module_of(node)
        if bn is None or not _plain_bn(bn) or calls[node.target] != 1 or id(bn) in shared or node.kwargs \
                or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        producer = module_of(src)
        exclusive = (producer is not None and type(producer) in _FRESH_PRODUCERS and len(src.users) == 1
                     and calls[src.target] == 1)
        users = list(node.users)
        if len(users) == 1 and module_of(users[0]) is not None and not users[0].kwargs:
            act_node, act_mod = users[0], module_of(users[0])
            act = _activation_of(act_mod)
            if (act is not None and calls[act_node.target] == 1 and id(act_mod) not in shared and _hookless(act_mod)
                    and act_node.args == (node,) and not any(_mutates(u, act_node, model) for u in act_node.users)):
                plan.append((node.target, act[0], act[1], exclusive, act_node.target))
                continue
        # identity: some user keeps the output anyway (a convolution / linear layer), none writes it in place
        if any(keeps_input(u, node) for u in users) and not any(_mutates(u, node, model) for u in users):
            plan.append((node.target, "identity", 0.01, exclusive, None))
    return plan


def _sequential_plan(model: nn.Module, shared: set[int]) -> list[tuple[str, str, float, bool, str | None]]:
    """The swaps visible inside ``nn.Sequential`` containers alone (a model torch.fx cannot trace): a pair, or
    an identity BatchNorm, whose output goes to a convolution or linear layer of the same container (what
    follows a container's last layer is not known, and might write the output in place)."""
    plan = []
    for path, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        mods = [seq._modules[n] for n in names]
        prefix = f"{path}." if path else ""
        for i, bn in enumerate(mods[:-1]):
            if bn is None or not _plain_bn(bn) or id(bn) in shared:
                continue
            exclusive = i > 0 and type(mods[i - 1]) in _FRESH_PRODUCERS and id(mods[i - 1]) not in shared
            nxt = mods[i + 1]
            after = mods[i + 2] if i + 2 < len(mods) else None
            act = _activation_of(nxt) if nxt is not None else None
            if act is not None and id(nxt) not in shared and _hookless(nxt) and type(after) in _FRESH_PRODUCERS:
                plan.append((prefix + names[i], act[0], act[1], exclusive, prefix + names[i + 1]))
            elif type(nxt) in _FRESH_PRODUCERS:
                plan.append((prefix + names[i], "identity", 0.01, exclusive, None))
    return plan


def make_inplace(model: nn.Module) -> list[str]:
    """Swap, in place, the BatchNorm → LeakyReLU/ELU pairs and the BatchNorms that only feed convolutions or
    linear layers for :class:`normkit.InPlaceABN` (module docstring); returns the swapped BatchNorms' paths."""
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    shared = {i for i, n in seen.items() if n > 1}
    try:
        plan = _graph_plan(model, shared)
    except Exception as err:  # a model torch.fx cannot trace: its Sequential containers only
        first = str(err).splitlines()[0] if str(err) else ""
        warnings.warn(f"normkit.convert(inplace=True): {type(model).__name__} does not trace with torch.fx "
                      f"({type(err).__name__}: {first}); only BatchNorm → activation pairs inside nn.Sequential "
                      "containers were swapped", stacklevel=3)
        plan = _sequential_plan(model, shared)
    swapped = []
    for bn_path, activation, param, exclusive, act_path in plan:
        bn = model.get_submodule(bn_path)
        _swap_at(model, bn_path, _to_inplace(bn, activation, param, exclusive))
        if act_path is not None:
            _swap_at(model, act_path, nn.Identity())
        swapped.append(bn_path)
    return swapped
