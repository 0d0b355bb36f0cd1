"""convert(model, inplace=True), the inplace_abn / timm drop-ins, and InPlaceABNSync across gloo ranks.

The swapped model must compute exactly what it computed (outputs, every gradient, running statistics), write
its inputs only where nothing else reads them, and refuse swaps whose saved output a later in-place op would
invalidate. The ``inplace_abn`` package is not installed here: its classes are stand-ins with the package's
module and qualified names and its ``|γ| + ε`` forward; timm's ``InplaceAbn`` is the real class (its forward
needs the package, so its function is written out in torch).
"""

from __future__ import annotations

import copy
import socket
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as TF
from torch import nn

import normkit
from normkit.tools import inplace as T


def _grads_equal(a: nn.Module, b: nn.Module, x: torch.Tensor, atol=1e-12) -> None:
    outs = []
    for m in (a, b):
        m.train()
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, [p.grad for p in m.parameters()],
                     [t for n, t in m.named_buffers() if "running" in n]))
    (y1, g1, p1, s1), (y2, g2, p2, s2) = outs
    torch.testing.assert_close(y1, y2, rtol=0, atol=atol)
    torch.testing.assert_close(g1, g2, rtol=0, atol=atol)
    for u, v in zip(p1 + s1, p2 + s2, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=atol)


class PreAct(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(c), nn.LeakyReLU(0.1)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1)
        self.bn2, self.act2 = nn.BatchNorm2d(c), nn.ELU(0.5)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)
        self.proj = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))  # identity: feeds conv3 and the add
        self.conv3 = nn.Conv2d(c, c, 1)
        self.bn4 = nn.BatchNorm2d(c)  # followed by an in-place add: must stay

    def forward(self, x):
        a = self.act1(self.bn1(x))
        h = self.conv2(self.act2(self.bn2(self.conv1(a)))) + x
        p = self.proj(h)
        out = self.bn4(self.conv3(p) + p)
        out += h
        return out


def _randomize(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    return model


def test_convert_inplace_swaps_exactly_and_writes_only_exclusive_inputs():
    torch.manual_seed(0)
    base = _randomize(PreAct()).double()
    conv = normkit.convert(copy.deepcopy(base), inplace=True)
    swapped = {n: (m.activation, m.activation_param, m.inplace) for n, m in conv.named_modules()
               if isinstance(m, normkit.InPlaceABN)}
    assert swapped == {"bn1": ("leaky_relu", 0.1, False),  # its input is also the shortcut
                       "bn2": ("elu", 0.5, True),  # conv1's output, read by nothing else
                       "proj.1": ("identity", 0.01, True)}
    assert isinstance(conv.act1, nn.Identity) and isinstance(conv.act2, nn.Identity)
    assert type(conv.bn4) is normkit.BatchNorm2d
    x = 3 + 0.5 * torch.randn(2, 4, 5, 5, dtype=torch.float64)
    _grads_equal(base, conv, x)
    assert set(conv.state_dict()) == set(base.state_dict())
    base.load_state_dict(conv.state_dict())


def test_convert_inplace_sequential_and_untraceable_model():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(), nn.Conv2d(4, 4, 1),
                                      nn.BatchNorm2d(4), nn.LeakyReLU())  # last pair: its consumer is unknown

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.body(x)
            return -self.body(x)

    base = _randomize(Untraceable()).double()
    with pytest.warns(UserWarning, match="does not trace"):
        conv = normkit.convert(copy.deepcopy(base), inplace=True)
    kinds = [type(m).__name__ for m in conv.body]
    assert kinds == ["Conv2d", "InPlaceABN", "Identity", "Conv2d", "BatchNorm2d", "LeakyReLU"]
    assert conv.body[1].inplace
    _grads_equal(base, conv, 3 + torch.randn(2, 3, 6, 6, dtype=torch.float64))


# ----------------------------------------------------------------------------- the drop-ins
class _PackageABN(nn.Module):
    """The ``inplace_abn`` package's InPlaceABN as far as convert sees it: its names, state and |γ| + ε function."""

    def __init__(self, c, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, activation="leaky_relu",
                 activation_param=0.01):
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = c, eps, momentum, affine
        self.track_running_stats, self.activation, self.activation_param = track_running_stats, activation, \
            activation_param
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x):
        y = TF.batch_norm(x, self.running_mean, self.running_var, self.weight.abs() + self.eps, self.bias,
                          self.training, self.momentum, self.eps)
        return TF.leaky_relu(y, self.activation_param) if self.activation == "leaky_relu" else TF.elu(
            y, self.activation_param)


_PackageABN.__module__, _PackageABN.__qualname__, _PackageABN.__name__ = "inplace_abn.abn", "InPlaceABN", "InPlaceABN"


