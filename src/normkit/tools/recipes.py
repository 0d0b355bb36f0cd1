"""Recipes: how :func:`normkit.convert` recognises the ecosystem's norm classes, and what it builds.

timm, transformers and torchvision each write their own norm classes; their forwards differ in
where they cast, which eps they read, what activation follows, whether the input is channels-first.
A *recipe* knows one family: it recognises a class, checks the attributes it relies on, and plans
the normkit layer that computes *that class's own forward* (to rounding), holding the very same
parameter and buffer tensors. normkit never imports those libraries: a class is recognised

* **by module and qualified name** for timm's and torchvision's classes (``_BY_NAME``), with
  ``type(m).forward`` required to be the function that name defines (not one patched in later);
* **by its forward** for transformers' families (``_FAMILIES``): the source of ``forward`` (and of
  the helper methods it calls, e.g. ``_norm``) is parsed and normalised — comments, docstrings and
  annotations dropped, the arguments and local variables renamed in order of
  appearance, ``super(Cls, self)`` written ``super()`` — and compared with the family's template.
  A decorated forward does not match an undecorated template. The globals it reads (``torch``,
  ``F``, ``nn``) must be torch's, and a ``super().forward`` call
  must reach the torch class the template names. 140 classes of transformers 5.23 share Llama's
  forward text; a model added next year with that forward is recognised the same way, and a class
  whose forward differs by one token is not (``kernels``' hub replaces ``forward``: not matched);
* **by inheritance** for subclasses of a torch.nn norm that override none of its methods
  (transformers' ``PoolFormerGroupNorm``): the torch class's own recipe.

A recipe returns a :class:`Plan` (normkit class, constructor arguments, the probe's shape) or the
reason it refuses (timm's fast-norm flag on, Cohere's per-head weight, …). :func:`build` makes the
planned layer on the meta device and moves the original's tensors, hooks, flags and kept children
(``act``, ``drop``) into it; :func:`verify` runs both on probes. Classes known to be beyond normkit's
layers are listed in ``_KNOWN_LEFT`` with the reason (EvoNorm, gated RMSNorms, …).

docs/ecosystem.md has the table of what is swapped, what is left and why.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import math
import re
import textwrap
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .. import nn as nk

__all__ = ["Plan", "Refused", "find", "plan", "build", "verify", "probe_device", "fingerprint", "normalise_source",
           "is_norm_layer", "class_name", "known_left"]


# ---------------------------------------------------------------------------------------------
# the census: what counts as a norm layer (the yardstick of coverage, shared with bench --suite zoo)

_NAME = re.compile(r"Norm(?!ali[sz])")
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """A normalization layer of any library: a torch.nn norm (or a subclass), or a module whose
    class name says ``Norm`` (not ``Normalize``) and whose children hold no parameters (so
    ``ConvNormAct`` or ``NormMlpClassifierHead`` containers are not counted, their norms are)."""
    if isinstance(module, _TORCH_NORMS):
        return True
    if not _NAME.search(type(module).__name__):
        return False
    return all(next(c.parameters(), None) is None for c in module.children())


def class_name(module_or_cls) -> str:
    """``library.ClassName`` (``torch``, ``timm``, ``transformers``, ``normkit``, ...)."""
    cls = module_or_cls if isinstance(module_or_cls, type) else type(module_or_cls)
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------------------
# fingerprints of a forward


_MISSING = object()
_TEMPLATE_GLOBALS = {"torch": torch, "F": TF, "nn": nn}  # the names templates use for torch's modules


class _Strip(ast.NodeTransformer):
    """Drops what does not change the computation: docstrings and bare strings, annotations."""

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        return self.generic_visit(node)

    def visit_AnnAssign(self, node):
        if node.value is None:
            return None
        return ast.copy_location(ast.Assign(targets=[node.target], value=self.visit(node.value)), node)

    def visit_arg(self, node):
        node.annotation = None
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "super":
            node.args, node.keywords = [], []  # super(Cls, self) is super()
        return node


class _Rename(ast.NodeTransformer):
    def __init__(self, names: dict[str, str]):
        self.names = names

    def visit_Name(self, node):
        node.id = self.names.get(node.id, node.id)
        return node

    def visit_arg(self, node):
        node.arg = self.names.get(node.arg, node.arg)
        return node


class _Modules(ast.NodeTransformer):
    """``F.layer_norm``, ``nn.functional.layer_norm`` and ``torch.nn.functional.layer_norm`` all read the same
    function: a chain of attributes on a global module is written as the module it reaches (``torch.nn.functional``)."""

    def __init__(self, resolve: Callable[[str], object], local: set[str]):
        self.resolve, self.local = resolve, local

    def visit_Attribute(self, node):
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base)
            base = base.value
        if not (isinstance(base, ast.Name) and base.id not in self.local):
            return self.generic_visit(node)
        obj = self.resolve(base.id)
        if not inspect.ismodule(obj):
            return self.generic_visit(node)
        depth = len(chain)  # chain[depth:] (innermost first) are attributes that reach modules
        for k in range(len(chain) - 1, -1, -1):
            nxt = getattr(obj, chain[k].attr, None)
            if not inspect.ismodule(nxt):
                break
            obj, depth = nxt, k
        canonical = ast.Name(id=obj.__name__, ctx=ast.Load())
        if depth == 0:
            return ast.copy_location(canonical, node)
        chain[depth - 1].value = ast.copy_location(canonical, base)
        return node

    def visit_Name(self, node):
        if node.id not in self.local and isinstance(node.ctx, ast.Load) and inspect.ismodule(self.resolve(node.id)):
            node.id = self.resolve(node.id).__name__
        return node


def _fold_returns(body: list) -> list:
    """``v = E`` directly followed by ``return v`` is ``return E`` (in every block)."""
    for stmt in body:
        for field_ in ("body", "orelse", "finalbody"):
            if isinstance(getattr(stmt, field_, None), list):
                setattr(stmt, field_, _fold_returns(getattr(stmt, field_)))
    if len(body) >= 2:
        *rest, assign, ret = body
        if (isinstance(assign, ast.Assign) and len(assign.targets) == 1 and isinstance(assign.targets[0], ast.Name)
                and isinstance(ret, ast.Return) and isinstance(ret.value, ast.Name)
                and ret.value.id == assign.targets[0].id):
            return [*rest, ast.copy_location(ast.Return(value=assign.value), ret)]
    return body


def _normalise(fn: ast.FunctionDef, resolve: Callable[[str], object] = lambda _g: _MISSING) -> tuple[str, set[str]]:
    """(normalised text, global names it reads that are not modules) of one function definition; ``resolve``
    maps a global name to its value."""
    fn.returns, fn.name = None, "f"  # decorators stay: a wrapper may change what the forward computes
    fn = _Strip().visit(fn)
    fn.body = _fold_returns(fn.body) or [ast.Pass()]
    names: dict[str, str] = {}
    a = fn.args
    for i, arg in enumerate(a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]):
        if not (i == 0 and arg.arg == "self"):
            names.setdefault(arg.arg, f"a{len(names)}")
    stored = [n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store | ast.Del)]
    # locals in order of first appearance in the source (ast.walk is breadth-first: sort by position)
    first = sorted({n: min((m.lineno, m.col_offset) for m in ast.walk(fn) if isinstance(m, ast.Name) and m.id == n)
                    for n in stored}.items(), key=lambda kv: kv[1])
    for n, _ in first:
        names.setdefault(n, f"v{len(names)}")
    fn = _Modules(resolve, set(names) | {"self"}).visit(fn)
    loads = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    fn = _Rename(names).visit(fn)
    ast.fix_missing_locations(fn)
    return ast.unparse(fn), {n for n in loads if n not in names and n != "self" and "." not in n
                             and not inspect.ismodule(resolve(n))}


def normalise_source(source: str, namespace: dict | None = None) -> str:
    """The normalised text of a function's source (see the module docstring); ``namespace`` holds its globals
    (torch's ``torch``, ``F``, ``nn`` by default)."""
    ns = _TEMPLATE_GLOBALS if namespace is None else namespace
    tree = ast.parse(textwrap.dedent(source))
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef):
        raise ValueError("normalise_source: expected one function definition")
    return _normalise(fn, lambda g: ns.get(g, getattr(builtins, g, _MISSING)))[0]


