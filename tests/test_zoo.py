"""Real timm / transformers / torchvision models, converted: equal to the originals, layer by layer.

Each model is built from a config (no weights, no network; :mod:`normkit.bench.zoo`'s builders,
small sizes) in fp32. The checks are generic — they take whatever ``normkit.convert`` swapped, so a
new conversion recipe is checked here the day it lands:

* the whole converted model (``convert(model)`` and ``convert(model, fuse=True)``) against the
  original: outputs, gradients and buffers after a training step, eval output after it;
* every swapped layer against the original layer on the input it really sees in the model (and
  on that input × 0.01, where a different eps shows), train and eval: output, input and parameter
  gradients, buffers — fp32, to rounding;
* every swapped layer in bf16 (weights and input) against the original layer in float64: its
  error (relative Frobenius norm of the output and of every gradient) is at most the original
  class's own bf16 error (``BF16_FACTOR``; DESIGN §4 allows twice, issue 20 asks for no more);
* coverage: ≥ 99 % of each model's norm layers convert. Where ``convert`` does not know a class
  yet, that case is an ``xfail(strict=True)`` naming the classes: it fails (XPASS) as soon as the
  recipe lands, and its mark must then go.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from normkit.bench import zoo

# Fast to build at the tests' sizes, one or more per family of norm classes.
MODELS = ["regnetx_002", "vit_tiny", "convnext_atto", "tv_resnet18_frozen",
          "llama", "gemma", "qwen3", "olmo2", "t5", "cohere", "bert", "hf_convnext", "hf_resnet"]

# Models whose norm classes convert does not know yet (issue 20): their coverage target is an
# expected failure until the recipes land. Remove a key when its test XPASSes.
NOT_YET: dict[str, str] = {}

OUT_TOL = 4e-6  # one layer, fp32: ÷ the largest output magnitude (measured ≤ 1e-6)
GRAD_TOL = 2e-5  # one layer, fp32: ÷ the largest entry of that gradient
BUF_TOL = 1e-6  # zoo.buffer_error
BF16_FACTOR = 1.1  # at most the original's own bf16 error, 10 % slack for the estimate (measured ≤ 1.02 today)
BF16_FLOOR = 2.0**-10  # below a quarter of bf16's unit roundoff an error is the last bit's rounding


@dataclass
class Case:
    built: zoo.Built
    before: dict[str, str]  # path -> class of every norm layer
    converted: dict[str, nn.Module]  # variant -> converted deep copy
    inputs: dict[str, tuple[tuple, dict]]  # path -> the (args, kwargs) the layer saw


_CACHE: dict[str, Case] = {}


def _capture(model: nn.Module, built: zoo.Built, paths) -> dict[str, tuple[tuple, dict]]:
    """The first call's arguments of each layer at ``paths`` during one training forward."""
    mods, got, handles = dict(model.named_modules()), {}, []

    def detach(v):
        return v.detach().clone() if torch.is_tensor(v) else v

    for p in paths:
        def hook(_m, args, kwargs, p=p):
            got.setdefault(p, (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))

        handles.append(mods[p].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            built.output(model)
    finally:
        for h in handles:
            h.remove()
    return got


def case(key: str, request) -> Case:
    if key not in _CACHE:
        spec = zoo.specs([key])[0]
        request.getfixturevalue(spec.library)  # the library, imported through tests/ecosystem.py
        built = zoo.build(spec, tiny=True)
        before = zoo.norm_layers(built.model)
        converted = {name: zoo.convert(copy.deepcopy(built.model), **kw)[0] for name, kw in zoo.VARIANTS.items()}
        # captured on a copy: the forward updates running statistics
        _CACHE[key] = Case(built, before, converted, _capture(copy.deepcopy(built.model), built, before))
    return _CACHE[key]


def swapped_pairs(c: Case):
    """(path, original layer, converted layer) for every norm layer ``convert(model)`` swapped.

    Plain ``convert`` takes no activation from outside a layer (``fuse=True`` does, so its layers
    are checked through the whole model only): each swapped layer must compute what the original
    layer computed, its own activation included (timm's BatchNormAct2d, say)."""
    orig, conv = dict(c.built.model.named_modules()), dict(c.converted["normkit"].named_modules())
    for path, cls in c.before.items():
        new = conv.get(path)
        if new is not None and zoo.is_normkit(zoo.class_name(new)) and not zoo.is_normkit(cls):
            yield path, orig[path], new


def _floating(v):
    return torch.is_tensor(v) and v.is_floating_point()


def run_layer(layer: nn.Module, args: tuple, kwargs: dict, dtype=None, seed: int = 0):
    """Output, gradients (w.r.t. floating inputs, then parameters) and buffers of one call."""
    if dtype is not None:
        args = tuple(a.to(dtype) if _floating(a) else a for a in args)
        kwargs = {k: (v.to(dtype) if _floating(v) else v) for k, v in kwargs.items()}
    args = tuple(a.clone().requires_grad_(True) if _floating(a) else a for a in args)
    out = layer(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    wrt = [a for a in args if torch.is_tensor(a) and a.requires_grad] + list(layer.parameters())
    grads = torch.autograd.grad(out, wrt, dy, allow_unused=True)
    return out.detach(), grads, {n: b.detach().clone() for n, b in layer.named_buffers()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def _frob(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.double() - truth).norm() / truth.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", MODELS)
@pytest.mark.parametrize("variant", list(zoo.VARIANTS))
def test_converted_model_equals_the_original(key, variant, request):
    c = case(key, request)
    got = zoo.compare(c.built, c.built.model, c.converted[variant])
    assert got["unmatched_names"] == [], got
    assert got["output_rel"] <= 1e-4, got
    assert got["eval_output_rel"] <= 1e-4, got
    assert got["grad_cos"] >= 0.99999, got
    assert got["grad_cos_min"] >= 0.9999, got
    assert got["buffer_err_max"] <= 1e-3, got  # through the depth, rounding grows (per layer: BUF_TOL)
    assert got["integer_buffers_equal"], got


# Known limits of a normkit kernel that a swapped layer here runs into (strict: the mark must go when it is fixed).
KERNEL_LIMITS = {
    "regnetx_002": "the fused BatchNorm + activation kernel applies x·scale + shift in training; where a channel's "
                   "|mean|/σ is large (2 values per channel at the tests' sizes, |mean|/σ ≈ 440 in s4.b5.conv1.bn) "
                   "that is 2.1× torch's fp32 error against float64 (torch subtracts the mean first)",
}


def _fp32_params():
    return [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=KERNEL_LIMITS[k])) if k in KERNEL_LIMITS
            else k for k in MODELS]


@pytest.mark.parametrize("key", _fp32_params())
def test_swapped_layers_equal_the_originals_fp32(key, request):
    c = case(key, request)
    pairs = list(swapped_pairs(c))
    if not pairs:  # only while its recipe is missing: a model off NOT_YET must have its layers swapped
        assert key in NOT_YET, f"convert swaps none of {key}'s norm layers ({sorted(set(c.before.values()))})"
        pytest.skip(f"convert swaps none of {key}'s norm layers yet ({sorted(set(c.before.values()))})")
    for path, orig, new in pairs:
        args, kwargs = c.inputs[path]
        small = tuple(a * 0.01 if _floating(a) else a for a in args)  # variance 1e-4: eps shows
        for mode in ("train", "eval"):
            for inp in (args, small):
                oa, ga, ba = run_layer(copy.deepcopy(orig).train(mode == "train"), inp, kwargs)
                ob, gb, bb = run_layer(copy.deepcopy(new).train(mode == "train"), inp, kwargs)
                where = f"{key} {path} ({zoo.class_name(orig)} -> {zoo.class_name(new)}), {mode}"
                assert ob.dtype == oa.dtype and ob.shape == oa.shape, where
                truth = []  # the original in float64, computed only where the two differ by more than the tolerance

                def as_accurate(x, y, tol, i, truth=truth, layer=orig, inp=inp, train=mode == "train", kw=kwargs):
                    """Equal to ``tol`` — or, on ill-conditioned input (2 values per channel, variance ≪ eps, where
                    two fp32 formulas both land far from the truth), no more than twice the original's own
                    fp32 error against float64 (DESIGN §4)."""
                    if _rel(x, y) <= tol:
                        return True
                    if not truth:
                        out, grads, _ = run_layer(copy.deepcopy(layer).double().train(train), inp, kw, torch.float64)
                        truth.extend([out, *grads])
                    t = truth[i]
                    return _rel(t, y) <= 2 * max(_rel(t, x), tol / 4)

                assert as_accurate(oa, ob, OUT_TOL, 0), (where, _rel(oa, ob))
                assert len(ga) == len(gb), where
                for i, (x, y) in enumerate(zip(ga, gb, strict=True)):
                    assert (x is None) == (y is None), (where, i)
                    if x is not None:
                        assert as_accurate(x, y, GRAD_TOL, i + 1), (where, f"gradient {i}", _rel(x, y))
                assert set(ba) == set(bb), where
                for n in ba:
                    if ba[n].is_floating_point():
                        assert zoo.buffer_error(ba[n], bb[n]) <= BUF_TOL, (where, n)
                    else:
                        assert torch.equal(ba[n], bb[n]), (where, n)


@pytest.mark.parametrize("key", MODELS)
def test_swapped_layers_bf16_error_at_most_the_originals(key, request):
    """bf16 weights and input: each swapped layer's error against the original class computed in
    float64 (relative Frobenius norm, output and every gradient) is at most ``BF16_FACTOR`` × the
    original class's own bf16 error (or ``BF16_FLOOR``, the last bit's rounding)."""
    c = case(key, request)
    pairs = list(swapped_pairs(c))
    if not pairs:  # only while its recipe is missing: a model off NOT_YET must have its layers swapped
        assert key in NOT_YET, f"convert swaps none of {key}'s norm layers ({sorted(set(c.before.values()))})"
        pytest.skip(f"convert swaps none of {key}'s norm layers yet ({sorted(set(c.before.values()))})")
    for path, orig, new in pairs:
        args, kwargs = c.inputs[path]
        args16 = tuple(a.to(torch.bfloat16) if _floating(a) else a for a in args)
        for mode in ("train", "eval"):
            def run(layer, dtype, train=mode == "train", args=args16, kwargs=kwargs):
                return run_layer(copy.deepcopy(layer).train(train).to(dtype), args, kwargs, dtype)

            truth_out, truth_grads, _ = run(orig, torch.float64)
            oa, ga, _ = run(orig, torch.bfloat16)
            ob, gb, _ = run(new, torch.bfloat16)
            where = f"{key} {path} ({zoo.class_name(orig)} -> {zoo.class_name(new)}), {mode}"
            assert ob.dtype == oa.dtype, (where, ob.dtype, oa.dtype)
            pairs_ = [("output", oa, ob, truth_out)]
            pairs_ += [(f"gradient {i}", x, y, t) for i, (x, y, t) in enumerate(zip(ga, gb, truth_grads, strict=True))
                       if t is not None]
            for what, x, y, t in pairs_:
                own, got = _frob(x, t), _frob(y, t)
                assert got <= BF16_FACTOR * max(own, BF16_FLOOR), (where, what, f"normkit {got:.2e}, own {own:.2e}")


def _coverage_params():
    return [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=f"convert does not know {NOT_YET[k]} yet "
                                                                        "(issue 20)"))
            if k in NOT_YET else k for k in MODELS]


