"""Fold eval-mode BatchNorm layers into the convolution or linear layer before them.

In eval mode a BatchNorm is a per-channel affine map of its input, so when it directly follows a
layer that is itself affine per output channel (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear),
the pair is one layer with rescaled weights:

    s  = γ / sqrt(σ²_run + ε)                         (per output channel; γ = 1 without affine)
    W' = W · s          along the output-channel axis
    b' = (b − μ_run) · s + β                          (b = 0 when the layer has no bias)

The output-channel axis is dim 0 of a Conv/Linear weight ``(out, in/groups, *k)``; a transposed
convolution stores ``(in, out/groups, *k)``, so its weight is viewed as
``(groups, in/groups, out/groups, *k)`` and scaled along the third axis. The arithmetic is done
in float64 and cast back to the layer's dtype.

Pairs are found in two ways:

1. ``nn.Sequential`` (at any depth): a conv/linear child immediately followed by a BN child.
2. ``torch.fx`` (for models whose ``forward`` traces symbolically): a call of a BN module whose
   single input is a call of a conv/linear module that has no other user. Norm layers are kept
   as leaves of the trace. The result is then an ``fx.GraphModule``.

Folded BNs become ``nn.Identity`` (Sequential) or disappear from the graph (fx). A fused
BN + activation layer (one with an ``act`` attribute such as normkit's ``BatchNormAct2d``) is
folded into the conv and replaced by the activation module (``nn.ReLU``, ``nn.SiLU``,
``nn.GELU``). Everything that cannot be folded stays as it is and is reported.

Reference: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (§3.2, batch normalization folding).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .. import activations

__all__ = ["fold", "FoldReport", "is_batch_norm_like"]

log = logging.getLogger("normkit.fold")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLD_TARGETS = _CONVS + _CONV_TRANSPOSES + (nn.Linear,)
_NORM_LEAVES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


@dataclass
class FoldReport:
    """What :func:`fold` did: ``folded`` (bn name, layer name) pairs and ``kept`` (bn name, reason)."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    used_fx: bool = False

    def __str__(self) -> str:
        lines = [f"normkit.fold: folded {len(self.folded)} BatchNorm layer(s), kept {len(self.kept)}"
                 + (" (torch.fx graph)" if self.used_fx else "")]
        lines += [f"  folded  {bn} -> {layer}" for bn, layer in self.folded]
        lines += [f"  kept    {bn}: {reason}" for bn, reason in self.kept]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- what is a BN