def _describe_global(value) -> str:
    if inspect.ismodule(value):
        return value.__name__
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return type(value).__name__


def _fingerprint_functions(functions: dict[str, Callable], resolve_global: Callable[[Callable, str], object],
                           super_forward: str | None) -> str:
    parts = []
    for name in sorted(functions):
        fn = functions[name]
        src = fn if isinstance(fn, str) else inspect.getsource(fn)
        node = ast.parse(textwrap.dedent(src)).body[0]
        text, globs = _normalise(node, lambda g, fn=fn: resolve_global(fn, g))
        described = []
        for g in sorted(globs):
            value = resolve_global(fn, g)
            if value is _MISSING:
                described.append(f"{g}=?")
            elif value is not getattr(builtins, g, _MISSING):  # a builtin (float, super, ...) is itself
                described.append(f"{g}={_describe_global(value)}")
        parts.append(f"# {name}\n{text}\n# globals: {', '.join(described)}")
    if super_forward:
        parts.append(f"# super().forward: {super_forward}")
    return "\n".join(parts)


def _helpers(cls: type, fn: Callable) -> dict[str, Callable]:
    """Methods of ``cls`` (not torch's) that ``fn`` calls as ``self.name(...)``, recursively."""
    out: dict[str, Callable] = {}
    todo = [fn]
    while todo:
        tree = ast.parse(textwrap.dedent(inspect.getsource(todo.pop())))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"):
                name = node.func.attr
                attr = inspect.getattr_static(cls, name, None)
                if inspect.isfunction(attr) and not attr.__module__.startswith("torch.") and name not in out:
                    out[name] = attr
                    todo.append(attr)
    return out


def _super_forward(cls: type, fn: Callable) -> str | None:
    """``module.qualname`` of what ``super().forward`` inside ``fn`` reaches, if ``fn`` calls it."""
    if "super(" not in inspect.getsource(fn):
        return None
    owner = next((k for k in cls.__mro__ if k.__dict__.get("forward") is fn), None)
    if owner is None:
        return "?"
    mro = cls.__mro__
    for k in mro[mro.index(owner) + 1:]:
        if "forward" in k.__dict__:
            f = k.__dict__["forward"]
            return f"{f.__module__}.{f.__qualname__}"
    return "?"


def fingerprint(cls: type) -> str | None:
    """The normalised forward of ``cls`` with its helpers, globals and ``super().forward``, or None
    when its source cannot be read (a builtin, a class made at run time)."""
    return _fingerprint(cls, getattr(cls, "forward", None))


@cache
def _fingerprint(cls: type, fn) -> str | None:  # keyed by the forward too: one replaced later is read again
    if not inspect.isfunction(fn):
        return None
    try:
        functions = {"forward": fn, **_helpers(cls, fn)}
        return _fingerprint_functions(
            functions, lambda f, g: f.__globals__.get(g, getattr(builtins, g, _MISSING)), _super_forward(cls, fn))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def _template(functions: dict[str, str], super_forward: type | None = None) -> str:
    sup = f"{super_forward.forward.__module__}.{super_forward.forward.__qualname__}" if super_forward else None
    return _fingerprint_functions(functions, lambda _f, g: _TEMPLATE_GLOBALS.get(g, getattr(builtins, g, _MISSING)),
                                  sup)


# ---------------------------------------------------------------------------------------------
# plans


@dataclass
class Plan:
    """What a recipe builds for one layer: ``cls(*args, **kwargs)`` holding the original's tensors.

    ``probe`` is the shape of :func:`verify`'s probe input; ``recipe`` names the recipe (report).
    Modules passed in ``kwargs`` (``act``, ``drop``) are the original's children, kept."""

    recipe: str
    cls: type[nn.Module]
    args: tuple
    kwargs: dict
    probe: tuple[int, ...]
    note: str = ""
    discard: tuple[str, ...] = ()  # children of the original left behind (stateless nn.Identity only)
    retype: bool = False  # a subclass of torch's class: the twin takes the instance's attributes as they are


class Refused(Exception):
    """A recipe's check failed; the message is the reason shown in the report."""


def _need(cond: bool, reason: str) -> None:
    if not cond:
        raise Refused(reason)


def _real(value, what: str) -> float:
    _need(isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0,
          f"{what} is {value!r}, not a non-negative number")
    return float(value)


def _state(m: nn.Module, params: set[str], buffers: set[str] = frozenset(), children: set[str] = frozenset()) -> None:
    """The layer holds exactly these parameters, buffers and children (no state a swap would lose)."""
    p = {k for k, v in m._parameters.items() if v is not None}
    b = {k for k, v in m._buffers.items() if v is not None}
    c = {k for k, v in m._modules.items() if v is not None}
    _need(p == set(params), f"parameters {sorted(p)}, expected {sorted(params)}")
    _need(b <= set(buffers), f"buffers {sorted(b)}, expected at most {sorted(buffers)}")
    _need(c == set(children), f"child modules {sorted(c)}, expected {sorted(children)}")