@pytest.mark.parametrize("key", _coverage_params())
@pytest.mark.parametrize("variant", list(zoo.VARIANTS))
def test_coverage_at_least_99_percent(key, variant, request):
    c = case(key, request)
    cov = zoo.coverage(c.before, c.converted[variant])
    assert cov["norm_layers"] > 0
    assert cov["swapped_fraction"] >= 0.99, cov["left_by_class"]


def test_coverage_of_the_test_zoo_at_least_99_percent(request):
    n = swapped = 0
    for key in MODELS:
        cov = zoo.coverage(case(key, request).before, case(key, request).converted["normkit"])
        n, swapped = n + cov["norm_layers"], swapped + cov["swapped"]
    assert swapped >= 0.99 * n, f"{swapped}/{n}"


# The census is the yardstick of coverage: it must find exactly the norm layers these models have.
CENSUS = {
    "regnetx_002": {"timm.BatchNormAct2d": 44},
    "convnext_atto": {"timm.LayerNorm2d": 9},
    "tv_resnet18_frozen": {"torchvision.FrozenBatchNorm2d": 20},
    "llama": {"transformers.LlamaRMSNorm": 5},
    "qwen3": {"transformers.Qwen3RMSNorm": 9},  # per-head q/k norms too
    "t5": {"transformers.T5LayerNorm": 12},
    "bert": {"torch.LayerNorm": 5},
    "hf_convnext": {"transformers.ConvNextLayerNorm": 8, "torch.LayerNorm": 1},
}


