"""Fuse ``relu(bn(h) + shortcut)`` and ``relu(bn(h))`` written in a ``forward()``, through torch.fx.

The block tail of a ResNet (He et al., "Deep Residual Learning", 2016; torchvision's BasicBlock
and Bottleneck) is code, not a ``Sequential``: ``out = self.bn2(self.conv2(out)); out += identity;
return self.relu(out)``. For every module with a :class:`normkit.BatchNorm2d` child, its own
``forward`` is traced with ``torch.fx`` (every submodule a leaf, so only that forward is read) and
each chain

    bn = call of a BatchNorm2d child  →  add(bn, shortcut)  →  relu   (each the only user of the last)
    bn = call of a BatchNorm2d child  →  relu

becomes one call ``act(BN(h) + shortcut)`` of the fused kernel (:func:`_bn_add_relu`). The module
keeps its class, children, parameters, buffers and hooks; only its instance ``forward`` is
replaced (:class:`_FusedForward`) by the rewritten graph's code, which reads the same
attributes, and which steps aside for the class's forward once a child is replaced. The
BatchNorm2d child is not changed: when the class's forward runs (after model surgery, after
unpickling, under TorchScript), it runs unfused, with the same results.

What is not fused, so that results never change:

* a forward ``torch.fx`` cannot trace (data-dependent control flow, unsupported Python) — left
  alone, and one warning lists every such module with the reason;
* a forward whose graph depends on ``self.training`` (traced in both modes, compared);
* a BatchNorm2d called more than once, shared with another module, or carrying hooks; an add
  with ``alpha``, an in-place add into the shortcut, any intermediate used elsewhere;
* at run time, a shortcut that does not match the BatchNorm's output in shape, dtype and device
  (broadcasting) runs the unfused arithmetic.

As with any fx rewrite, Python values read by the forward (e.g. ``self.stride``) are taken at
conversion time.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import nn as nk

_ADDS = {operator.add, operator.iadd, torch.add}
_INPLACE_ADDS = {operator.iadd}
_RELUS = {torch.relu, torch.relu_, F.relu}


def _bn_add_relu(bn: nn.Module, x: Tensor, residual: Tensor | None) -> Tensor:
    """``relu(bn(x) + residual)`` (``relu(bn(x))`` without residual), in one fused pass when it can be."""
    if residual is None or (isinstance(residual, Tensor) and residual.shape == x.shape
                            and residual.dtype == x.dtype and residual.device == x.device):
        return bn._normalize(x, residual, "relu")
    return torch.relu(bn(x) + residual)  # broadcasting or mixed dtypes: exactly what the model wrote



class _FusedForward:
    """A module's instance ``forward``: the rewritten graph's code, run on the module itself.

    It runs only while the module has exactly the children it was traced with; after any child
    is replaced, added or removed (e.g. ``convert(model, to="torch")``, model surgery) the
    class's own forward runs. Pickling restores the class's forward (the rewritten code is
    generated, so not importable); ``copy.deepcopy`` keeps the fusion for the copy (a shallow
    ``copy.copy`` shares the children dict, so it computes the same).
    """

    def __init__(self, module: nn.Module, code) -> None:
        self.module, self.code, self.children = module, code, dict(module._modules)

    def __call__(self, *args, **kwargs):
        m = self.module
        now = m._modules
        if now.keys() == self.children.keys() and all(now[k] is v for k, v in self.children.items()):
            return self.code(m, *args, **kwargs)
        return type(m).forward(m, *args, **kwargs)

    def __deepcopy__(self, memo):
        new = _FusedForward.__new__(_FusedForward)
        memo[id(self)] = new
        new.module, new.code = copy.deepcopy(self.module, memo), self.code
        new.children = copy.deepcopy(self.children, memo)  # the copy's own children, via memo
        return new

    def __reduce__(self):
        # unpickled before the module's state: getattr finds the class's forward, bound
        return (getattr, (self.module, "forward"))


class _ShallowTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a single ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _is_relu(node: fx.Node, root: nn.Module, arg: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _RELUS:
        return node.args == (arg,) and set(node.kwargs) <= {"inplace"}
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return node.args == (arg,) and not node.kwargs
    if node.op == "call_module" and not node.kwargs and node.args == (arg,):
        return type(root.get_submodule(node.target)) is nn.ReLU
    return False


def _shortcut_of_add(node: fx.Node, bn: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``bn + other`` (no alpha, no in-place write into other)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    if node.op == "call_function" and node.target in _ADDS:
        inplace = node.target in _INPLACE_ADDS
    elif node.op == "call_method" and node.target in ("add", "add_"):
        inplace = node.target == "add_"
    else:
        return None
    a, b = node.args
    if a is bn and isinstance(b, fx.Node) and b is not bn:
        return b
    if b is bn and isinstance(a, fx.Node) and not inplace:  # shortcut += bn(h) would write the shortcut
        return a
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _trace(module: nn.Module) -> fx.Graph:
    """The module's forward as a graph; refuses a forward whose graph changes with ``self.training``."""
    graphs = []
    training = module.training
    try:
        for mode in (training, not training):
            module.training = mode  # only this module's flag: its children are leaves
            graphs.append(_ShallowTracer().trace(module))
    finally:
        module.training = training
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise RuntimeError("its forward depends on self.training")
    return graphs[0]


