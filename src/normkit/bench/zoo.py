"""``normkit bench --suite zoo``: the timm and transformers models people run, as shipped vs converted.

For every model of the zoo that the installed timm / transformers can build — from a config, no
weights, no network — it measures:

* **coverage**: the norm layers found (:func:`norm_layers`), by class, and which of them
  ``normkit.convert(model)`` and ``normkit.convert(model, fuse=True)`` swapped for a normkit layer,
  fused, or left alone (and how many warnings ``convert`` gave);
* **equality** with the unconverted twin (same weights, same input, fp32, training mode): the
  largest relative output error, the smallest cosine between the two gradients of any parameter
  (and the largest relative gradient error), the largest relative difference of any buffer after
  the step (running statistics), and the eval-mode output after it;
* **speed**: a training step (forward, a mean-square loss, backward, SGD) and an eval forward
  (``torch.no_grad``), torch vs each converted twin in paired, interleaved rounds (:mod:`.timing`);
  ``speedup`` = torch median ÷ normkit median (> 1: normkit faster), and geometric means over the
  zoo. ``--compile`` times ``torch.compile`` of each twin as well.

normkit never imports timm or transformers unless this suite runs. Model builders live here (so an
installed normkit can run the suite) and are shared with the tests (``tests/ecosystem.py``).

Where torchvision's compiled operators do not load beside torch (a CUDA torchvision wheel beside a
CPU torch: ``import torchvision`` — and so ``import timm`` and many transformers models — fails at
``torchvision::nms``), a source checkout's ``tests/ecosystem.py`` defines the two missing operator
schemas before the import; normkit's own package never does.

    normkit bench --suite zoo --json zoo.json --plot zoo.png
    normkit bench --suite zoo --quick                    # five models, batch 4, 3 rounds
    normkit bench --suite zoo --models resnet18 --e2e-batch 32   # --e2e-batch sets the zoo's batch
    normkit bench --suite zoo --models resnet18,llama --rounds 9

On a machine whose cores are shared with other jobs, two intra-op threads contend with them and a
step's time swings 3–10× from round to round; ``--threads 1`` gives stable ratios there (the
baseline in docs/ecosystem.md was measured so).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import normkit
from normkit.tools import recipes
from normkit.tools.convert import fused_activation

from .timing import Clock, paired, summary

# ---------------------------------------------------------------------------------------------
# the zoo


@dataclass(frozen=True)
class ZooSpec:
    """One model of the zoo: how to build it (no weights) and feed it.

    ``library`` is ``"timm"``, ``"transformers"`` or ``"torchvision"``; ``name`` a timm model
    name, a transformers ``model_type`` or a torchvision model builder; ``kwargs`` go to
    ``timm.create_model`` / the config / the builder (a torchvision ``norm_layer`` names a class of
    ``torchvision.ops.misc``); ``tiny`` overrides them for the tests' small sizes; ``inputs`` is
    ``"image"``, ``"tokens"`` or ``"seq2seq"``.
    """

    key: str
    library: str
    name: str
    family: str
    inputs: str = "image"
    kwargs: dict = field(default_factory=dict)
    tiny: dict = field(default_factory=dict)
    quick: bool = False


_IMG = {"img_size": 64}
_LM = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=4, max_position_embeddings=256)
_LM_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
_NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# The 21 timm models of issue 20's measurement (its two unnamed ones: an EvoNorm and a MetaFormer
# model) and transformers' families with their own norm classes, in tiny configurations.
ZOO: list[ZooSpec] = [
    ZooSpec("resnet18", "timm", "resnet18", "ResNet", quick=True),
    ZooSpec("resnet50", "timm", "resnet50", "ResNet"),
    ZooSpec("efficientnet_b0", "timm", "efficientnet_b0", "EfficientNet", quick=True),
    ZooSpec("mobilenetv3", "timm", "mobilenetv3_large_100", "MobileNetV3"),
    ZooSpec("regnetx_002", "timm", "regnetx_002", "RegNet"),
    ZooSpec("densenet121", "timm", "densenet121", "DenseNet"),
    ZooSpec("cspresnet50", "timm", "cspresnet50", "CSPNet"),
    ZooSpec("fastvit_t8", "timm", "fastvit_t8", "FastViT"),
    ZooSpec("coatnet_nano", "timm", "coatnet_nano_rw_224", "CoAtNet/MaxViT", kwargs=_IMG),
    ZooSpec("bit_50x1", "timm", "resnetv2_50x1_bit", "ResNetV2/BiT"),
    ZooSpec("vit_tiny", "timm", "vit_tiny_patch16_224", "ViT", kwargs=_IMG, tiny={"depth": 2}, quick=True),
    ZooSpec("deit_tiny", "timm", "deit_tiny_patch16_224", "DeiT", kwargs=_IMG, tiny={"depth": 2}),
    ZooSpec("poolformer_s12", "timm", "poolformer_s12", "MetaFormer"),
    ZooSpec("mobilevit_xxs", "timm", "mobilevit_xxs", "MobileViT"),
    ZooSpec("convnext_atto", "timm", "convnext_atto", "ConvNeXt", tiny={"depths": (1, 1, 1, 1)}, quick=True),
    ZooSpec("edgenext_xxs", "timm", "edgenext_xx_small", "EdgeNeXt"),
    ZooSpec("swin_tiny", "timm", "swin_tiny_patch4_window7_224", "Swin", kwargs=_IMG),
    ZooSpec("mixer_s16", "timm", "mixer_s16_224", "MLP-Mixer", kwargs=_IMG),
    ZooSpec("levit_128s", "timm", "levit_128s", "LeViT", kwargs=_IMG),
    ZooSpec("regnetz_evos", "timm", "regnetz_b16_evos", "RegNetZ (EvoNorm)"),
    ZooSpec("convformer_s18", "timm", "convformer_s18", "MetaFormer"),
    ZooSpec("tv_resnet18_frozen", "torchvision", "resnet18", "torchvision ResNet, FrozenBatchNorm2d",
            kwargs={"norm_layer": "FrozenBatchNorm2d"}),
    ZooSpec("llama", "transformers", "llama", "Llama", "tokens", _LM, _LM_TINY, quick=True),
    ZooSpec("qwen2", "transformers", "qwen2", "Qwen2", "tokens", _LM, _LM_TINY),
    ZooSpec("qwen3", "transformers", "qwen3", "Qwen3 (q/k norms)", "tokens", {**_LM, "head_dim": 32},
            {**_LM_TINY, "head_dim": 16}),
    ZooSpec("mistral", "transformers", "mistral", "Mistral", "tokens", _LM, _LM_TINY),
    ZooSpec("gemma", "transformers", "gemma", "Gemma", "tokens", {**_LM, "head_dim": 32}, {**_LM_TINY, "head_dim": 16}),
    ZooSpec("gemma2", "transformers", "gemma2", "Gemma2", "tokens", {**_LM, "head_dim": 32},
            {**_LM_TINY, "head_dim": 16}),
    ZooSpec("olmo2", "transformers", "olmo2", "OLMo-2", "tokens", _LM, _LM_TINY),
    ZooSpec("cohere", "transformers", "cohere", "Cohere", "tokens", _LM, _LM_TINY),
    ZooSpec("t5", "transformers", "t5", "T5", "seq2seq",
            dict(vocab_size=512, d_model=256, d_kv=32, d_ff=512, num_layers=4, num_heads=8, dropout_rate=0.0),
            dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)),
    ZooSpec("bert", "transformers", "bert", "BERT", "tokens",
            dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 **_NO_DROP),
            dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    ZooSpec("gpt2", "transformers", "gpt2", "GPT-2", "tokens",
            dict(vocab_size=512, n_embd=256, n_layer=4, n_head=8, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0),
            dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    ZooSpec("hf_vit", "transformers", "vit", "ViT (HF)", "image",
            dict(image_size=64, patch_size=8, hidden_size=192, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, **_NO_DROP),
            dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4)),
    ZooSpec("hf_convnext", "transformers", "convnext", "ConvNeXt (HF)", "image",
            dict(hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 4, 2], image_size=64),
            dict(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], image_size=32)),
    ZooSpec("hf_resnet", "transformers", "resnet", "ResNet (HF)", "image",
            dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], layer_type="basic"),
            dict(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic")),
]


def specs(names: list[str] | None = None, quick: bool = False) -> list[ZooSpec]:
    """The zoo's specs, optionally only ``names`` (keys) or the ``quick`` handful."""
    if names:
        known = {s.key: s for s in ZOO}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"zoo: unknown model key(s) {unknown}; known: {sorted(known)}")
        return [known[n] for n in names]
    return [s for s in ZOO if s.quick] if quick else list(ZOO)


