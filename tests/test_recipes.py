"""convert's recipes: recognising the ecosystem's norm classes, building their normkit layers, verify, report.

Three parts:

* the forward fingerprint (pure Python): what it ignores (names, comments, annotations) and what it
  does not (any change of the computation);
* the machinery on classes written here — a copy of a transformers forward is recognised wherever it
  lives; a forward changed by one token, replaced on the class (as ``kernels``' hub does) or on the
  instance is not; a class that claims timm's module and name but computes something else is caught
  by verify, which puts the original back with a warning; verify changes no buffer and no random
  generator; the swapped layer keeps tensors, hooks, flags and state_dict keys;
* every recipe on the real class of timm / torchvision / transformers (pinned in the test extra): the
  recipe it takes, and the swapped layer against the original in fp32 (train and eval, outputs and
  gradients, a non-zero-mean and a tiny-scale input) and with bf16 input, beside bf16 and fp32 weights
  (same output dtype, error against the float64 original at most the original's own).
"""

from __future__ import annotations

import copy
import importlib
import re
import warnings

import pytest
import torch
from torch import nn

import normkit
from normkit.tools import recipes

# --------------------------------------------------------------------------------------------------
# fingerprints


def test_fingerprint_ignores_names_comments_annotations_and_docstrings():
    a = '''
def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Docstring."""
    input_dtype = hidden_states.dtype  # a comment
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
'''
    b = '''
def other_name(self, x):
    dt = x.dtype
    x = x.to(torch.float32)
    var: torch.Tensor = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + self.variance_epsilon)
    return self.weight * x.to(dt)
'''
    assert recipes.normalise_source(a) == recipes.normalise_source(b)
    decorated = "@torch.no_grad()\n" + b.strip()  # a wrapper can change what it computes
    assert recipes.normalise_source(decorated) != recipes.normalise_source(b)


def test_fingerprint_reads_torchs_modules_by_what_they_are_and_folds_a_returned_local():
    a = '''
def forward(self, x):
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    x = x.permute(0, 3, 1, 2)
    return x
'''
    b = '''
def forward(self, x):
    x = x.permute(0, 2, 3, 1)
    x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    return x.permute(0, 3, 1, 2)
'''
    assert recipes.normalise_source(a) == recipes.normalise_source(b)
    # another module under the same name is another function
    assert recipes.normalise_source(a, {"F": torch.special}) != recipes.normalise_source(b)


@pytest.mark.parametrize("change", [
    ("mean(-1", "mean(1"), ("rsqrt(v", "sqrt(v"), ("self.weight *", "self.bias *"), ("torch.float32", "torch.float16"),
    ("x.to(dt)", "x"), ("variance_epsilon", "eps"),
])
def test_fingerprint_sees_any_change_of_the_computation(change):
    src = '''
def forward(self, x):
    dt = x.dtype
    x = x.to(torch.float32)
    var = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + self.variance_epsilon)
    return self.weight * x.to(dt)
'''
    assert change[0] in src
    assert recipes.normalise_source(src) != recipes.normalise_source(src.replace(*change))


# --------------------------------------------------------------------------------------------------
# the machinery, on classes written here