@pytest.mark.parametrize("key", sorted(CENSUS))
def test_census_counts_every_norm_layer(key, request):
    c = case(key, request)
    counts: dict[str, int] = {}
    for cls in c.before.values():
        counts[cls] = counts.get(cls, 0) + 1
    assert counts == CENSUS[key]


def test_census_skips_containers_and_normalize():
    class ConvNormAct(nn.Module):  # a container: its norm counts, it does not
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    class L2Normalize(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

    class MyRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    model = nn.Sequential(ConvNormAct(), L2Normalize(), MyRMSNorm(), nn.GroupNorm(2, 4, affine=False))
    assert set(zoo.norm_layers(model)) == {"0.bn", "2", "3"}


def test_bench_zoo_suite_writes_its_json(tmp_path, request):
    from normkit import cli

    request.getfixturevalue("transformers")
    out = tmp_path / "zoo.json"
    argv = ["bench", "--suite", "zoo", "--sizes", "tiny", "--models", "hf_resnet", "--rounds", "1",
            "--json", str(out), "--plot", str(tmp_path / "zoo.png")]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["suite"] == "zoo" and doc["skipped"] == []
    assert {"transformers", "torch", "normkit"} <= set(doc["versions"])
    (rec,) = doc["records"]
    assert rec["model"] == "hf_resnet"
    assert set(rec["coverage"]) == set(zoo.VARIANTS) == set(rec["checks"])
    for mode in ("train", "eval"):
        assert set(rec[mode]) == {"torch", *zoo.VARIANTS}
        assert rec[mode]["torch"]["speedup_vs_torch"] == 1.0
        assert all(len(impl["times_ms"]) == 1 for impl in rec[mode].values())
    assert rec["coverage"]["normkit"]["swapped"] == rec["norm_layers"] == 12
    assert rec["coverage"]["normkit"]["became"] == {"torch.BatchNorm2d -> normkit.BatchNorm2d": 12}
    assert rec["checks"]["normkit"]["output_rel"] <= 1e-4
    assert doc["summary"]["normkit"]["swapped"] == 12
    assert (tmp_path / "zoo.png").stat().st_size > 0


def test_bench_zoo_suite_refuses_an_unknown_model(capsys):
    from normkit import cli

    assert cli.main(["bench", "--suite", "zoo", "--models", "resnet18,no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err