# ---------------------------------------------------------------------------------------------
# importing timm / transformers


def _checkout_helper() -> Path | None:
    """``tests/ecosystem.py`` of the source checkout normkit runs from, if any."""
    path = Path(__file__).resolve().parents[3] / "tests" / "ecosystem.py"
    return path if path.is_file() else None


_LIBS: dict[str, object] = {}


def import_library(library: str):
    """``timm``, ``transformers`` or ``torchvision``, imported on first use; raises ImportError with the reason.

    Before the first import, a source checkout's ``tests/ecosystem.py`` may make torchvision's
    Python part importable (see the module docstring); an installed normkit imports plainly.
    """
    if library in _LIBS:
        return _LIBS[library]
    if "torchvision" not in sys.modules:
        helper = _checkout_helper()
        if helper is not None:
            spec = importlib.util.spec_from_file_location("_normkit_zoo_ecosystem", helper)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mod.prepare_torchvision()
    try:
        lib = importlib.import_module(library)
        if library == "transformers":
            lib.logging.set_verbosity_error()
            lib.AutoConfig.for_model("llama")  # lazy modules: import errors surface here, not mid-run
    except Exception as err:  # noqa: BLE001 — any failure to import means "not installed here"
        raise ImportError(f"{library}: {type(err).__name__}: {err}") from err
    _LIBS[library] = lib
    return lib