def _supports(cls: type, *options: str) -> None:
    """``cls``'s constructor takes ``options`` (this normkit's layer API has them)."""
    sig = inspect.signature(cls.__init__).parameters
    missing = [o for o in options if o not in sig]
    _need(not missing, f"needs normkit.{cls.__name__}({', '.join(f'{o}=' for o in missing)}…), "
                       "which this normkit does not have")


def _vector(m: nn.Module, name: str, n: int | None = None) -> int:
    t = getattr(m, name, None)
    _need(isinstance(t, Tensor) and t.dim() == 1 and (n is None or t.shape[0] == n),
          f"{name} of shape {tuple(t.shape) if isinstance(t, Tensor) else None}, expected ({n if n else 'C'},)")
    return t.shape[0]


def _no_fast_norm(m: nn.Module) -> None:
    _need(getattr(m, "_fast_norm", False) is False,
          "timm's fast-norm flag is on (casts to the autocast dtype or calls APEX: another rounding)")


def _shape(m: nn.Module) -> tuple[int, ...]:
    ns = getattr(m, "normalized_shape", None)
    _need(isinstance(ns, tuple | list | torch.Size) and len(ns) >= 1 and all(isinstance(d, int) for d in ns),
          f"normalized_shape is {ns!r}")
    return tuple(ns)


def _affine(m: nn.Module, shape: tuple[int, ...]) -> tuple[bool, bool]:
    """(elementwise_affine, bias) of a LayerNorm-like layer whose weight/bias are ``shape`` or None."""
    w, b = m._parameters.get("weight"), m._parameters.get("bias")
    for name, t in (("weight", w), ("bias", b)):
        if t is not None:
            _need(tuple(t.shape) == shape, f"{name} of shape {tuple(t.shape)}, expected {shape}")
    _need(w is not None or b is None, "a bias without a weight")
    return w is not None, b is not None


def _layer_class(name: str) -> type:
    cls = getattr(nk, name, None)
    _need(cls is not None, f"needs normkit.{name}, which this normkit does not have")
    return cls


def _act_drop(m: nn.Module) -> dict:
    """timm's ``act`` and ``drop`` modules, passed to the normkit layer (which keeps them as children of those
    names; a ``drop`` that is ``nn.Identity`` it leaves out — it holds no state and computes nothing)."""
    act, drop = m._modules.get("act"), m._modules.get("drop")
    _need(isinstance(act, nn.Module) and isinstance(drop, nn.Module), "no act/drop modules")
    return {"act": act, "drop": drop}


def _identity_drop(m: nn.Module) -> tuple[str, ...]:
    return ("drop",) if type(m._modules.get("drop")) is nn.Identity else ()


def _probe_channels(c: int, dims: int = 2) -> tuple[int, ...]:
    return (2, c) + (3,) * dims


# --- torch.nn subclasses that override none of torch's methods ------------------------------------

_TORCH_TWINS = {
    nn.BatchNorm1d: (nk.BatchNorm1d, lambda m: (4, m.num_features)),
    nn.BatchNorm2d: (nk.BatchNorm2d, lambda m: _probe_channels(m.num_features)),
    nn.BatchNorm3d: (nk.BatchNorm3d, lambda m: _probe_channels(m.num_features, 3)),
    nn.InstanceNorm1d: (nk.InstanceNorm1d, lambda m: _probe_channels(m.num_features, 1)),
    nn.InstanceNorm2d: (nk.InstanceNorm2d, lambda m: _probe_channels(m.num_features)),
    nn.InstanceNorm3d: (nk.InstanceNorm3d, lambda m: _probe_channels(m.num_features, 3)),
    nn.LayerNorm: (nk.LayerNorm, lambda m: (2, 3, *m.normalized_shape)),
    nn.GroupNorm: (nk.GroupNorm, lambda m: _probe_channels(m.num_channels)),
    nn.RMSNorm: (nk.RMSNorm, lambda m: (2, 3, *m.normalized_shape)),
}
# what a subclass may define without changing the computation
_HARMLESS = {"__init__", "__module__", "__qualname__", "__doc__", "__annotations__", "__dict__", "__weakref__",
             "extra_repr", "__repr__", "__firstlineno__", "__static_attributes__", "__parameters__", "_is_protocol"}


def _torch_subclass_base(cls: type) -> type | None:
    """The torch.nn norm class whose every method ``cls`` inherits unchanged, if any."""
    for base in _TORCH_TWINS:
        if issubclass(cls, base) and cls is not base:
            for k in cls.__mro__[: cls.__mro__.index(base)]:
                own = [n for n, v in k.__dict__.items() if n not in _HARMLESS and
                       (callable(v) or isinstance(v, property | staticmethod | classmethod) or n == "_version")]
                if own:
                    return None
            return base
    return None


def _plan_torch_subclass(m: nn.Module) -> Plan:
    base = _torch_subclass_base(type(m))
    twin, probe = _TORCH_TWINS[base]
    # the twin is the torch class's own normkit layer: a retype (same attributes) builds it
    return Plan(f"subclass of torch.nn.{base.__name__}", twin, (), {}, probe(m), retype=True)


# --- timm / torchvision, by name ----------------------------------------------------------------


def _bn_act(m: nn.Module) -> Plan:
    _supports(nk.BatchNormAct2d, "drop")
    _state(m, {"weight", "bias"} if m.affine else set(), {"running_mean", "running_var", "num_batches_tracked"},
           {"act", "drop"})
    c = _vector(m, "running_mean") if m.running_mean is not None else m.num_features
    return Plan("timm BatchNormAct2d", nk.BatchNormAct2d,
                (c,), dict(eps=_real(m.eps, "eps"), momentum=m.momentum, affine=m.affine,
                           track_running_stats=m.track_running_stats, **_act_drop(m)), _probe_channels(c),
                discard=_identity_drop(m))


def _sync_bn_act(m: nn.Module) -> Plan:
    c = m.num_features
    _state(m, {"weight", "bias"} if m.affine else set(), {"running_mean", "running_var", "num_batches_tracked"},
           {k for k in ("act", "drop") if k in m._modules})
    drop = m._modules.get("drop")
    _need(drop is None or type(drop) is nn.Identity, "a drop module (DropBlock): normkit.SyncBatchNormAct has no drop")
    act = m._modules.get("act") or nn.Identity()
    return Plan("timm SyncBatchNormAct", nk.SyncBatchNormAct, (c,),
                dict(eps=_real(m.eps, "eps"), momentum=m.momentum, affine=m.affine,
                     track_running_stats=m.track_running_stats, process_group=m.process_group, act=act),
                _probe_channels(c), discard=("drop",) if drop is not None else ())