def is_batch_norm_like(m: nn.Module) -> bool:
    """torch.nn / normkit BatchNorm (incl. Sync), or a frozen BN (weight, bias, running_mean, running_var)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    if isinstance(m, _NORM_LEAVES):  # InstanceNorm: statistics per sample, never foldable
        return False
    return all(isinstance(getattr(m, a, None), torch.Tensor) for a in ("weight", "bias", "running_mean",
                                                                          "running_var"))


def _is_frozen(m: nn.Module) -> bool:
    """A frozen BN always uses its buffers, whatever its training flag."""
    return not isinstance(m, nn.modules.batchnorm._BatchNorm)


def _activation_of(bn: nn.Module) -> tuple[nn.Module | None, str | None]:
    """(module to put in the BN's place after folding, or None for nothing; reason if unfoldable)."""
    act = getattr(bn, "act", None)
    if act is None or act == "":
        return None, None
    if isinstance(act, str):
        if act not in activations.names():
            return None, f"fused activation {act!r} has no torch.nn module to keep"
        return activations.to_module(act), None
    if isinstance(act, nn.Module):
        return copy.deepcopy(act), None
    return None, f"fused activation {act!r} is not a name or an nn.Module"


def _why_not_bn(bn: nn.Module) -> str | None:
    """Why this BN cannot be folded into anything (None: it can)."""
    if not _is_frozen(bn):
        if bn.training:
            return "in training mode (uses batch statistics; call model.eval() first)"
        if bn.running_mean is None or bn.running_var is None:
            return "track_running_stats=False (uses batch statistics in eval mode too)"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return "has forward hooks, which folding would drop"
    act, why = _activation_of(bn)
    if why is None and not _computes_eval_formula(bn, act):
        why = (f"{type(bn).__name__}.forward does not compute the eval BatchNorm formula on a probe input "
               "(a subclass with its own forward?)")
    return why


@torch.no_grad()
def _computes_eval_formula(bn: nn.Module, act: nn.Module | None) -> bool:
    """Whether ``bn(x) == act(γ·(x − μ)/sqrt(σ² + ε) + β)`` on a random probe.

    Guards against folding a BN subclass whose forward does something more (an activation under
    another attribute name, a mask, a renormalization) — folding would silently drop it.
    """
    c = bn.running_mean.numel()
    p = bn.running_mean  # device and dtype of the probe
    gen = torch.Generator(device=p.device).manual_seed(0)
    for spatial in ((3, 2), (), (3,), (2, 2, 2)):  # BN2d, BN1d (N, C) and (N, C, L), BN3d
        x = torch.randn((2, c, *spatial), generator=gen, device=p.device, dtype=p.dtype)
        try:
            y = bn(x)
        except Exception:  # this rank is not accepted: try the next
            continue
        shape = (1, c) + (1,) * len(spatial)
        rstd = torch.rsqrt(bn.running_var.double() + float(getattr(bn, "eps", 1e-5)))
        w = bn.weight.double() if bn.weight is not None else torch.ones_like(rstd)
        b = bn.bias.double() if bn.bias is not None else torch.zeros_like(rstd)
        z = (x.double() - p.double().reshape(shape)) * (w * rstd).reshape(shape) + b.reshape(shape)
        want = act.double()(z) if act is not None else z
        tol = 1e-3 if p.dtype in (torch.float16, torch.bfloat16) else 1e-5
        return isinstance(y, torch.Tensor) and torch.allclose(y.double(), want, rtol=tol, atol=tol)
    return False


def _why_not_pair(layer: nn.Module, bn: nn.Module) -> str | None:
    if not isinstance(layer, _FOLD_TARGETS):
        return f"follows {type(layer).__name__}, not a conv/linear layer"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return f"the preceding {type(layer).__name__} has parametrized weights"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.running_mean.numel() != out:
        return f"has {bn.running_mean.numel()} channels but the preceding layer gives {out}"
    if layer._forward_hooks:
        return f"the preceding {type(layer).__name__} has forward hooks"
    return None


# ----------------------------------------------------------------------------- the arithmetic
@torch.no_grad()
def fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """Rescale ``layer``'s weight and bias in place so that ``layer(x) == bn(layer(x))`` (eval)."""
    w = layer.weight
    f64 = torch.float64
    rstd = torch.rsqrt(bn.running_var.to(f64) + float(getattr(bn, "eps", 1e-5)))
    gamma = bn.weight.to(f64) if bn.weight is not None else torch.ones_like(rstd)
    beta = bn.bias.to(f64) if bn.bias is not None else torch.zeros_like(rstd)
    scale = gamma * rstd
    if isinstance(layer, _CONV_TRANSPOSES):
        g = layer.groups
        shape = w.shape
        wv = w.to(f64).reshape(g, shape[0] // g, shape[1], *shape[2:])
        new_w = (wv * scale.reshape(g, 1, shape[1], *([1] * (w.dim() - 2)))).reshape(shape)
    else:
        new_w = w.to(f64) * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = layer.bias.to(f64) if layer.bias is not None else torch.zeros_like(rstd)
    new_b = (b - bn.running_mean.to(f64)) * scale + beta
    layer.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=w.requires_grad)
    layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)


def _replacement(bn: nn.Module) -> nn.Module:
    act, _ = _activation_of(bn)
    return act if act is not None else nn.Identity()


# ----------------------------------------------------------------------------- nn.Sequential
def _fold_sequentials(model: nn.Module, names: dict[int, str], uses: dict[int, int], rep: FoldReport,
                      reasons: dict[str, str]) -> None:
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        keys = list(seq._modules)
        for prev_key, key in zip(keys, keys[1:], strict=False):
            bn, layer = seq._modules[key], seq._modules[prev_key]
            if bn is None or not is_batch_norm_like(bn):
                continue
            name = names[id(bn)]
            why = _why_not_bn(bn) or _why_not_pair(layer, bn)
            if why is None and (uses[id(layer)] > 1 or uses[id(bn)] > 1):
                why = "the layer or the BN is shared (used at more than one place in the model)"
            if why is not None:
                reasons[name] = why
                continue
            fold_pair(layer, bn)
            seq._modules[key] = _replacement(bn)
            rep.folded.append((name, names[id(layer)]))
            reasons.pop(name, None)