def _rewrite(module: nn.Module, graph: fx.Graph, shared: set[int]) -> int:
    """Replace each fusable chain in ``graph``; the number replaced."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        bn = module.get_submodule(node.target)
        if (type(bn) is not nk.BatchNorm2d or id(bn) in shared or bn._forward_hooks or bn._forward_pre_hooks
                or bn._backward_hooks or bn._backward_pre_hooks):
            continue
        nxt = _only_user(node)
        if nxt is None:
            continue
        residual, chain = None, [node]
        if not _is_relu(nxt, module, node):
            residual = _shortcut_of_add(nxt, node)
            relu = _only_user(nxt) if residual is not None else None
            if relu is None or not _is_relu(relu, module, nxt):
                continue
            chain, nxt = [node, nxt], relu
        with graph.inserting_before(nxt):
            attr = graph.get_attr(node.target)
            new = graph.call_function(_bn_add_relu, (attr, node.args[0], residual))
        nxt.replace_all_uses_with(new)
        for dead in [nxt, *reversed(chain)]:
            graph.erase_node(dead)
        fused += 1
    return fused


def fuse_forward_patterns(model: nn.Module) -> list[str]:
    """Rewrite, in place, the forward of every module of ``model`` holding a fusable chain.

    Returns the qualified names of the modules rewritten ("" for ``model`` itself); warns once
    listing the modules that could not be traced, and why.
    """
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    shared = {i for i, n in seen.items() if n > 1}
    rewritten, failed = [], []
    for name, module in list(model.named_modules()):
        if (type(module).__module__.startswith(("torch.", "normkit.nn")) or isinstance(module, fx.GraphModule)
                or isinstance(module, nn.Sequential | nn.ModuleList | nn.ModuleDict)):
            continue  # library layers and containers have no user-written block tail
        if not any(type(c) is nk.BatchNorm2d for c in module.children()):
            continue
        try:
            graph = _trace(module)
        except Exception as err:  # any tracing failure: leave this forward exactly as it was
            failed.append(f"{name or type(module).__name__} ({type(module).__qualname__}): "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        if _rewrite(module, graph, shared):
            graph.lint()
            code = fx.GraphModule(module, graph, class_name=type(module).__name__)
            module.forward = _FusedForward(module, type(code).forward)
            rewritten.append(name)
    if failed:
        warnings.warn("normkit.convert(fuse=True): could not trace, left unfused: " + "; ".join(failed),
                      stacklevel=3)
    return rewritten