def _frozen(recipe: str, eps_attr: str | None = "eps", with_act: bool = False):
    def plan(m: nn.Module) -> Plan:
        _supports(nk.FrozenBatchNorm2d, "promote", *(("act", "drop") if with_act else ()))
        _state(m, set(), {"weight", "bias", "running_mean", "running_var"}, {"act", "drop"} if with_act else set())
        c = _vector(m, "weight")
        for name in ("bias", "running_mean", "running_var"):
            _vector(m, name, c)
        eps = _real(getattr(m, eps_attr, None), eps_attr) if eps_attr else 1e-5
        kw = dict(eps=eps, promote=True, **(_act_drop(m) if with_act else {}))
        return Plan(recipe, nk.FrozenBatchNorm2d, (c,), kw, _probe_channels(c), discard=_identity_drop(m))

    plan.recipe = recipe
    return plan


def _group_norm(recipe: str, act: bool = False, fast: bool = True):
    def plan(m: nn.Module) -> Plan:
        if fast:
            _no_fast_norm(m)
        c, g = m.num_channels, m.num_groups
        _state(m, {"weight", "bias"} if m.affine else set(), set(), {"act", "drop"} if act else set())
        kw = dict(eps=_real(m.eps, "eps"), affine=m.affine)
        if act:
            _supports(nk.GroupNormAct, "drop")
            return Plan(recipe, nk.GroupNormAct, (g, c), dict(kw, **_act_drop(m)), _probe_channels(c),
                        discard=_identity_drop(m))
        return Plan(recipe, nk.GroupNorm, (g, c), kw, _probe_channels(c))

    plan.recipe = recipe
    return plan


def _layer_norm(recipe: str, *, two_d: bool = False, act: bool = False, casting: str = "torch",
                fast: bool = True, offset: float = 0.0, eps: float | None = None, layout: str = "channels_last"):
    def plan(m: nn.Module) -> Plan:
        if fast:
            _no_fast_norm(m)
        shape = _shape(m)
        affine, bias = _affine(m, shape)
        _state(m, {k for k, v in (("weight", affine), ("bias", bias)) if v}, set(), {"act", "drop"} if act else set())
        kw = dict(eps=_real(m.eps, "eps") if eps is None else eps, elementwise_affine=affine, bias=bias)
        if casting != "torch":
            kw["casting"] = casting
        if offset:
            kw["offset"] = offset
        if two_d:
            _need(len(shape) == 1, f"normalized_shape {shape}: a channels-first norm normalises one dimension")
            cls = _layer_class("LayerNormAct2d" if act else "LayerNorm2d")
            if cls is not None and "layout" in inspect.signature(cls.__init__).parameters:
                kw["layout"] = layout  # what the permute forms return (until then: the input's layout)
            args, probe = (shape[0],), _probe_channels(shape[0])
        else:
            cls = _layer_class("LayerNormAct" if act else "LayerNorm")
            args, probe = (shape,), (2, 3, *shape)
        if act:
            kw.update(_act_drop(m))
        _supports(cls, *[k for k in ("casting", "offset", "layout", "drop") if k in kw])
        return Plan(recipe, cls, args, kw, probe, discard=_identity_drop(m))

    plan.recipe = recipe
    return plan


def _rms_norm(recipe: str, *, two_d: bool = False, act: bool = False, fast: bool = True):
    def plan(m: nn.Module) -> Plan:
        if fast:
            _no_fast_norm(m)
        shape = _shape(m)
        affine, _ = _affine(m, shape)
        _need(bool(getattr(m, "elementwise_affine", affine)) == affine, "elementwise_affine disagrees with weight")
        _state(m, {"weight"} if affine else set(), set(), {"act", "drop"} if act else set())
        kw = dict(eps=_real(m.eps, "eps"), elementwise_affine=affine)
        if two_d:
            _need(len(shape) == 1, f"normalized_shape {shape}")
            cls = _layer_class("RMSNormAct2d" if act else "RMSNorm2d")
            args, probe = (shape[0],), _probe_channels(shape[0])
        else:
            cls = _layer_class("RMSNormAct" if act else "RMSNorm")
            args, probe = (shape,), (2, 3, *shape)
        if act:
            kw.update(_act_drop(m))
        _supports(cls, *(("drop",) if act else ()))
        return Plan(recipe, cls, args, kw, probe, discard=_identity_drop(m))

    plan.recipe = recipe
    return plan


_NATIVE = ("computes every step in the input's dtype (bf16/fp16 round after each op); normkit accumulates in "
           "fp32: equal in fp32 only, not exact in half precision")