# ----------------------------------------------------------------------------- torch.fx
class _NormLeafTracer(fx.Tracer):
    """Keeps every norm layer (and BN-like module) a leaf: their forwards branch on shapes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _NORM_LEAVES) or is_batch_norm_like(m) or super().is_leaf_module(m, qualname)


def _fold_fx(model: nn.Module, rep: FoldReport, reasons: dict[str, str], candidates: list[str]) -> nn.Module:
    """Fold the ``candidates`` through an fx trace of ``model``; returns ``model`` when nothing folds."""
    tracer = _NormLeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # any failure to trace means: fx cannot help here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        for name in candidates:
            reasons[name] += f"; torch.fx cannot trace the model ({type(e).__name__}: {first[:120]})"
        return model
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded_any = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in candidates:
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs:
            reasons[node.target] = "called with more than one input (e.g. a fused residual)"
            continue
        if not isinstance(src, fx.Node) or src.op != "call_module":
            what = src.target if isinstance(src, fx.Node) else type(src).__name__
            what = getattr(what, "__name__", what)
            reasons[node.target] = f"input comes from {what}, not a conv/linear layer"
            continue
        layer = gm.get_submodule(src.target)
        why = _why_not_bn(bn) or _why_not_pair(layer, bn)
        if why is None and len(src.users) > 1:
            why = f"the output of {src.target} is also used elsewhere"
        if why is None and (calls[src.target] > 1 or calls[node.target] > 1):
            why = "the layer or the BN is called more than once"
        if why is not None:
            reasons[node.target] = why
            continue
        fold_pair(layer, bn)
        replacement = _replacement(bn)
        if isinstance(replacement, nn.Identity):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
        else:
            _set_submodule(gm, node.target, replacement)
        rep.folded.append((node.target, src.target))
        reasons.pop(node.target)
        folded_any = True
    if not folded_any:
        return model
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    rep.used_fx = True
    return gm


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


# ----------------------------------------------------------------------------- entry point
def fold(model: nn.Module, report: bool = False):
    """A copy of ``model`` with every foldable BatchNorm folded into the layer before it.

    Args:
        model: any ``nn.Module``; it is deep-copied and never modified. Only BNs in eval mode
            (or frozen BNs) fold; put the model in ``eval()`` first.
        report: if true, return ``(folded_model, FoldReport)``; else log the summary on the
            ``normkit.fold`` logger (INFO, WARNING when something was kept) and return the model.

    The folded model computes the same function as ``model.eval()`` up to rounding (its output
    agrees within about 1e-6 relative in float32). BNs that cannot be folded — training mode,
    no running statistics, not directly after a conv/linear, a conv output that is also used
    elsewhere, a BN with a residual input — are kept and listed with the reason.
    Folding Linear → BatchNorm1d assumes the activations are ``(N, C)``.
    """
    out = copy.deepcopy(model)
    rep = FoldReport()
    names: dict[int, str] = {}
    uses: dict[int, int] = {}
    for name, m in out.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)
        uses[id(m)] = uses.get(id(m), 0) + 1
    reasons = {names[id(m)]: "not directly after a conv/linear layer" for m in out.modules()
               if is_batch_norm_like(m) and m is not out}
    for name in list(reasons):
        why = _why_not_bn(out.get_submodule(name))
        if why is not None:
            reasons[name] = why
    if is_batch_norm_like(out):
        rep.kept.append(("(the model itself)", "a lone BatchNorm has no layer to fold into"))
    _fold_sequentials(out, names, uses, rep, reasons)
    candidates = [name for name in reasons if _why_not_bn(out.get_submodule(name)) is None]
    if candidates:
        out = _fold_fx(out, rep, reasons, candidates)
    rep.kept.extend(sorted(reasons.items()))
    if report:
        return out, rep
    log.log(logging.WARNING if rep.kept else logging.INFO, "%s", rep)
    return out
