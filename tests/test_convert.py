"""normkit.convert swaps every norm layer of a model, keeping weights, buffers and flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit


def torch_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.GroupNorm(3, 6),
        nn.InstanceNorm2d(6, affine=True),
        nn.Sequential(nn.Flatten(2), nn.LayerNorm(16), nn.RMSNorm(16)),
        nn.Flatten(),
        nn.BatchNorm1d(96),
        nn.Unflatten(1, (6, 16)),
        nn.InstanceNorm1d(6),
        nn.Unflatten(2, (2, 2, 4)),
        nn.BatchNorm3d(6),
    )


def test_convert_to_normkit_and_back():
    torch.manual_seed(0)
    model = torch_model()
    model[1].running_mean.uniform_()
    model[4].eval()
    params_before = [id(p) for p in model.parameters()]
    x = 3 + torch.randn(4, 3, 4, 4)
    expected = model(x)

    converted = normkit.convert(model)
    assert converted is model
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm |
                                                             nn.GroupNorm | nn.RMSNorm)]
    assert len(norms) == 8
    assert all(type(m).__module__.startswith("normkit.") for m in norms)
    assert [id(p) for p in model.parameters()] == params_before  # optimizers keep working
    assert model[4].training is False and model[1].training is True
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)

    normkit.convert(model, to="torch")
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules())
    assert [id(p) for p in model.parameters()] == params_before


def test_convert_a_bare_layer_and_bad_argument():
    layer = normkit.convert(nn.LayerNorm(4))
    assert type(layer) is normkit.LayerNorm
    with pytest.raises(ValueError, match="to"):
        normkit.convert(layer, to="jax")


def test_unknown_subclass_is_left_alone_with_a_warning():
    class MyNorm(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyNorm(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match="MyNorm"):
        normkit.convert(model)
    assert type(model[0]) is MyNorm
    assert type(model[1]) is normkit.BatchNorm2d


def test_subclass_that_overrides_nothing_takes_the_torch_recipe():
    class PlainNorm(nn.GroupNorm):  # transformers' PoolFormerGroupNorm: only __init__ of its own
        def __init__(self, c):
            super().__init__(1, c)

    model = nn.Sequential(PlainNorm(4))
    model, report = normkit.convert(model, report=True)
    assert type(model[0]) is normkit.GroupNorm
    assert report.swapped == 1 and report.verified == 1


def test_normkit_only_layers_pass_silently():
    import warnings

    model = torch.nn.Sequential(normkit.BatchRenorm2d(3), normkit.GhostBatchNorm2d(3, virtual_batch_size=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normkit.convert(model)
        normkit.convert(model, to="torch")
    assert type(model[0]) is normkit.BatchRenorm2d


# --- fuse=True on patterns written in forward() (torch.fx) ------------------------------------------

import copy  # noqa: E402
import warnings  # noqa: E402

import torch.nn.functional as F  # noqa: E402


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (torchvision is not a dependency): ``relu(bn2(conv2(h)) + identity)``."""

    def __init__(self, cin, cout, stride=1, relu="module"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (None if stride == 1 and cin == cout else
                           nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.how = relu

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.how == "module":
            out += identity
            return self.relu(out)
        if self.how == "functional":
            return F.relu(identity + out)
        return torch.relu(torch.add(out, identity))


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c // 2, 1, bias=False), nn.BatchNorm2d(c // 2)
        self.conv2, self.bn2 = nn.Conv2d(c // 2, c // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(c // 2)
        self.conv3, self.bn3 = nn.Conv2d(c // 2, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out)).relu()
        out = self.bn3(self.conv3(out))
        return (out + x).relu_()


def resnet_like():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BasicBlock(8, 8), BasicBlock(8, 12, 2, "functional"),
                         BasicBlock(12, 12, 1, "torch"), Bottleneck(12))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fx_fusion_keeps_the_numbers(mode):
    torch.manual_seed(0)
    ref = resnet_like()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    ref.train(mode == "train")
    unfused = normkit.convert(copy.deepcopy(ref))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every block here traces
        fused = normkit.convert(copy.deepcopy(ref), fuse=True)
    assert type(fused[1]) is BasicBlock  # class, names and state stay
    assert list(fused.state_dict()) == list(ref.state_dict())
    for blk in list(fused)[1:]:
        assert "forward" in blk.__dict__, type(blk).__name__  # every block's forward was rewritten
    assert type(fused[1].bn2) is normkit.BatchNorm2d  # the child is unchanged: losing the forward is safe
    x = (3 + torch.randn(4, 3, 9, 9)).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    # one backend for both, so that what differs is the fusion (on `auto` the unfused small BatchNorms
    # run on aten's kernel and the fused ones on normkit's: fp32 rounding of their own, ~1e-6 relative)
    with normkit.backend("cpu" if normkit.ops.native_ops() is not None else "reference"):
        y_ref, y = unfused(x), fused(x2)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        dy = torch.randn_like(y)
        y_ref.backward(dy)
        y.backward(dy)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(unfused.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, b), c in zip(unfused.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-6, msg=name)


def test_fx_fusion_calls_the_fused_kernel(monkeypatch):
    model = normkit.convert(resnet_like(), fuse=True)
    calls = []
    real = normkit.BatchNorm2d._normalize

    def spy(self, x, residual=None, act=""):
        calls.append((act, residual is not None))
        return real(self, x, residual, act)

    monkeypatch.setattr(normkit.BatchNorm2d, "_normalize", spy)
    model(torch.randn(2, 3, 8, 8))
    # per BasicBlock: bn1 → relu, bn2 + identity → relu; Bottleneck: bn1, bn2 → relu, bn3 + x → relu
    assert calls.count(("relu", True)) == 4
    assert calls.count(("relu", False)) == 5
    assert "forward" in model[1].__dict__ and "forward" in model[4].__dict__


def test_fx_fusion_survives_deepcopy_and_train_eval_switch():
    torch.manual_seed(0)
    fused = normkit.convert(resnet_like(), fuse=True)
    twin = copy.deepcopy(fused)
    assert twin[1].forward.module is twin[1] and twin[1].bn2 is not fused[1].bn2
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False):
        fused.train(training)
        twin.train(training)
        torch.testing.assert_close(twin(x), fused(x))
    twin[1].bn2.weight.data.fill_(2.0)  # the copy has its own parameters
    assert not torch.equal(twin[1].bn2.weight, fused[1].bn2.weight)


class Untraceable(BasicBlock):
    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if out.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            out = out * 1.0
        return torch.relu(out + x)


class ModeDependent(BasicBlock):
    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + x) if self.training else torch.relu(out - x)


class Broadcasting(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.bias = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        return torch.relu(self.bn(x) + self.bias)  # a (C, 1, 1) "shortcut": broadcast, not a residual


class SharedUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn(x)
        return torch.relu(h + x) + h  # bn's output used twice: no fusion


@pytest.mark.parametrize("cls", [Untraceable, ModeDependent, Broadcasting, SharedUse])
def test_fx_fusion_never_changes_results(cls):
    torch.manual_seed(0)
    ref = cls(4, 4) if issubclass(cls, BasicBlock) else cls()
    fused = copy.deepcopy(ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = normkit.convert(fused, fuse=True)
    messages = [str(w.message) for w in caught]
    if cls is Untraceable:
        assert any("could not trace" in m and "Untraceable" in m for m in messages), messages
        assert "forward" not in fused.__dict__
    if cls is ModeDependent:
        assert any("self.training" in m for m in messages), messages
        assert "forward" not in fused.__dict__
    if cls is SharedUse:
        assert "forward" not in fused.__dict__  # nothing to fuse: forward untouched
    if cls is Broadcasting:
        assert "forward" in fused.__dict__  # fused, but the (C, 1, 1) operand takes the unfused path
    x = 3 + torch.randn(2, 4, 5, 5)
    for training in (True, False):
        ref.train(training)
        fused.train(training)
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_fx_fusion_with_a_hooked_or_shared_bn_is_skipped():
    blk = BasicBlock(4, 4)
    seen = []
    blk.bn2 = normkit.BatchNorm2d(4)
    blk.bn2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    normkit.convert(blk, fuse=True)
    blk(torch.randn(2, 4, 5, 5))
    assert seen == [torch.Size([2, 4, 5, 5])]  # the hook still runs: bn2 was not fused away

    bn = nn.BatchNorm2d(4)
    a, b = BasicBlock(4, 4), BasicBlock(4, 4)
    a.bn2 = b.bn2 = bn  # one BatchNorm in two blocks
    model = normkit.convert(nn.Sequential(a, b), fuse=True)
    assert a.bn2 is b.bn2 and type(a.bn2) is normkit.BatchNorm2d  # convert keeps it one layer
    calls = []
    real = normkit.functional.batch_norm_module
    normkit.functional.batch_norm_module = \
        lambda self, x, r=None, act="": calls.append((self, act)) or real(self, x, r, act)
    try:
        model(torch.randn(2, 4, 5, 5))
    finally:
        normkit.functional.batch_norm_module = real
    assert [act for m, act in calls if m is a.bn2] == ["", ""]  # the shared one ran plain, twice


def test_fx_fusion_steps_aside_after_surgery_to_torch_and_pickle():
    import io

    torch.manual_seed(0)
    ref = resnet_like()
    fused = normkit.convert(copy.deepcopy(ref), fuse=True)
    x = 3 + torch.randn(2, 3, 8, 8)
    for m in (ref, fused):
        m.eval()
    expected = ref(x)
    # torch.save of the whole model: the generated forward is not picklable; the class's runs
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "forward" not in loaded[1].__dict__ or not hasattr(loaded[1].forward, "code")
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    # a child replaced after fusion is used: the rewritten code steps aside
    fused[1].bn2 = nn.Identity()
    ref[1].bn2 = nn.Identity()
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    # back to torch.nn: the class's forward, torch's layers
    normkit.convert(fused, to="torch")
    normkit.convert(ref, to="torch")
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