# (module, qualname) -> (recipe, module and qualname of the forward it must have)
_TIMM_NORM, _TIMM_ACT = "timm.layers.norm", "timm.layers.norm_act"
_BY_NAME: dict[tuple[str, str], tuple[Callable, str]] = {
    (_TIMM_ACT, "BatchNormAct2d"): (_bn_act, f"{_TIMM_ACT}.BatchNormAct2d.forward"),
    (_TIMM_ACT, "SyncBatchNormAct"): (_sync_bn_act, f"{_TIMM_ACT}.SyncBatchNormAct.forward"),
    (_TIMM_ACT, "FrozenBatchNormAct2d"): (_frozen("timm FrozenBatchNormAct2d", with_act=True),
                                          f"{_TIMM_ACT}.FrozenBatchNormAct2d.forward"),
    (_TIMM_ACT, "GroupNormAct"): (_group_norm("timm GroupNormAct", act=True), f"{_TIMM_ACT}.GroupNormAct.forward"),
    (_TIMM_ACT, "GroupNorm1Act"): (_group_norm("timm GroupNorm1Act", act=True),
                                   f"{_TIMM_ACT}.GroupNorm1Act.forward"),
    (_TIMM_NORM, "GroupNorm"): (_group_norm("timm GroupNorm"), f"{_TIMM_NORM}.GroupNorm.forward"),
    (_TIMM_NORM, "GroupNorm1"): (_group_norm("timm GroupNorm1"), f"{_TIMM_NORM}.GroupNorm1.forward"),
    (_TIMM_NORM, "LayerNorm"): (_layer_norm("timm LayerNorm"), f"{_TIMM_NORM}.LayerNorm.forward"),
    (_TIMM_NORM, "LayerNormFp32"): (_layer_norm("timm LayerNormFp32", casting="fp32", fast=False),
                                    f"{_TIMM_NORM}.LayerNormFp32.forward"),
    (_TIMM_NORM, "LayerNorm2d"): (_layer_norm("timm LayerNorm2d", two_d=True), f"{_TIMM_NORM}.LayerNorm2d.forward"),
    (_TIMM_NORM, "LayerNorm2dFp32"): (_layer_norm("timm LayerNorm2dFp32", two_d=True, casting="fp32", fast=False),
                                      f"{_TIMM_NORM}.LayerNorm2dFp32.forward"),
    ("timm.models.metaformer", "LayerNormNoBias"): (_layer_norm("timm LayerNormNoBias"),
                                                    "torch.nn.modules.normalization.LayerNorm.forward"),
    ("timm.models.metaformer", "LayerNorm2dNoBias"): (_layer_norm("timm LayerNorm2dNoBias", two_d=True),
                                                      f"{_TIMM_NORM}.LayerNorm2d.forward"),
    (_TIMM_ACT, "LayerNormAct"): (_layer_norm("timm LayerNormAct", act=True), f"{_TIMM_ACT}.LayerNormAct.forward"),
    (_TIMM_ACT, "LayerNormActFp32"): (_layer_norm("timm LayerNormActFp32", act=True, casting="fp32", fast=False),
                                      f"{_TIMM_ACT}.LayerNormActFp32.forward"),
    (_TIMM_ACT, "LayerNormAct2d"): (_layer_norm("timm LayerNormAct2d", two_d=True, act=True),
                                    f"{_TIMM_ACT}.LayerNormAct2d.forward"),
    (_TIMM_ACT, "LayerNormAct2dFp32"): (_layer_norm("timm LayerNormAct2dFp32", two_d=True, act=True, casting="fp32",
                                                    fast=False), f"{_TIMM_ACT}.LayerNormAct2dFp32.forward"),
    (_TIMM_NORM, "RmsNorm"): (_rms_norm("timm RmsNorm"), f"{_TIMM_NORM}.RmsNorm.forward"),
    (_TIMM_NORM, "RmsNormFp32"): (_rms_norm("timm RmsNormFp32", fast=False), f"{_TIMM_NORM}.RmsNormFp32.forward"),
    (_TIMM_NORM, "RmsNorm2dFp32"): (_rms_norm("timm RmsNorm2dFp32", two_d=True, fast=False),
                                    f"{_TIMM_NORM}.RmsNorm2dFp32.forward"),
    (_TIMM_ACT, "RmsNormAct"): (_rms_norm("timm RmsNormAct", act=True),
                                f"{_TIMM_ACT}.RmsNormAct.forward"),
    (_TIMM_ACT, "RmsNormActFp32"): (_rms_norm("timm RmsNormActFp32", act=True, fast=False),
                                    f"{_TIMM_ACT}.RmsNormActFp32.forward"),
    (_TIMM_ACT, "RmsNormAct2dFp32"): (_rms_norm("timm RmsNormAct2dFp32", two_d=True,
                                                                            act=True, fast=False),
                                      f"{_TIMM_ACT}.RmsNormAct2dFp32.forward"),
    ("torchvision.ops.misc", "FrozenBatchNorm2d"): (_frozen("torchvision FrozenBatchNorm2d"),
                                                    "torchvision.ops.misc.FrozenBatchNorm2d.forward"),
    ("torchvision.models.convnext", "LayerNorm2d"): (_layer_norm("torchvision LayerNorm2d", two_d=True, fast=False),
                                                     "torchvision.models.convnext.LayerNorm2d.forward"),
}
# timm classes with a named entry in its norm tables that no normkit layer reproduces exactly
_LEFT_BY_NAME: dict[tuple[str, str], str] = {
    (_TIMM_NORM, "RmsNorm2d"): "timm RmsNorm2d " + _NATIVE,
    (_TIMM_ACT, "RmsNormAct2d"): "timm RmsNormAct2d " + _NATIVE,
}


# --- transformers, by the forward's text --------------------------------------------------------


def _rms(recipe: str, eps_attr: str, casting: str = "torch", offset: float = 0.0, dim_attr: str | None = None):
    def plan(m: nn.Module) -> Plan:
        _state(m, {"weight"})
        d = _vector(m, "weight")
        if dim_attr:
            _need(getattr(m, dim_attr, None) == d, f"{dim_attr} is {getattr(m, dim_attr, None)!r}, weight has {d}")
        kw = dict(eps=_real(getattr(m, eps_attr, None), eps_attr))
        if casting != "torch":
            kw["casting"] = casting
        if offset:
            kw["offset"] = offset
        _supports(nk.RMSNorm, *[k for k in ("casting", "offset") if k in kw])
        return Plan(recipe, nk.RMSNorm, ((d,),), kw, (2, 3, d))

    plan.recipe = recipe
    return plan


def _gemma3n(m: nn.Module) -> Plan:
    _need(getattr(m, "with_scale", None) is True, "with_scale=False: no weight, so the normalised size is not known "
                                                   "before the first call (normkit.RMSNorm needs normalized_shape)")
    return _rms("Gemma3n-style RMSNorm", "eps")(m)


def _weightless(_m: nn.Module) -> Plan:
    raise Refused("no weight, so the normalised size is not known before the first call (normkit.RMSNorm needs "
                  "normalized_shape)")


def _cohere(m: nn.Module) -> Plan:
    _state(m, {"weight"})
    w = m.weight
    _need(w.dim() == 1, f"weight of shape {tuple(w.shape)} with statistics over the last dimension only "
                        "(Cohere's per-head q/k norm): no normkit LayerNorm holds a weight larger than its "
                        "normalised shape")
    d = w.shape[0]
    _supports(nk.LayerNorm, "casting")
    return Plan("Cohere-style LayerNorm", nk.LayerNorm, ((d,),),
                dict(eps=_real(getattr(m, "variance_epsilon", None), "variance_epsilon"), bias=False, casting="fp32"),
                (2, 3, d))


def _deberta(m: nn.Module) -> Plan:
    _state(m, {"weight", "bias"})
    d = _vector(m, "weight")
    _vector(m, "bias", d)
    _supports(nk.LayerNorm, "casting")
    return Plan("DeBERTa-style LayerNorm", nk.LayerNorm, ((d,),),
                dict(eps=_real(getattr(m, "variance_epsilon", None), "variance_epsilon"), casting="llama"), (2, 3, d))