class Olmo2LikeRMSNorm(nn.Module):
    """transformers' Olmo2RMSNorm, copied (another module, another name, comments): the same family."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hs: torch.Tensor) -> torch.Tensor:
        input_dtype = hs.dtype  # kept for the cast back
        hs = hs.to(torch.float32)
        variance = hs.pow(2).mean(-1, keepdim=True)
        hs = hs * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hs).to(input_dtype)


class Olmo2LikeRMSNormTwiceEps(Olmo2LikeRMSNorm):
    def forward(self, hs):
        input_dtype = hs.dtype
        hs = hs.to(torch.float32)
        variance = hs.pow(2).mean(-1, keepdim=True)
        hs = hs * torch.rsqrt(variance + 2 * self.variance_epsilon)
        return (self.weight * hs).to(input_dtype)


def _model(layer):
    return nn.Sequential(nn.Linear(8, 8), layer)


def _olmo2(d=8, eps=1e-5):
    torch.manual_seed(0)
    m = Olmo2LikeRMSNorm(d, eps)
    with torch.no_grad():
        m.weight.copy_(1 + 0.5 * torch.randn(d))
    return m


def test_a_copy_of_a_family_forward_is_recognised_anywhere():
    layer = _olmo2()
    x = 3 + torch.randn(4, 5, 8)
    expected = layer(x)
    model, rep = normkit.convert(_model(layer), report=True)
    new = model[1]
    assert type(new) is normkit.RMSNorm
    assert new.weight is layer.weight and new.eps == 1e-5 and new.normalized_shape == (8,)
    torch.testing.assert_close(new(x), expected, rtol=2e-6, atol=2e-6)
    assert rep.swapped == 1 and rep.verified == 1 and rep.left == 0
    assert rep.classes[recipes.class_name(layer)].recipes == {"Olmo2-style RMSNorm": 1}


def test_a_forward_changed_by_one_token_is_not_recognised():
    layer = Olmo2LikeRMSNormTwiceEps(8)
    with pytest.warns(UserWarning, match="Olmo2LikeRMSNormTwiceEps.*no recipe"):
        model, rep = normkit.convert(_model(layer), report=True)
    assert model[1] is layer
    assert rep.left == 1 and rep.coverage == 0.0


def test_a_forward_replaced_on_the_class_or_the_instance_is_not_recognised():
    class HubbedRMSNorm(Olmo2LikeRMSNorm):  # what kernels' use_kernel_forward_from_hub + kernelize do to the class
        pass

    assert type(normkit.convert(_model(HubbedRMSNorm(8)))[1]) is normkit.RMSNorm  # before: Olmo2's forward
    original = HubbedRMSNorm.forward

    def forward(self, hs):  # a hub kernel's wrapper, put on the class after that first conversion
        return original(self, hs)

    HubbedRMSNorm.forward = forward
    with pytest.warns(UserWarning, match="HubbedRMSNorm"):
        model = normkit.convert(_model(HubbedRMSNorm(8)))
    assert type(model[1]) is HubbedRMSNorm

    layer = _olmo2()
    layer.forward = lambda hs: hs  # noqa: ARG005 — replaced on the instance
    with pytest.warns(UserWarning, match="replaced on the instance"):
        model = normkit.convert(_model(layer))
    assert model[1] is layer


def test_the_swap_keeps_tensors_hooks_flags_and_state_dict_keys():
    layer = _olmo2()
    layer.eval()
    calls = []
    layer.register_forward_hook(lambda m, a, y: calls.append(type(m).__name__))
    model = _model(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keys = list(model.state_dict())
    saved = copy.deepcopy(model.state_dict())
    normkit.convert(model)
    new = model[1]
    assert type(new) is normkit.RMSNorm and new.training is False
    assert list(model.state_dict()) == keys
    model.load_state_dict(saved)  # a checkpoint of the original loads ...
    fresh = _model(Olmo2LikeRMSNorm(8, 1e-5))
    fresh.load_state_dict(model.state_dict())  # ... and the converted one loads into the original
    x = torch.randn(2, 8)
    model(x).pow(2).sum().backward()
    assert calls == ["RMSNorm"]
    before = new.weight.detach().clone()
    opt.step()  # the optimizer built before the conversion updates the swapped layer's weight
    assert not torch.equal(new.weight, before) and new.weight is layer.weight
    assert new.variance_epsilon == 1e-5  # the original's own attributes stay readable


class PlainBatchNorm(nn.BatchNorm2d):
    """A subclass that overrides nothing: the torch recipe (a retype), verified."""


def _pretend(cls, module: str, qualname: str):
    cls.__module__, cls.__qualname__ = module, qualname
    cls.forward.__module__, cls.forward.__qualname__ = module, f"{qualname}.forward"
    recipes._find_class.cache_clear()
    return cls


def test_verify_changes_no_buffer_and_no_random_generator():
    torch.manual_seed(0)
    layer = PlainBatchNorm(4).train()
    layer.running_mean.uniform_()
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    model = _model(layer)
    state = torch.get_rng_state()
    model, rep = normkit.convert(model, report=True)
    assert rep.verified == 1 and type(model[1]) is normkit.BatchNorm2d
    assert torch.equal(torch.get_rng_state(), state)
    for k, v in model[1].named_buffers():
        assert torch.equal(v, buffers[k]), k


def _timm_like_layer_norm(forward):
    cls = type("LayerNorm", (nn.LayerNorm,), {"forward": forward})
    return _pretend(cls, "timm.layers.norm", "LayerNorm")


def _layer_norm_eps_1e3(self, x):  # computes with another eps than the one it holds
    return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, 1e-3)


def _layer_norm_times_1_001(self, x):
    return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps) * 1.001


@pytest.mark.parametrize("forward", [_layer_norm_eps_1e3, _layer_norm_times_1_001])
def test_verify_puts_the_original_back_when_a_known_class_changed(forward):
    """A later timm whose LayerNorm computes something else is recognised by name; verify catches it."""
    cls = _timm_like_layer_norm(forward)
    try:
        layer = cls(8, eps=1e-6)
        model = _model(layer)
        with pytest.warns(UserWarning, match=r"kept 1 × LayerNorm \(timm\): verify: timm LayerNorm"):
            model, rep = normkit.convert(model, report=True)
        assert model[1] is layer
        assert rep.verify_failed == 1 and rep.swapped == 0
        (reason,) = rep.classes["timm.LayerNorm"].left
        assert "relative error" in reason and "probe" in reason
        unverified = normkit.convert(_model(cls(8, eps=1e-6)), verify=False)  # the guard is what kept it
        assert type(unverified[1]) is normkit.LayerNorm
    finally:
        recipes._find_class.cache_clear()


def test_a_class_claiming_a_known_name_with_another_forward_is_refused():
    class LayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x)

    # timm's module and qualified name, but the forward is this file's
    LayerNorm.__module__, LayerNorm.__qualname__ = "timm.layers.norm", "LayerNorm"
    recipes._find_class.cache_clear()
    try:
        with pytest.warns(UserWarning, match="not timm.layers.norm.LayerNorm.forward"):
            model = normkit.convert(_model(LayerNorm(8)))
        assert type(model[1]) is LayerNorm
    finally:
        recipes._find_class.cache_clear()


def _layer_norm_fp32_out(self, x):  # right in fp32, but returns fp32 for bf16 input
    return nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                                    self.eps)


def test_verify_probes_a_half_precision_layer_in_its_dtype_too():
    layer = _olmo2().to(torch.bfloat16)
    model, rep = normkit.convert(_model(layer), report=True)
    assert type(model[1]) is normkit.RMSNorm and rep.verified == 1
    cls = _timm_like_layer_norm(_layer_norm_fp32_out)
    try:
        layer = cls(8, eps=1e-6).to(torch.bfloat16)
        with pytest.warns(UserWarning, match="output dtype torch.bfloat16, the original's torch.float32 on the "
                                             "non-zero-mean bfloat16 probe"):
            model = normkit.convert(_model(layer))
        assert model[1] is layer
        assert type(normkit.convert(_model(cls(8, eps=1e-6)))[1]) is normkit.LayerNorm  # fp32: the same function
    finally:
        recipes._find_class.cache_clear()


def test_meta_device_layers_are_swapped_without_a_probe():
    with torch.device("meta"):
        layer = Olmo2LikeRMSNorm(8)
    model, rep = normkit.convert(_model(layer), report=True)
    assert type(model[1]) is normkit.RMSNorm and model[1].weight is layer.weight
    assert rep.swapped == 1 and rep.verified == 0


def test_to_torch_leaves_a_layer_whose_option_torch_lacks():
    gemma_like = normkit.RMSNorm(8, eps=1e-6, offset=1.0)
    plain = normkit.RMSNorm(8, eps=1e-6)
    model = nn.Sequential(gemma_like, plain)
    with pytest.warns(UserWarning, match="offset=1.0: torch.nn.RMSNorm has no such option"):
        model, rep = normkit.convert(model, to="torch", report=True)
    assert model[0] is gemma_like and type(model[1]) is nn.RMSNorm
    assert rep.swapped == 1 and rep.left == 1


def test_report_counts_and_prints_every_class():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.GroupNorm(2, 4),
                          Olmo2LikeRMSNormTwiceEps(4), normkit.BatchRenorm2d(4))
    with pytest.warns(UserWarning, match="Olmo2LikeRMSNormTwiceEps"):
        model, rep = normkit.convert(model, fuse=True, report=True)
    assert (rep.norm_layers, rep.swapped, rep.fused, rep.left, rep.already) == (3, 2, 1, 1, 1)
    assert rep.coverage == pytest.approx(2 / 3)
    assert rep.classes["torch.BatchNorm2d"].became == {"normkit.BatchNormAct2d": 1}
    assert rep.classes["torch.BatchNorm2d"].fused == {"relu": 1}
    text = str(rep)
    assert "swapped 2 of 3 norm layers (67%), fused 1, left 1" in text
    for needle in ("torch.BatchNorm2d", "→ normkit.BatchNormAct2d ×1 (fused relu ×1)", "torch.GroupNorm",
                   "Olmo2LikeRMSNormTwiceEps", "left ×1: no recipe knows this class", "normkit's already ×1"):
        assert needle in text, needle
    assert rep.as_dict()["classes"]["torch.GroupNorm"]["became"] == {"normkit.GroupNorm": 1}
    plain = normkit.convert(nn.Sequential(nn.LayerNorm(4)))
    assert isinstance(plain, nn.Sequential)  # report=False: the model, as before


# --------------------------------------------------------------------------------------------------
# every recipe on the real classes

C, D = 8, 16


def _timm(lib, name, *args, **kwargs):
    mod, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(f"timm.{mod}" if mod else "timm.layers"), cls)(*args, **kwargs)


def _hf(lib, path, *args, **kwargs):
    mod, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(f"transformers.models.{mod}"), cls)(*args, **kwargs)


def _tv(lib, path, *args, **kwargs):
    mod, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(f"torchvision.{mod}"), cls)(*args, **kwargs)


def _hf_config(lib, name, **kw):
    return getattr(lib, name)(**kw)


IMG, SEQ = (2, C, 5, 5), (2, 5, D)

# (id, library, factory(lib) -> layer, input shape, expected recipe, or "left: <regex of the reason>")
CASES = [
    ("timm.BatchNormAct2d-silu", "timm", lambda L: _timm(L, "BatchNormAct2d", C, act_layer=nn.SiLU), IMG,
     "timm BatchNormAct2d"),
    ("timm.BatchNormAct2d-hardswish", "timm", lambda L: _timm(L, "BatchNormAct2d", C, act_layer=nn.Hardswish), IMG,
     "timm BatchNormAct2d"),
    ("timm.BatchNormAct2d-noact", "timm", lambda L: _timm(L, "BatchNormAct2d", C, apply_act=False), IMG,
     "timm BatchNormAct2d"),
    ("timm.BatchNormAct2d-leaky-dropblock", "timm",
     lambda L: _timm(L, "BatchNormAct2d", C, act_layer=nn.LeakyReLU,
                     drop_layer=lambda: _timm(L, "DropBlock2d", 0.3, 3)), IMG, "timm BatchNormAct2d"),
    ("timm.SyncBatchNormAct", "timm",
     lambda L: L.layers.convert_sync_batchnorm(_timm(L, "BatchNormAct2d", C, act_layer=nn.SiLU)), IMG,
     "timm SyncBatchNormAct"),
    ("timm.FrozenBatchNormAct2d", "timm", lambda L: _timm(L, "FrozenBatchNormAct2d", C, act_layer=nn.SiLU), IMG,
     "timm FrozenBatchNormAct2d"),
    ("timm.GroupNormAct", "timm", lambda L: _timm(L, "GroupNormAct", C, num_groups=4, act_layer=nn.SiLU), IMG,
     "timm GroupNormAct"),
    ("timm.GroupNorm1Act", "timm", lambda L: _timm(L, "GroupNorm1Act", C, act_layer=nn.GELU), IMG,
     "timm GroupNorm1Act"),
    ("timm.GroupNorm", "timm", lambda L: _timm(L, "GroupNorm", C, num_groups=4), IMG, "timm GroupNorm"),
    ("timm.GroupNorm1", "timm", lambda L: _timm(L, "GroupNorm1", C), IMG, "timm GroupNorm1"),
    ("timm.LayerNorm", "timm", lambda L: _timm(L, "LayerNorm", D), SEQ, "timm LayerNorm"),
    ("timm.LayerNormFp32", "timm", lambda L: _timm(L, "LayerNormFp32", D), SEQ, "timm LayerNormFp32"),
    ("timm.LayerNorm2d", "timm", lambda L: _timm(L, "LayerNorm2d", C), IMG, "timm LayerNorm2d"),
    ("timm.LayerNorm2dFp32", "timm", lambda L: _timm(L, "LayerNorm2dFp32", C), IMG, "timm LayerNorm2dFp32"),
    ("timm.LayerNormNoBias", "timm", lambda L: _timm(L, "models.metaformer.LayerNormNoBias", D), SEQ,
     "timm LayerNormNoBias"),
    ("timm.LayerNorm2dNoBias", "timm", lambda L: _timm(L, "models.metaformer.LayerNorm2dNoBias", C), IMG,
     "timm LayerNorm2dNoBias"),
    ("timm.LayerNormAct", "timm", lambda L: _timm(L, "LayerNormAct", D, act_layer=nn.GELU), SEQ, "timm LayerNormAct"),
    ("timm.LayerNormActFp32", "timm", lambda L: _timm(L, "LayerNormActFp32", D, act_layer=nn.SiLU), SEQ,
     "timm LayerNormActFp32"),
    ("timm.LayerNormAct2d", "timm", lambda L: _timm(L, "LayerNormAct2d", C, act_layer=nn.ReLU), IMG,
     "timm LayerNormAct2d"),
    ("timm.LayerNormAct2dFp32", "timm", lambda L: _timm(L, "LayerNormAct2dFp32", C), IMG, "timm LayerNormAct2dFp32"),
    ("timm.RmsNorm", "timm", lambda L: _timm(L, "RmsNorm", D), SEQ, "timm RmsNorm"),
    ("timm.RmsNormFp32", "timm", lambda L: _timm(L, "RmsNormFp32", D), SEQ, "timm RmsNormFp32"),
    ("timm.RmsNorm2dFp32", "timm", lambda L: _timm(L, "RmsNorm2dFp32", C), IMG, "timm RmsNorm2dFp32"),
    ("timm.RmsNormAct", "timm", lambda L: _timm(L, "RmsNormAct", D, act_layer=nn.SiLU), SEQ, "timm RmsNormAct"),
    ("timm.RmsNormAct2dFp32", "timm", lambda L: _timm(L, "RmsNormAct2dFp32", C), IMG, "timm RmsNormAct2dFp32"),
    ("timm.RmsNorm2d", "timm", lambda L: _timm(L, "RmsNorm2d", C), IMG, "left: in the input's dtype"),
    ("timm.EvoNorm2dS0a", "timm", lambda L: _timm(L, "EvoNorm2dS0a", C, group_size=4), IMG, "left: EvoNorm"),
    ("torchvision.FrozenBatchNorm2d", "torchvision", lambda L: _tv(L, "ops.misc.FrozenBatchNorm2d", C), IMG,
     "torchvision FrozenBatchNorm2d"),
    ("torchvision.LayerNorm2d", "torchvision", lambda L: _tv(L, "models.convnext.LayerNorm2d", C), IMG,
     "torchvision LayerNorm2d"),
    ("hf.LlamaRMSNorm", "transformers", lambda L: _hf(L, "llama.modeling_llama.LlamaRMSNorm", D), SEQ,
     "Llama-style RMSNorm"),
    ("hf.Qwen3RMSNorm", "transformers", lambda L: _hf(L, "qwen3.modeling_qwen3.Qwen3RMSNorm", D), (2, 5, 4, D),
     "Llama-style RMSNorm"),
    ("hf.Llama4TextRMSNorm", "transformers", lambda L: _hf(L, "llama4.modeling_llama4.Llama4TextRMSNorm", D), SEQ,
     "Llama-style RMSNorm (Llama4)"),
    ("hf.CpmAntLayerNorm", "transformers",
     lambda L: _hf(L, "cpmant.modeling_cpmant.CpmAntLayerNorm", _hf_config(L, "CpmAntConfig", hidden_size=D)), SEQ,
     "Llama-style RMSNorm (CpmAnt)"),
    ("hf.GemmaRMSNorm", "transformers", lambda L: _hf(L, "gemma.modeling_gemma.GemmaRMSNorm", D), SEQ,
     "Gemma-style RMSNorm"),
    ("hf.Qwen3NextRMSNorm", "transformers", lambda L: _hf(L, "qwen3_next.modeling_qwen3_next.Qwen3NextRMSNorm", D),
     SEQ, "Gemma-style RMSNorm"),
    ("hf.T5LayerNorm", "transformers", lambda L: _hf(L, "t5.modeling_t5.T5LayerNorm", D), SEQ, "T5-style RMSNorm"),
    ("hf.Olmo2RMSNorm", "transformers", lambda L: _hf(L, "olmo2.modeling_olmo2.Olmo2RMSNorm", D), SEQ,
     "Olmo2-style RMSNorm"),
    ("hf.HeliumRMSNorm", "transformers", lambda L: _hf(L, "helium.modeling_helium.HeliumRMSNorm", D), SEQ,
     "Helium-style RMSNorm"),
    ("hf.MoshiRMSNorm", "transformers", lambda L: _hf(L, "moshi.modeling_moshi.MoshiRMSNorm", D), SEQ,
     "Moshi-style RMSNorm"),
    ("hf.Gemma3nRMSNorm", "transformers", lambda L: _hf(L, "gemma3n.modeling_gemma3n.Gemma3nRMSNorm", D), SEQ,
     "Gemma3n-style RMSNorm"),
    ("hf.Gemma3nRMSNorm-noscale", "transformers",
     lambda L: _hf(L, "gemma3n.modeling_gemma3n.Gemma3nRMSNorm", D, with_scale=False), SEQ, "left: with_scale=False"),
    ("hf.NanoChatRMSNorm", "transformers", lambda L: _hf(L, "nanochat.modeling_nanochat.NanoChatRMSNorm"), SEQ,
     "left: no weight"),
    ("hf.ConvNextLayerNorm-first", "transformers",
     lambda L: _hf(L, "convnext.modeling_convnext.ConvNextLayerNorm", C, data_format="channels_first"), IMG,
     "ConvNeXt LayerNorm (channels_first)"),
    ("hf.ConvNextLayerNorm-last", "transformers",
     lambda L: _hf(L, "convnext.modeling_convnext.ConvNextLayerNorm", D), SEQ, "ConvNeXt LayerNorm (channels_last)"),
    ("hf.EomtLayerNorm2d", "transformers", lambda L: _hf(L, "eomt.modeling_eomt.EomtLayerNorm2d", C), IMG,
     "permute LayerNorm2d (channels-first)"),
    ("hf.CohereLayerNorm", "transformers", lambda L: _hf(L, "cohere.modeling_cohere.CohereLayerNorm", D), SEQ,
     "Cohere-style LayerNorm"),
    ("hf.CohereLayerNorm-qk", "transformers", lambda L: _hf(L, "cohere.modeling_cohere.CohereLayerNorm", (4, D)),
     (2, 5, 4, D), "left: per-head"),
    ("hf.DebertaLayerNorm", "transformers", lambda L: _hf(L, "deberta.modeling_deberta.DebertaLayerNorm", D), SEQ,
     "DeBERTa-style LayerNorm"),
    ("hf.VideoPrismLayerNorm", "transformers",
     lambda L: _hf(L, "videoprism.modeling_videoprism.VideoPrismLayerNorm", D), SEQ,
     "LayerNorm with (1 + w) (VideoPrism)"),
    ("hf.OlmoLayerNorm", "transformers", lambda L: _hf(L, "olmo.modeling_olmo.OlmoLayerNorm", D), SEQ,
     "OLMo LayerNorm (no affine)"),
    ("hf.EsmFold2LayerNorm", "transformers", lambda L: _hf(L, "esmfold2.modeling_esmfold2.EsmFold2LayerNorm", D), SEQ,
     "LayerNorm in fp32 (EsmFold2)"),
    ("hf.DetrFrozenBatchNorm2d", "transformers", lambda L: _hf(L, "detr.modeling_detr.DetrFrozenBatchNorm2d", C), IMG,
     "DETR-style FrozenBatchNorm2d"),
    ("hf.BitGroupNormActivation", "transformers",
     lambda L: _hf(L, "bit.modeling_bit.BitGroupNormActivation", _hf_config(L, "BitConfig", num_groups=4), C), IMG,
     "BiT GroupNormActivation"),
    ("hf.PoolFormerGroupNorm", "transformers", lambda L: _hf(L, "poolformer.modeling_poolformer.PoolFormerGroupNorm",
                                                             C), IMG, "subclass of torch.nn.GroupNorm"),
    ("hf.MambaRMSNormGated", "transformers",
     lambda L: _hf(L, "mamba2.modeling_mamba2.MambaRMSNormGated", D, group_size=D), SEQ, "left: gated"),
    ("hf.NemotronLayerNorm1P", "transformers", lambda L: _hf(L, "nemotron.modeling_nemotron.NemotronLayerNorm1P", D),
     SEQ, "left: autocast"),
]

def _params():
    return [pytest.param(*c, id=c[0]) for c in CASES]


def _randomise(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Weights 1 + 0.5·randn (so w ≠ 1), biases and running means 0.3·randn, running variances in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=g))
            elif name.endswith("weight") and "act" not in name:
                t.copy_(r * 0.5 + (0.0 if t.abs().max() == 0 and t.numel() > 1 else 1.0))  # Gemma stores w - 1
            else:
                t.copy_(0.3 * r)
    return layer


def _run(layer, x, seed=1):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # DropBlock draws the same mask in both layers
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], dy, allow_unused=True)
    return y.detach(), grads


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def _frob(x, truth):
    return float((x.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize(("case", "library", "factory", "shape", "expected"), _params())
def test_recipe_on_the_real_class(case, library, factory, shape, expected, request):
    lib = request.getfixturevalue(library)
    torch.manual_seed(0)
    layer = _randomise(factory(lib))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = copy.deepcopy(layer)
        children = dict(converted.named_children())
        model, rep = normkit.convert(nn.Sequential(converted), report=True)
    name = recipes.class_name(layer)
    entry = rep.classes[name]
    if expected.startswith("left: "):
        assert type(model[0]) is type(layer), "swapped a class that cannot be reproduced exactly"
        (reason,) = entry.left
        assert re.search(expected[6:], reason), reason
        assert any(name.split(".", 1)[1] in str(w.message) for w in caught)
        return
    assert entry.left == {}, entry.left
    assert entry.recipes == {expected: 1}
    new = model[0]
    assert list(new.state_dict()) == list(layer.state_dict())
    for name, child in children.items():  # act and drop modules are the original's objects (an Identity drop goes)
        if name == "drop" and type(child) is nn.Identity:
            assert "drop" not in new._modules
        else:
            assert new._modules["act" if name == "activation" else name] is child, name
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    for mode in (True, False):
        for x in (2 + base, 0.01 * base):  # a non-zero mean; a variance where eps shows
            a, b = copy.deepcopy(layer).train(mode), copy.deepcopy(new).train(mode)
            ya, ga = _run(a, x)
            yb, gb = _run(b, x)
            assert yb.dtype == ya.dtype and yb.shape == ya.shape
            assert _rel(ya, yb) <= 4e-6, (mode, _rel(ya, yb))
            for i, (u, v) in enumerate(zip(ga, gb, strict=True)):
                assert (u is None) == (v is None), i
                if u is not None:
                    assert _rel(u, v) <= 2e-5, (mode, i, _rel(u, v))
            for (n, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers(), strict=True):
                torch.testing.assert_close(bb, ba, rtol=1e-6, atol=1e-7, msg=n)
    if ya.dim() == 4:  # the layout the original returns (channels_last from the permute forms)
        assert yb.is_contiguous(memory_format=torch.channels_last) == ya.is_contiguous(
            memory_format=torch.channels_last)
    # bf16 input with bf16 weights, and with fp32 weights (a bf16 model with fp32 norms, or master weights): the
    # original's output dtype, and no more error against the float64 original than the original's own
    xb = (2 + base).to(torch.bfloat16)
    ran = 0
    for weights in (torch.bfloat16, torch.float32):
        for mode in (True, False):
            try:
                truth, tg = _run(copy.deepcopy(layer).double().train(mode), xb.double())
            except RuntimeError:  # a forward that casts to fp32 itself (EsmFold2LayerNorm): fp32 is the truth
                truth, tg = _run(copy.deepcopy(layer).float().train(mode), xb.float())
            try:
                ya, ga = _run(copy.deepcopy(layer).to(weights).train(mode), xb)
            except RuntimeError:  # e.g. EsmFold2LayerNorm: F.layer_norm of fp32 input with bf16 weights
                continue
            ran += 1
            yb, gb = _run(copy.deepcopy(new).to(weights).train(mode), xb)
            assert yb.dtype == ya.dtype, (weights, yb.dtype, ya.dtype)
            grads = [(f"grad {i}", *z) for i, z in enumerate(zip(ga, gb, tg, strict=True)) if z[2] is not None]
            for what, u, v, t in [("output", ya, yb, truth), *grads]:
                own, got = _frob(u, t), _frob(v, t)
                assert got <= 1.1 * max(own, 2.0**-10), (weights, mode, what, got, own)
    assert ran >= 2