def library_versions() -> dict[str, str]:
    """Versions of the libraries this run imported."""
    out = {lib: mod.__version__ for lib, mod in _LIBS.items()}
    if "torchvision" in sys.modules:
        out["torchvision"] = sys.modules["torchvision"].__version__
    return out


# ---------------------------------------------------------------------------------------------
# building a model and its input


@dataclass
class Built:
    spec: ZooSpec
    model: nn.Module
    args: tuple
    kwargs: dict
    seconds: float

    def output(self, model: nn.Module) -> torch.Tensor:
        """The model's main output as one tensor (a transformers model's ``last_hidden_state``)."""
        out = model(*self.args, **self.kwargs)
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        return out[0]


def build(spec: ZooSpec, tiny: bool = False, batch: int | None = None, seed: int = 0) -> Built:
    """``spec``'s model (fp32, training mode, random init from ``seed``) and a matching input."""
    lib = import_library(spec.library)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if spec.library == "timm":
        kwargs = {**spec.kwargs, **spec.tiny} if tiny else dict(spec.kwargs)
        img = 32 if tiny else 64
        if "img_size" in kwargs:
            kwargs["img_size"] = img
        model = lib.create_model(spec.name, pretrained=False, **kwargs)
        x = torch.randn(batch or (2 if tiny else 8), 3, img, img, generator=g)
        args, kw = (x,), {}
    elif spec.library == "torchvision":
        kwargs = {**spec.kwargs, **spec.tiny} if tiny else dict(spec.kwargs)
        if isinstance(kwargs.get("norm_layer"), str):
            kwargs["norm_layer"] = getattr(importlib.import_module("torchvision.ops.misc"), kwargs["norm_layer"])
        model = lib.models.get_model(spec.name, weights=None, **kwargs)
        img = 32 if tiny else 64
        args, kw = (torch.randn(batch or (2 if tiny else 8), 3, img, img, generator=g),), {}
    else:
        cfg_kwargs = {**spec.kwargs, **spec.tiny} if tiny else dict(spec.kwargs)
        config = lib.AutoConfig.for_model(spec.name, **cfg_kwargs)
        model = lib.AutoModel.from_config(config)
        if spec.inputs == "image":
            size = getattr(config, "image_size", 64)
            size = size if isinstance(size, int) else size[0]
            x = torch.randn(batch or (2 if tiny else 8), getattr(config, "num_channels", 3), size, size, generator=g)
            args, kw = (), {"pixel_values": x}
        else:
            n, t = batch or (2 if tiny else 4), 16 if tiny else 128
            ids = torch.randint(0, config.vocab_size, (n, t), generator=g)
            kw = {"input_ids": ids}
            if spec.inputs == "seq2seq":
                kw["decoder_input_ids"] = torch.randint(0, config.vocab_size, (n, t // 2), generator=g)
            args = ()
    model.train()
    return Built(spec, model, args, kw, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# the census of norm layers

# the census rule lives with convert's recipes (one copy: the report counts the same layers)
is_norm_layer = recipes.is_norm_layer
class_name = recipes.class_name


def norm_layers(model: nn.Module) -> dict[str, str]:
    """Path → ``library.ClassName`` of every norm layer in ``model`` (each shared layer once)."""
    return {path: class_name(m) for path, m in model.named_modules() if is_norm_layer(m)}


def is_normkit(name: str) -> bool:
    return name.startswith("normkit.")


def coverage(before: dict[str, str], model: nn.Module) -> dict:
    """What a conversion did to the norm layers ``before`` (path → class) of ``model``."""
    modules = dict(model.named_modules())
    swapped, left, fused, became = Counter(), Counter(), Counter(), Counter()
    for path, cls in before.items():
        now = modules.get(path)
        new = class_name(now) if now is not None else "<removed>"
        if is_normkit(new) and not is_normkit(cls):
            swapped[cls] += 1
            became[f"{cls} -> {new}"] += 1
            if fused_activation(now):  # the activation runs inside the norm's kernel
                fused[cls] += 1
        elif not is_normkit(cls):
            left[cls] += 1
    n = len(before)
    return {"norm_layers": n, "swapped": sum(swapped.values()), "left": sum(left.values()),
            "fused": sum(fused.values()),
            "swapped_fraction": (sum(swapped.values()) / n) if n else None,
            "swapped_by_class": dict(swapped), "left_by_class": dict(left), "fused_by_class": dict(fused),
            "became": dict(became)}


def convert(model: nn.Module, **kwargs) -> tuple[nn.Module, list[str], normkit.tools.ConversionReport]:
    """``normkit.convert(model, report=True, **kwargs)`` (public API): the model, the warnings it gave
    and its report."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, rep = normkit.convert(model, report=True, **kwargs)
    return model, [str(w.message) for w in caught], rep


VARIANTS = {"normkit": {}, "normkit+fuse": {"fuse": True}}


def twins(built: Built) -> dict[str, tuple]:
    """The model as built (``torch``) and a converted deep copy per variant, same weights:
    name -> (model, convert's warnings, convert's report or None)."""
    out = {"torch": (built.model, [], None)}
    for name, kw in VARIANTS.items():
        out[name] = convert(copy.deepcopy(built.model), **kw)
    return out


# ---------------------------------------------------------------------------------------------
# equality with the unconverted twin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = a.abs().max().item()
    return float((a - b).abs().max().item() / scale) if scale > 0 else float((a - b).abs().max().item())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(torch.dot(a, b).item() / (na * nb))


def buffer_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| ÷ max(max |a|, 1): relative for large statistics, absolute for small ones (a running
    mean of zero-mean activations is ~1e-8, where a relative error says nothing)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max().item() / max(a.abs().max().item(), 1.0)) if a.numel() else 0.0


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


def compare(built: Built, base: nn.Module, other: nn.Module) -> dict:
    """One training forward + backward of deep copies of both twins (same seed), then eval.

    Returns the largest relative output error (÷ the largest output magnitude); the cosine of all
    gradients together, the smallest per-parameter cosine (parameters with a non-negligible
    gradient) and the largest gradient error ÷ the largest gradient entry; the largest difference
    of a floating-point buffer after the step (:func:`buffer_error`) and
    whether the integer buffers are equal; the eval-mode output error after the step. Parameters
    and buffers are matched by name.
    """
    a, b = copy.deepcopy(base).train(), copy.deepcopy(other).train()
    outs = []
    for m in (a, b):
        torch.manual_seed(1234)  # dropout / drop-path draw the same numbers
        out = built.output(m)
        loss_of(out).backward()
        outs.append(out.detach())
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    missing = sorted(set(pa) ^ set(pb))
    grads = [(n, p.grad, pb[n].grad) for n, p in pa.items()
             if n in pb and p.grad is not None and pb[n].grad is not None]
    # A gradient that is zero in exact arithmetic (a key bias under softmax) is rounding noise in both
    # twins: its cosine means nothing. Cosines are taken over the parameters whose gradient norm is at
    # least 1e-4 of the largest; errors are relative to the largest gradient entry of the model.
    norms = {n: ga.double().norm().item() for n, ga, _ in grads}
    top_norm = max(norms.values(), default=0.0)
    top_abs = max((ga.abs().max().item() for _, ga, _ in grads), default=0.0) or 1.0
    cos = [(_cos(ga, gb), n) for n, ga, gb in grads if norms[n] >= 1e-4 * top_norm]
    grad_rel = [((ga.double() - gb.double()).abs().max().item() / top_abs, n) for n, ga, gb in grads]
    flat = [torch.cat([g[i].double().flatten() for g in grads]) if grads else torch.zeros(1) for i in (1, 2)]
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    buf = [(buffer_error(t, bb[n]), n) for n, t in ba.items()
           if n in bb and t.shape == bb[n].shape and t.is_floating_point()]
    ints_equal = all(torch.equal(t, bb[n]) for n, t in ba.items() if n in bb and not t.is_floating_point())
    a.eval(), b.eval()
    with torch.no_grad():
        eval_rel = _rel(built.output(a), built.output(b))
    worst_cos = min(cos) if cos else (1.0, None)
    worst_grad = max(grad_rel) if grad_rel else (0.0, None)
    worst_buf = max(buf) if buf else (0.0, None)
    return {"output_rel": _rel(outs[0], outs[1]), "eval_output_rel": eval_rel,
            "grad_cos": _cos(*flat), "grad_cos_min": worst_cos[0], "grad_cos_min_param": worst_cos[1],
            "grad_rel_max": worst_grad[0], "grad_rel_max_param": worst_grad[1],
            "buffer_err_max": worst_buf[0], "buffer_err_max_name": worst_buf[1],
            "integer_buffers_equal": ints_equal, "unmatched_names": missing[:10]}


# ---------------------------------------------------------------------------------------------
# timing


def _steps(built: Built, models: dict[str, nn.Module], clock: Clock, mode: str) -> dict[str, Callable[[], float]]:
    steps = {}
    for name, model in models.items():
        if mode == "train":
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

            def body(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss_of(built.output(model)).backward()
                opt.step()
        else:
            model.eval()

            def body(model=model):
                with torch.no_grad():
                    built.output(model)
        steps[name] = (lambda body=body: clock.time(body))
    return steps


def _timed(built: Built, models: dict[str, nn.Module], clock: Clock, mode: str, rounds: int) -> dict:
    times = paired(_steps(built, models, clock, mode), rounds=rounds, warmup=2)
    base = summary(times["torch"])["median_ms"]
    impls = {}
    for name, ts in times.items():
        s = summary(ts)
        impls[name] = {**s, "times_ms": [t * 1e3 for t in ts], "speedup_vs_torch": base / s["median_ms"]}
    return impls


def run_model(spec: ZooSpec, clock: Clock, rounds: int, tiny: bool = False, compile_: bool = False,
              time_it: bool = True, batch: int | None = None) -> dict:
    """The zoo record of one model (see the module docstring)."""
    built = build(spec, tiny=tiny, batch=batch)
    before = norm_layers(built.model)
    pairs = twins(built)
    rec = {"model": spec.key, "library": spec.library, "name": spec.name, "family": spec.family,
           "input": {k: list(v.shape) for k, v in {**dict(enumerate(built.args)), **built.kwargs}.items()},
           "params": sum(p.numel() for p in built.model.parameters()), "build_s": built.seconds,
           "norm_layers": len(before), "norm_classes": dict(Counter(before.values())),
           "coverage": {}, "checks": {}, "convert_warnings": {}}
    for name in VARIANTS:
        model, warns, rep = pairs[name]
        rec.setdefault("report", {})[name] = rep.as_dict()
        rec["coverage"][name] = coverage(before, model)
        rec["convert_warnings"][name] = len(warns)
        rec["checks"][name] = compare(built, built.model, model)
    if time_it:
        models = {k: m for k, (m, _, _) in pairs.items()}
        for mode in ("train", "eval"):
            rec[mode] = _timed(built, {k: copy.deepcopy(m) for k, m in models.items()}, clock, mode, rounds)
        if compile_:
            compiled = {k: torch.compile(copy.deepcopy(m)) for k, m in models.items()}
            for mode in ("train", "eval"):
                rec[f"{mode}_compile"] = _timed(built, compiled, clock, mode, rounds)
    return rec


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(records: list[dict]) -> dict:
    """Totals of coverage and geometric means of the speed-ups, per variant and mode."""
    out: dict = {"models": len(records)}
    for name in VARIANTS:
        n = sum(r["coverage"][name]["norm_layers"] for r in records)
        s = sum(r["coverage"][name]["swapped"] for r in records)
        full = sum(1 for r in records if r["coverage"][name]["left"] == 0)
        left, reasons = Counter(), {}
        for r in records:
            left.update(r["coverage"][name]["left_by_class"])
            for cls, why in r.get("report", {}).get(name, {}).get("classes", {}).items():
                for reason, k in why["left"].items():
                    reasons.setdefault(cls, Counter())[reason] += k
        out[name] = {"norm_layers": n, "swapped": s, "swapped_fraction": s / n if n else None,
                     "models_fully_converted": full, "left_by_class": dict(left.most_common()),
                     "left_reasons": {c: dict(v) for c, v in reasons.items()},
                     "verify_ms": 1e3 * sum(r.get("report", {}).get(name, {}).get("verify_seconds", 0.0)
                                            for r in records)}
        for mode in ("train", "eval", "train_compile", "eval_compile"):
            vals = [r[mode][name]["speedup_vs_torch"] for r in records if mode in r]
            if vals:
                out[name][f"geomean_{mode}"] = geomean(vals)
                out[name][f"min_{mode}"] = min(vals)
    return out


# ---------------------------------------------------------------------------------------------
# output


def table(records: list[dict], summary_: dict) -> str:
    head = (f"{'model':<16}{'lib':<6}{'norms':>6}{'conv%':>7}{'fuse%':>7}{'out rel':>9}{'grad cos':>10}"
            f"{'buf err':>9}{'train x':>9}{'+fuse':>7}{'eval x':>8}{'+fuse':>7}  left (convert)")
    lines = [head, "-" * (len(head) + 12)]

    def pct(c):
        return "-" if c["swapped_fraction"] is None else f"{100 * c['swapped_fraction']:.0f}"

    def sp(r, mode, name):
        return f"{r[mode][name]['speedup_vs_torch']:.2f}" if mode in r else "-"

    for r in records:
        c, cf, ch = r["coverage"]["normkit"], r["coverage"]["normkit+fuse"], r["checks"]["normkit"]
        left = ", ".join(f"{k.split('.')[-1]}×{v}" for k, v in c["left_by_class"].items())
        lines.append(f"{r['model'][:15]:<16}{r['library'][:5]:<6}{r['norm_layers']:>6}{pct(c):>7}{pct(cf):>7}"
                     f"{ch['output_rel']:>9.1e}{ch['grad_cos_min']:>10.6f}{ch['buffer_err_max']:>9.1e}"
                     f"{sp(r, 'train', 'normkit'):>9}{sp(r, 'train', 'normkit+fuse'):>7}"
                     f"{sp(r, 'eval', 'normkit'):>8}{sp(r, 'eval', 'normkit+fuse'):>7}  {left}")
    for name in VARIANTS:
        s = summary_.get(name, {})
        if not s:
            continue
        frac = s["swapped_fraction"]
        lines.append(f"{name}: swapped {s['swapped']}/{s['norm_layers']} norm layers "
                     f"({'-' if frac is None else f'{100 * frac:.0f}%'}), {s['models_fully_converted']}/"
                     f"{summary_['models']} models fully converted; geomean x torch: train "
                     f"{_f(s.get('geomean_train'))}, eval {_f(s.get('geomean_eval'))}"
                     + (f", compiled train {_f(s.get('geomean_train_compile'))}, "
                        f"eval {_f(s.get('geomean_eval_compile'))}" if "geomean_train_compile" in s else ""))
    s = summary_.get("normkit", {})
    if s.get("left_reasons"):
        lines.append("left by convert, and why:")
        for cls, reasons in s["left_reasons"].items():
            for reason, n in reasons.items():
                lines.append(f"  {cls} ×{n}: {reason}")
    if s.get("verify_ms") is not None:
        lines.append(f"convert's verify: {s['verify_ms']:.0f} ms over the zoo")
    return "\n".join(lines)


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def plot(path: str, records: list[dict], summary_: dict, title: str) -> None:
    """Coverage (share of norm layers swapped) and torch ÷ normkit per model, train and eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    xs = np.arange(len(records))
    labels = [r["model"] for r in records]
    fig, axes = plt.subplots(2, 1, figsize=(max(9, 0.45 * len(records) + 3), 9), sharex=True)
    for i, name in enumerate(VARIANTS):
        cov = [100 * (r["coverage"][name]["swapped_fraction"] or 0) for r in records]
        axes[0].bar(xs + (i - 0.5) * 0.4, cov, 0.4, label=f"convert{' (fuse=True)' if 'fuse' in name else ''}")
    axes[0].axhline(99, color="red", lw=0.8, ls="--", label="goal 99%")
    axes[0].set_ylabel("% of norm layers swapped")
    axes[0].set_ylim(0, 105)
    axes[0].legend(fontsize=8)
    axes[0].set_title(title, fontsize=9)
    bars = [(n, m) for m in ("train", "eval") for n in VARIANTS if any(m in r for r in records)]
    width = 0.8 / max(len(bars), 1)
    for i, (name, mode) in enumerate(bars):
        ys = [r[mode][name]["speedup_vs_torch"] if mode in r else np.nan for r in records]
        axes[1].bar(xs + (i - (len(bars) - 1) / 2) * width, ys, width, label=f"{mode} {name}")
    axes[1].axhline(1.0, color="black", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("torch time / normkit time (median)")
    axes[1].set_xticks(xs, labels, rotation=60, ha="right", fontsize=8)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    """``normkit bench --suite zoo``."""
    import datetime

    from tqdm import tqdm

    from . import report

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        print("normkit bench --suite zoo: runs on the CPU only (--device cpu)", file=sys.stderr)
        return 2
    names = [n for n in (getattr(args, "models", None) or "").split(",") if n]
    try:
        todo = specs(names or None, quick=args.quick)
    except ValueError as err:
        print(f"normkit bench: --models: {err}", file=sys.stderr)
        return 2
    problems, libs = [], {}
    for lib in sorted({s.library for s in todo}):
        try:
            import_library(lib)
            libs[lib] = True
        except ImportError as err:
            libs[lib] = False
            problems.append(f"{lib} not importable, its models skipped: {err}")
    todo = [s for s in todo if libs.get(s.library)]
    if not todo:
        for p in problems:
            print(f"normkit bench --suite zoo: {p}", file=sys.stderr)
        print("normkit bench --suite zoo: no model to run (pip install 'normkit[test]' brings timm and "
              "transformers)", file=sys.stderr)
        return 2
    tiny = args.sizes == "tiny"
    rounds = args.rounds or (3 if args.quick else 7)
    batch = args.e2e_batch or (4 if args.quick and not tiny else None)  # default: 8 images / 4 sequences
    clock = Clock("cpu")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records = []
    for spec in tqdm(todo, desc="normkit bench zoo", unit="model", file=sys.stderr):
        try:
            records.append(run_model(spec, clock, rounds, tiny=tiny, compile_=getattr(args, "compile", False),
                                     batch=batch))
        except Exception as err:  # one model that fails to build or run must not sink the run
            problems.append(f"{spec.key}: {type(err).__name__}: {str(err)[:300]}")
    summary_ = summarize(records)
    print(f"{torch.get_num_threads()} threads, {rounds} paired rounds, batch/sizes "
          f"{'tiny (not a benchmark)' if tiny else 'full'}; x = torch median / normkit median (>1: normkit faster)")
    print(table(records, summary_))
    for p in problems:
        print(f"skipped: {p}", file=sys.stderr)
    doc = {"schema": report.SCHEMA, "suite": "zoo", "command": "normkit " + " ".join(sys.argv[1:]) if sys.argv else "",
           "started_utc": started, "machine": report.machine("cpu"),
           "versions": {**report.versions(), **library_versions()},
           "settings": {"rounds": rounds, "quick": args.quick, "sizes": args.sizes, "batch": batch,
                        "compile": bool(getattr(args, "compile", False)), "variants": VARIANTS},
           "summary": summary_, "records": records, "skipped": problems}
    if args.json:
        report.write_json(args.json, doc)
    if args.plot and records:
        plot(args.plot, records, summary_, f"normkit bench --suite zoo — {doc['machine']['processor']}, "
                                           f"{torch.get_num_threads()} threads")
    return 0