def _convnext_v4(m: nn.Module) -> Plan:
    """transformers < 5: ConvNextLayerNorm was an nn.Module, channels_first written by hand (LayerNorm 'llama')."""
    fmt = getattr(m, "data_format", None)
    _need(fmt in ("channels_first", "channels_last"), f"data_format is {fmt!r}")
    _state(m, {"weight", "bias"})
    d = _vector(m, "weight")
    _vector(m, "bias", d)
    eps = _real(getattr(m, "eps", None), "eps")
    if fmt == "channels_last":
        _need(tuple(getattr(m, "normalized_shape", ())) == (d,), "normalized_shape is not the weight's")
        return Plan("ConvNeXt LayerNorm (channels_last)", nk.LayerNorm, ((d,),), dict(eps=eps), (2, 3, d))
    _supports(nk.LayerNorm2d, "casting")
    return Plan("ConvNeXt LayerNorm (channels_first, by hand)", nk.LayerNorm2d, (d,),
                dict(eps=eps, casting="llama"), _probe_channels(d))


def _convnext(m: nn.Module) -> Plan:
    fmt = getattr(m, "data_format", None)
    _need(fmt in ("channels_first", "channels_last"), f"data_format is {fmt!r}")
    if fmt == "channels_first":
        return _layer_norm("ConvNeXt LayerNorm (channels_first)", two_d=True, fast=False)(m)
    return _layer_norm("ConvNeXt LayerNorm (channels_last)", fast=False)(m)


def _olmo_ln(m: nn.Module) -> Plan:
    _state(m, set())
    shape = _shape(m)
    _supports(nk.LayerNorm, "casting")
    return Plan("OLMo LayerNorm (no affine)", nk.LayerNorm, (shape,),
                dict(eps=1e-5, elementwise_affine=False, casting="fp32"), (2, 3, *shape))


def _bit_group_norm_act(m: nn.Module) -> Plan:
    _supports(nk.GroupNormAct, "drop")
    c, g = m.num_channels, m.num_groups
    _state(m, {"weight", "bias"} if m.affine else set(), set(), {"activation"})
    act = m.activation
    _need(next(act.parameters(), None) is None and next(act.buffers(), None) is None,
          "its activation holds state (it would move from .activation to .act)")
    return Plan("BiT GroupNormActivation", nk.GroupNormAct, (g, c), dict(eps=_real(m.eps, "eps"), affine=m.affine,
                                                                         act=act), _probe_channels(c),
                note="activation kept as .act")


_LLAMA = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
"""
_NORM = """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
"""

# (recipe, template functions, torch class reached by super().forward)
_FAMILIES: list[tuple[Callable, dict[str, str], type | None]] = [
    (_rms("Llama-style RMSNorm", "variance_epsilon", casting="llama"), {"forward": _LLAMA}, None),
    (_rms("Llama-style RMSNorm (Llama4)", "eps", casting="llama"), {"forward": """
def forward(self, x):
    output = self._norm(x.float()).type_as(x)
    return output * self.weight
""", "_norm": _NORM}, None),
    (_rms("Llama-style RMSNorm (CpmAnt)", "eps", casting="llama", dim_attr="dim_norm"), {"forward": """
def forward(self, hidden_states):
    if hidden_states.size(-1) != self.dim_norm:
        raise AssertionError("hidden_states.size(-1) != self.dim_norm")
    old_dtype = hidden_states.dtype
    variance = hidden_states.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
    hidden_states = (hidden_states * torch.rsqrt(variance + self.eps)).to(old_dtype) * self.weight
    return hidden_states
"""}, None),
    (_rms("Gemma-style RMSNorm", "eps", offset=1.0), {"forward": """
def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
""", "_norm": _NORM}, None),
    (_rms("T5-style RMSNorm", "variance_epsilon", casting="t5"), {"forward": """
def forward(self, hidden_states):
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states
"""}, None),
    (_rms("Olmo2-style RMSNorm", "variance_epsilon"), {"forward": """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight * hidden_states).to(input_dtype)
"""}, None),
    (_rms("Helium-style RMSNorm", "variance_epsilon"), {"forward": """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)
"""}, None),
    (_rms("Moshi-style RMSNorm", "eps"), {"forward": """
def forward(self, x):
    output = self._norm(x.float())
    output = output * self.weight.float()
    return output.type_as(x)
""", "_norm": _NORM}, None),
    (_gemma3n, {"forward": """
def forward(self, hidden_states):
    normed_output = self._norm(hidden_states.float())
    if self.with_scale:
        normed_output = normed_output * self.weight.float()
    return normed_output.type_as(hidden_states)
""", "_norm": """
def _norm(self, hidden_states):
    mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.eps
    return hidden_states * torch.pow(mean_squared, -0.5)
"""}, None),
    (_weightless, {"forward": """
def forward(self, x):
    return self._norm(x.float()).type_as(x)
""", "_norm": _NORM}, None),
    (_convnext, {"forward": """
def forward(self, features):
    if self.data_format == "channels_first":
        features = features.permute(0, 2, 3, 1)
        features = super().forward(features)
        features = features.permute(0, 3, 1, 2)
    else:
        features = super().forward(features)
    return features
"""}, nn.LayerNorm),
    (_convnext_v4, {"forward": """
def forward(self, x):
    if self.data_format == "channels_last":
        x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    elif self.data_format == "channels_first":
        input_dtype = x.dtype
        x = x.float()
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = x.to(dtype=input_dtype)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
    return x
"""}, None),
    (_layer_norm("permute LayerNorm2d (channels-first)", two_d=True, fast=False), {"forward": """
def forward(self, hidden_state):
    hidden_state = hidden_state.permute(0, 2, 3, 1)
    hidden_state = F.layer_norm(hidden_state, self.normalized_shape, self.weight, self.bias, self.eps)
    hidden_state = hidden_state.permute(0, 3, 1, 2)
    return hidden_state
"""}, None),
    (_cohere, {"forward": """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    mean = hidden_states.mean(-1, keepdim=True)
    variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
    hidden_states = (hidden_states - mean) * torch.rsqrt(variance + self.variance_epsilon)
    hidden_states = self.weight.to(torch.float32) * hidden_states
    return hidden_states.to(input_dtype)
"""}, None),
    (_deberta, {"forward": """
def forward(self, hidden_states):
    input_type = hidden_states.dtype
    hidden_states = hidden_states.float()
    mean = hidden_states.mean(-1, keepdim=True)
    variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
    hidden_states = (hidden_states - mean) / torch.sqrt(variance + self.variance_epsilon)
    hidden_states = hidden_states.to(input_type)
    y = self.weight * hidden_states + self.bias
    return y
"""}, None),
    (_layer_norm("LayerNorm with (1 + w) (VideoPrism)", fast=False, offset=1.0), {"forward": """
def forward(self, hidden_states):
    return F.layer_norm(hidden_states, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)