def test_inplace_abn_package_classes_by_name_exact():
    base = nn.Sequential(nn.Conv2d(3, 4, 1), _PackageABN(4, activation="elu", activation_param=0.5)).double()
    with torch.no_grad():
        base[1].weight.copy_(torch.tensor([1.0, -0.7, 0.4, -1.2]))
        base[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = 3 + torch.randn(2, 3, 4, 4, dtype=torch.float64)
    want = copy.deepcopy(base)(x)
    with pytest.warns(UserWarning, match=r"\|γ\| \+ ε"):
        conv = normkit.convert(copy.deepcopy(base))
    layer = conv[1]
    assert type(layer) is normkit.InPlaceABN and (layer.activation, layer.activation_param) == ("elu", 0.5)
    torch.testing.assert_close(conv(x), want, rtol=0, atol=1e-12)  # the weights now hold |γ| + ε
    assert set(conv.state_dict()) == set(base.state_dict())
    base.load_state_dict(conv.state_dict())
    conv.load_state_dict(copy.deepcopy(base).state_dict() | {"1.weight": torch.tensor([1.0, -0.7, 0.4, -1.2])})
    assert not torch.allclose(conv(x), want)  # a package checkpoint loaded as it is: another function where γ < 0
    assert T.reparameterize_abn_weights(conv) == 1
    torch.testing.assert_close(conv(x), want, rtol=0, atol=1e-12)


def test_timm_inplace_abn(timm):
    layer = timm.layers.InplaceAbn(6, act_layer="leaky_relu", act_param=0.2)
    with torch.no_grad():
        layer.weight.uniform_(-1.5, 1.5)
        layer.bias.uniform_(-0.3, 0.3)
    keys = set(layer.state_dict())
    effective = layer.weight.detach().abs() + layer.eps  # what the package's kernels scale by
    with pytest.warns(UserWarning, match=r"\|γ\| \+ ε"):
        model = normkit.convert(nn.Sequential(nn.Conv2d(3, 6, 1), layer))
    new = model[1]
    assert type(new) is normkit.InPlaceABN and new.activation == "leaky_relu" and new.activation_param == 0.2
    assert set(new.state_dict()) == keys  # no num_batches_tracked, as timm's
    timm.layers.InplaceAbn(6).load_state_dict(new.state_dict())
    x = 3 + torch.randn(2, 3, 4, 4)
    h = model[0](x)
    want = TF.leaky_relu(TF.batch_norm(h, None, None, effective, new.bias, True, 0.0, 1e-5), 0.2)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- InPlaceABNSync, 2 gloo ranks
SYNC_CASES = {  # name: (sizes per rank, activation, channels_last, gamma scale of channel 0)
    "leaky_uneven": ((3, 2), "leaky_relu", False, 1.0),
    "elu_channels_last": ((2, 2), "elu", True, 1.0),
    "fallback_gamma_zero": ((2, 3), "leaky_relu", False, 0.0),
    "identity_empty_rank": ((4, 0), "identity", False, 1.0),
}


def _sync_worker(rank, world, port, queue):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        errors = {}
        for name, (sizes, activation, cl, g0) in SYNC_CASES.items():
            gen = torch.Generator().manual_seed(7)
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = (3 + 0.5 * torch.randn(sum(sizes), 5, 3, 4, generator=gen, dtype=torch.float64))
            dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            layer = normkit.InPlaceABNSync(5, activation=activation, activation_param=0.3, dtype=torch.float64)
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5, generator=gen)
                layer.bias.uniform_(-0.5, 0.5, generator=gen)
                layer.weight[0] *= g0
            bn = nn.BatchNorm2d(5, dtype=torch.float64)
            bn.load_state_dict(layer.state_dict())
            act = {"leaky_relu": nn.LeakyReLU(0.3), "elu": nn.ELU(0.3), "identity": nn.Identity()}[activation]
            xr = x.clone().requires_grad_()
            yr = act(bn(xr))
            yr.backward(dy)
            lo = sum(sizes[:rank])
            mine = slice(lo, lo + sizes[rank])
            xl = x[mine].contiguous(memory_format=fmt).requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = layer(xl * 1.0)
            y.backward(dy[mine].contiguous(memory_format=fmt))
            grads = [layer.weight.grad.clone(), layer.bias.grad.clone()]
            for g in grads:
                dist.all_reduce(g)
            err = max((y - yr[mine]).abs().max().item() if y.numel() else 0.0,
                      (xl.grad - xr.grad[mine]).abs().max().item() if y.numel() else 0.0,
                      (grads[0] - bn.weight.grad).abs().max().item(), (grads[1] - bn.bias.grad).abs().max().item(),
                      (layer.running_mean - bn.running_mean).abs().max().item(),
                      (layer.running_var - bn.running_var).abs().max().item())
            errors[name] = err
        queue.put((rank, errors, None))
    except Exception:  # report to the parent instead of hanging it
        queue.put((rank, {}, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_inplace_abn_sync_two_ranks_equals_one_process_batchnorm():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_sync_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join(timeout=120)
    for rank, errors, tb in results:
        assert tb is None, f"rank {rank}:\n{tb}"
        for name, err in errors.items():
            assert err < 1e-11, f"rank {rank} {name}: {err:.3g}"


def test_convert_sync_batchnorm_keeps_inplace_abn():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), normkit.InPlaceABN(4, activation="elu", activation_param=0.3))
    synced = normkit.SyncBatchNorm.convert_sync_batchnorm(model)
    layer = synced[1]
    assert type(layer) is normkit.InPlaceABNSync and layer.activation == "elu" and layer.activation_param == 0.3
    assert layer.weight is model[1].weight and layer.group is None
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(synced(x), model(x), rtol=0, atol=0)  # not distributed: InPlaceABN's forward


def test_fold_freeze_recalibrate_see_the_activation():
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 1)))
    model = normkit.convert(model, inplace=True)
    assert type(model[1]) is normkit.InPlaceABN
    x = torch.randn(2, 3, 6, 6)
    model(x)  # move the running statistics
    model.eval()
    want = model(x)
    frozen = normkit.freeze(copy.deepcopy(model))
    torch.testing.assert_close(frozen(x), want, rtol=1e-6, atol=1e-6)
    folded = normkit.fold(copy.deepcopy(model))
    assert not any(isinstance(m, normkit.InPlaceABN) for m in folded.modules())
    torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)
    recal = normkit.recalibrate(copy.deepcopy(model), [x])
    with torch.no_grad():
        h = model[0](x)
    torch.testing.assert_close(recal[1].running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recal[1].running_var, h.var(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