"""}, None),
    (_olmo_ln, {"forward": """
def forward(self, hidden_states):
    orig_dtype = hidden_states.dtype
    return F.layer_norm(hidden_states.to(dtype=torch.float32), self.normalized_shape, None, None, eps=1e-5).to(
        orig_dtype)
"""}, None),
    (_layer_norm("LayerNorm in fp32 (EsmFold2)", fast=False, casting="fp32"), {"forward": """
def forward(self, hidden_states):
    return F.layer_norm(hidden_states.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(
        hidden_states.dtype)
"""}, None),
    (_frozen("DETR-style FrozenBatchNorm2d", eps_attr=None), {"forward": """
def forward(self, x):
    weight = self.weight.reshape(1, -1, 1, 1)
    bias = self.bias.reshape(1, -1, 1, 1)
    running_var = self.running_var.reshape(1, -1, 1, 1)
    running_mean = self.running_mean.reshape(1, -1, 1, 1)
    epsilon = 1e-5
    scale = weight * (running_var + epsilon).rsqrt()
    bias = bias - running_mean * scale
    return x * scale + bias
"""}, None),
    (_frozen("torchvision-style FrozenBatchNorm2d"), {"forward": """
def forward(self, x):
    w = self.weight.reshape(1, -1, 1, 1)
    b = self.bias.reshape(1, -1, 1, 1)
    rv = self.running_var.reshape(1, -1, 1, 1)
    rm = self.running_mean.reshape(1, -1, 1, 1)
    scale = w * (rv + self.eps).rsqrt()
    bias = b - rm * scale
    return x * scale + bias
"""}, None),
    (_bit_group_norm_act, {"forward": """
def forward(self, hidden_state):
    hidden_state = nn.functional.group_norm(hidden_state, self.num_groups, self.weight, self.bias, self.eps)
    hidden_state = self.activation(hidden_state)
    return hidden_state
"""}, None),
]


@lru_cache(maxsize=1)
def _family_table() -> dict[str, Callable]:
    return {_template(fns, sup): recipe for recipe, fns, sup in _FAMILIES}


# --- classes known to be beyond normkit's layers ------------------------------------------------

_KNOWN_LEFT: list[tuple[str, str]] = [  # (regular expression on library.QualName, reason)
    (r"^timm\.EvoNorm2d", "EvoNorm: group statistics interleaved with a gate/activation, no normkit op"),
    (r"^timm\.FilterResponseNorm", "FRN: instance RMS without centring, then TLU/activation, no normkit op"),
    (r"^timm\.GlobalResponseNorm", "GRN: an L2 norm over space divided by its channel mean, added back to x"),
    (r"^timm\.SimpleNorm", "SimpleNorm: divides by the unbiased std without centring, no normkit op"),
    (r"^timm\.InplaceAbn", "InplaceAbn: the inplace_abn package's own kernels"),
    (r"^timm\.SplitBatchNorm2d", "SplitBatchNorm2d: routes batch splits to auxiliary BatchNorms"),
    (r"^timm\.LayerNormExp2d", "LayerNormExp2d: a hand-written formula on non-contiguous input"),
    (r"^transformers\..*RMSNormGated$|^transformers\.AXK2GatedRMSNorm$",
     "gated RMSNorm: a second input (the gate) and group statistics"),
    (r"^transformers\..*UnweightedRMSNorm$", "rounds the scale to the input's dtype before the product"),
    (r"^transformers\.NemotronLayerNorm1P$", "under autocast it runs in the autocast dtype (normkit: fp32)"),
    (r"^transformers\.(Chameleon|ImageGPT|VitDet)LayerNorm$|^transformers\..*(Timestep|Flow)(Layer)?Norm$",
     "its own formula in the input's dtype (not exact in half precision)"),
    (r"^transformers\.MuseSparkText(Centered|InputScaled)RMSNorm$", "adds 1 to the weight in the weight's dtype"),
    (r"^transformers\..*(Masked|Cumulative|Adaptive).*Norm$|^transformers\.NoNorm$",
     "statistics over a mask / cumulative / conditioned, or no normalization"),
]


def known_left(name: str) -> str | None:
    for pattern, reason in _KNOWN_LEFT:
        if re.search(pattern, name):
            return reason
    return None


# ---------------------------------------------------------------------------------------------
# finding and planning


def _forward_name(cls: type) -> str:
    f = getattr(cls, "forward", None)
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', '?')}"


@cache
def _find_class(cls: type, _forward=None) -> tuple[Callable | None, str | None]:
    """(recipe's plan function, None) or (None, reason it has none) for a class (and the forward it has now:
    a forward replaced after a first look — ``kernels``' ``kernelize`` — is looked at again)."""
    key = (cls.__module__, cls.__qualname__)
    if key in _BY_NAME:
        recipe, forward = _BY_NAME[key]
        if _forward_name(cls) != forward:
            return None, f"its forward is {_forward_name(cls)}, not {forward} (replaced?)"
        return recipe, None
    if key in _LEFT_BY_NAME:
        return None, _LEFT_BY_NAME[key]
    if _torch_subclass_base(cls) is not None:
        return _plan_torch_subclass, None
    fp = fingerprint(cls)
    if fp is not None and fp in _family_table():
        return _family_table()[fp], None
    reason = known_left(class_name(cls))
    if reason:
        return None, reason
    if isinstance(cls, type) and issubclass(cls, _TORCH_NORMS):
        return None, "a subclass of a torch.nn norm that changes its methods; no recipe knows its forward"
    return None, "no recipe knows this class"


def recipe_name(plan_fn: Callable) -> str:
    """The name of the recipe ``plan_fn`` is (the report's and docs' name)."""
    return getattr(plan_fn, "recipe", plan_fn.__name__.strip("_"))


def find(module: nn.Module) -> tuple[Callable | None, str | None]:
    """The recipe for ``module`` (its plan function) or the reason there is none."""
    if "forward" in module.__dict__:
        return None, "its forward is replaced on the instance"
    cls = type(module)
    return _find_class(cls, getattr(cls, "forward", None))


def plan(module: nn.Module) -> Plan | str:
    """The :class:`Plan` for ``module``, or the reason it is left."""
    recipe, reason = find(module)
    if recipe is None:
        return reason
    try:
        return recipe(module)
    except Refused as err:
        return str(err)
    except AttributeError as err:  # a class of another version without an attribute the recipe reads
        return f"lacks an attribute the recipe reads ({err})"


# ---------------------------------------------------------------------------------------------
# building: the planned layer, holding the original's tensors, hooks and flags

_INTERNAL = frozenset(nn.Module().__dict__)  # torch's own per-instance bookkeeping (hooks, training, ...)
_STATE = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}


def build(module: nn.Module, p: Plan) -> nn.Module:
    """The layer ``p`` plans, holding ``module``'s very parameter and buffer tensors (same names, so
    state_dict keys and an optimizer built before stay valid), its hooks, training flag and any
    attribute of its own that the new class does not define; the kept children (``act``,
    ``drop``) are the original's modules. Raises :class:`Refused` if the state does not fit."""
    if p.retype:
        new = p.cls.__new__(p.cls)
        new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
        return new
    with torch.device("meta"):
        new = p.cls(*p.args, **p.kwargs)
    params, buffers = dict(module._parameters), dict(module._buffers)
    for kind, slots, have in (("parameter", new._parameters, params), ("buffer", new._buffers, buffers)):
        for name, t in slots.items():
            old = have.get(name)
            if t is None:
                _need(old is None, f"{kind} {name}: normkit's layer has none")
                have.setdefault(name, None)
            else:
                _need(old is not None, f"{kind} {name} missing")
                _need(old.shape == t.shape, f"{kind} {name} of shape {tuple(old.shape)}, expected {tuple(t.shape)}")
        extra = [n for n, t in have.items() if t is not None and n not in slots]
        _need(not extra, f"{kind}s {extra} that normkit's layer does not hold")
    kept = {id(c) for c in new._modules.values() if c is not None}
    for n in p.discard:
        _need(type(module._modules.get(n)) in (nn.Identity, type(None)), f"{n} is not an nn.Identity")
    lost = [n for n, c in module._modules.items() if c is not None and id(c) not in kept and n not in p.discard]
    _need(not lost, f"child modules {lost} that normkit's layer does not keep")
    d = {k: v for k, v in module.__dict__.items()
         if k not in _INTERNAL and not hasattr(p.cls, k) and k not in new.__dict__ and k != "forward"}
    d.update({k: v for k, v in new.__dict__.items() if k not in _INTERNAL})
    d.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()
              if k in _INTERNAL and k not in _STATE})
    d["_parameters"], d["_buffers"] = params, buffers
    d["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    d["_modules"] = new._modules
    new.__dict__.clear()
    new.__dict__.update(d)
    return new


# ---------------------------------------------------------------------------------------------
# verification on probes

FP32_TOL = 1e-5  # fp32 rounding of two formulas differs by a few ulps (≤ 2e-6 measured); a wrong eps, offset or
#                  activation by far more on one of the probes


def _bare_copy(m: nn.Module) -> nn.Module:
    """A copy of ``m`` without hooks, with cloned tensors (a probe changes nothing of ``m``)."""
    c = type(m).__new__(type(m))
    d = dict(m.__dict__)
    for k in _INTERNAL:
        if "hook" in k and isinstance(d.get(k), dict):
            d[k] = type(d[k])()
    d["_parameters"] = {k: (None if v is None else nn.Parameter(v.detach().clone(), v.requires_grad))
                        for k, v in m._parameters.items()}
    d["_buffers"] = {k: (None if v is None else v.detach().clone()) for k, v in m._buffers.items()}
    d["_modules"] = OrderedDict((k, None if v is None else _bare_copy(v)) for k, v in m._modules.items())
    c.__dict__.update(d)
    return c


def probe_device(m: nn.Module) -> torch.device:
    """Where :func:`verify` probes ``m``: the device of its first tensor (CPU for a layer without tensors)."""
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


def _half_dtype(m: nn.Module) -> torch.dtype | None:
    dts = {t.dtype for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()}
    return next(iter(dts)) if len(dts) == 1 and next(iter(dts)) in (torch.float16, torch.bfloat16) else None


def _compare(ya, yb, tol: float) -> str | None:
    if not (isinstance(ya, Tensor) and isinstance(yb, Tensor)):
        return None if type(ya) is type(yb) else f"returns {type(yb).__name__}, the original {type(ya).__name__}"
    if ya.shape != yb.shape:
        return f"output shape {tuple(yb.shape)}, the original's {tuple(ya.shape)}"
    if ya.dtype != yb.dtype:
        return f"output dtype {yb.dtype}, the original's {ya.dtype}"
    a, b = ya.detach().double(), yb.detach().double()
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb):
        return "non-finite outputs in other places"
    if not fa.any():
        return None
    scale = a[fa].abs().max().clamp_min(1e-30)
    err = float(((a - b)[fa].abs().max() / scale).item())
    return f"relative error {err:.1e}" if err > tol else None


class _RNG:
    """Saves the generator of ``device`` so both layers draw the same numbers, and restores it after."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def get(self):
        return torch.cuda.get_rng_state(self.device) if self.cuda else torch.get_rng_state()

    def set(self, state):
        (torch.cuda.set_rng_state(state, self.device) if self.cuda else torch.set_rng_state(state))


def verify(original: nn.Module, new: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Run hook-less copies of both layers on probes of ``shape`` (``3 + randn``: a non-zero mean;
    ``1e-3·randn``: a variance below any usual eps, where a wrong eps shows), in fp32 — and also in
    the layer's half dtype when its tensors are all fp16/bf16 — in the original's training mode.
    Returns None when they agree to rounding, else what differs. Neither layer, its running
    statistics, nor any random generator is changed. Layers on the meta device are not probed."""
    device = probe_device(original)
    if device.type == "meta":
        return None
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen, dtype=torch.float32)
    probes = [(3.0 + base).to(device), (1e-3 * base).to(device)]
    rng = _RNG(device)
    saved = rng.get()
    rounds = [(torch.float32, FP32_TOL)]
    half = _half_dtype(original)
    if half is not None:
        rounds.append((half, 4 * torch.finfo(half).eps))
    try:
        with torch.no_grad():
            for dtype, tol in rounds:
                a, b = _bare_copy(original).to(dtype), _bare_copy(new).to(dtype)
                for i, x in enumerate(probes):
                    x = x.to(dtype)
                    rng.set(saved)
                    try:
                        ya = a(x.clone())
                    except Exception as err:  # noqa: BLE001 — the probe does not suit the original: cannot verify
                        return f"the original raised on the probe {tuple(shape)} ({type(err).__name__}: {err})"
                    rng.set(saved)
                    try:
                        yb = b(x.clone())
                    except Exception as err:  # noqa: BLE001
                        return f"raised {type(err).__name__}: {err}"
                    what = _compare(ya, yb, tol)
                    if what:
                        return f"{what} on the {('non-zero-mean', 'tiny-scale')[i]} {str(dtype)[6:]} probe"
    finally:
        rng.set(saved)
    return None
