"""The layers' one-call forwards (csrc/layers.cpp through normkit._fast) against the Python path.

A served call must be the Python path's computation to the bit — outputs, gradients, strides,
running statistics, ``num_batches_tracked``, ``skipped_batches`` — because it calls the same
functions; and every case it does not recognise as the plain common case must fall through to the
Python path (which raises the clear error or serves the case). A spy on ``normkit._C`` records
whether each call was served, so the equality tests cannot pass by comparing the Python path
with itself.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normkit
from normkit import _fast
from normkit import functional as NF

pytestmark = pytest.mark.skipif(not _fast.entries(), reason="the C++ extension is not built")

ACTS = [None, "relu", "silu", "gelu"]


class _Spy:
    """``normkit._C`` with each layer function's answers recorded: True served, False not."""

    def __init__(self, real):
        self.real, self.served = real, []

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name == "plain_cpu":  # the route's question, not a layer function
            return fn

        def call(*args):
            out = fn(*args)
            self.served.append(out is not None)
            return out

        return call


@pytest.fixture
def spy(monkeypatch):
    s = _Spy(_fast.entries())
    monkeypatch.setattr(_fast, "entries", lambda: s)
    return s


def _python_path(monkeypatch):
    monkeypatch.setattr(_fast, "entries", lambda: False)


def _state(layer):
    out = {k: v.clone() for k, v in layer.state_dict().items()}
    sb = layer.__dict__.get("skipped_batches")
    if sb is not None:
        out["skipped_batches"] = sb.clone()
    return out


def _run(layer, x, *, residual=None, grad=True, steps=2):
    """Outputs of ``steps`` forwards, the gradients of the last (when ``grad``) and the final state."""
    outs, grads = [], []
    for _ in range(steps):
        xi = x.detach().clone().requires_grad_(grad)
        ri = None if residual is None else residual.detach().clone().requires_grad_(grad)
        args = (xi,) if ri is None else (xi, ri)
        with torch.set_grad_enabled(grad):
            y = layer(*args)
        outs.append(y.detach())
        if grad:
            for p in layer.parameters():
                p.grad = None
            y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
            grads = [xi.grad, *(p.grad for p in layer.parameters()), *([] if ri is None else [ri.grad])]
    return outs, grads, _state(layer)


def _same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        if u is None or v is None:
            assert u is None and v is None
            continue
        assert u.dtype == v.dtype and u.shape == v.shape and u.stride() == v.stride()
        assert torch.equal(u.isnan(), v.isnan()) and torch.equal(u.nan_to_num(), v.nan_to_num())


def _compare(make, x, monkeypatch, spy, *, residual=None, grad=True, train=True, served=True):
    """The layer from ``make()`` on the one-call forward and on the Python path: the same bits."""
    torch.manual_seed(0)
    fast_layer = make()
    with torch.no_grad():  # non-trivial parameters and statistics
        for t in (*fast_layer.parameters(), *fast_layer.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, dtype=torch.float64) + 0.5)
    slow_layer = copy.deepcopy(fast_layer)
    fast_layer.train(train), slow_layer.train(train)
    got = _run(fast_layer, x, residual=residual, grad=grad)
    assert spy.served and all(spy.served) == served and any(spy.served) == served
    _python_path(monkeypatch)
    want = _run(slow_layer, x, residual=residual, grad=grad)
    _same(got[0], want[0])
    _same(got[1], want[1])
    assert got[2].keys() == want[2].keys()
    _same(list(got[2].values()), list(want[2].values()))


def _x(*shape, dtype=torch.float32, channels_last=False, offset=3.0):
    x = (offset + 0.5 * torch.randn(*shape, dtype=torch.float64)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


# ----------------------------------------------------------------------------- BatchNorm
BN_CASES = [
    (lambda: normkit.BatchNorm1d(7), (8, 7), False),
    (lambda: normkit.BatchNorm1d(6), (4, 6, 33), False),
    (lambda: normkit.BatchNorm2d(5), (3, 5, 7, 9), False),
    (lambda: normkit.BatchNorm2d(5), (3, 5, 7, 9), True),
    (lambda: normkit.BatchNorm2d(16), (8, 16, 16, 17), False),  # above route.ATEN_BELOW: the kernel
    (lambda: normkit.BatchNorm3d(3), (2, 3, 4, 5, 3), True),
    (lambda: normkit.BatchNormAct1d(7, act="silu"), (8, 7), False),
    (lambda: normkit.BatchNormAct3d(3), (2, 3, 4, 5, 3), False),
]


@pytest.mark.parametrize("backend", ["auto", "cpu"])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("make,shape,channels_last", BN_CASES)
def test_batch_norm_layers_match_the_python_path(make, shape, channels_last, train, grad, backend, monkeypatch, spy):
    with normkit.backend(backend):
        _compare(make, _x(*shape, channels_last=channels_last), monkeypatch, spy, grad=grad, train=train)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_batch_norm_matches_the_python_path(act, residual, train, channels_last, monkeypatch, spy):
    x = _x(4, 6, 5, 7, channels_last=channels_last)
    r = _x(4, 6, 5, 7, offset=-1.0) if residual else None
    _compare(lambda: normkit.BatchNormAct2d(6, act=act), x, monkeypatch, spy, residual=r, train=train)


@pytest.mark.parametrize("options", [dict(momentum=None), dict(momentum=0.37), dict(track_running_stats=False),
                                     dict(affine=False), dict(eps=1e-3)])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_options_match_the_python_path(options, train, monkeypatch, spy):
    _compare(lambda: normkit.BatchNorm2d(5, **options), _x(3, 5, 4, 4), monkeypatch, spy, train=train)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_dtypes_match_the_python_path(dtype, train, monkeypatch, spy):
    # float32 statistics and parameters beside reduced-precision input, as torch.nn allows
    params = torch.float64 if dtype == torch.float64 else torch.float32
    _compare(lambda: normkit.BatchNorm2d(5, dtype=params), _x(3, 5, 4, 6, dtype=dtype), monkeypatch, spy,
             train=train)


def test_a_non_finite_batch_is_skipped_and_counted_as_on_the_python_path(monkeypatch, spy):
    x = _x(4, 3, 5, 5)
    x[1, 2, 3, 3] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _compare(lambda: normkit.BatchNorm2d(3), x, monkeypatch, spy)


def test_the_skip_warns_once_per_layer(spy):
    layer = normkit.BatchNorm1d(4)
    x = torch.full((8, 4), float("nan"))
    with pytest.warns(RuntimeWarning):
        layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    assert all(spy.served) and int(layer.skipped_batches) == 2 and int(layer.num_batches_tracked) == 0


# ----------------------------------------------------------------------------- GroupNorm, LayerNorm, RMSNorm
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_matches_the_python_path(act, channels_last, affine, monkeypatch, spy):
    x = _x(3, 8, 5, 7, channels_last=channels_last)
    if act is None:
        make = lambda: normkit.GroupNorm(4, 8, affine=affine)  # noqa: E731
        _compare(make, x, monkeypatch, spy)
    else:
        make = lambda: normkit.GroupNormAct(4, 8, affine=affine, act=act)  # noqa: E731
        _compare(make, x, monkeypatch, spy, residual=_x(3, 8, 5, 7, offset=-1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 64), (3, 1023)])
@pytest.mark.parametrize("options", [{}, dict(elementwise_affine=False), dict(bias=False)])
def test_layer_norm_matches_the_python_path(dtype, shape, options, monkeypatch, spy):
    params = torch.float32 if dtype == torch.bfloat16 else dtype
    _compare(lambda: normkit.LayerNorm(shape[-1], dtype=params, **options), _x(*shape, dtype=dtype), monkeypatch,
             spy)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("make,shape,channels_last", [
    (lambda a: normkit.InstanceNorm1d(5, affine=a), (3, 5, 17), False),
    (lambda a: normkit.InstanceNorm2d(5, affine=a), (3, 5, 7, 6), False),
    (lambda a: normkit.InstanceNorm2d(5, affine=a), (3, 5, 7, 6), True),
    (lambda a: normkit.InstanceNorm3d(5, affine=a), (2, 5, 3, 4, 5), False),
])
def test_instance_norm_matches_the_python_path(make, shape, channels_last, affine, train, monkeypatch, spy):
    _compare(lambda: make(affine), _x(*shape, channels_last=channels_last), monkeypatch, spy, train=train)


def test_instance_norm_with_running_statistics_or_one_value_per_instance_is_left_to_the_python_path(spy):
    normkit.InstanceNorm2d(3, track_running_stats=True)(torch.randn(2, 3, 4, 4))
    with pytest.raises(normkit.NormInputError, match="more than 1 spatial element"):
        normkit.InstanceNorm2d(3)(torch.randn(2, 3, 1, 1))
    assert spy.served == []
    x = torch.randn(3, 4, 4)  # unbatched: the Python path unsqueezes it and calls forward again, served there
    torch.testing.assert_close(normkit.InstanceNorm2d(3)(x), torch.nn.InstanceNorm2d(3)(x))
    assert spy.served == [True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, dict(elementwise_affine=False), dict(bias=False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_2d_matches_the_python_path(channels_last, options, dtype, monkeypatch, spy):
    params = torch.float32 if dtype == torch.bfloat16 else dtype
    _compare(lambda: normkit.LayerNorm2d(6, dtype=params, **options),
             _x(3, 6, 5, 7, dtype=dtype, channels_last=channels_last), monkeypatch, spy)


def test_layer_norm_2d_served_is_twice_differentiable(spy):
    layer = normkit.LayerNorm2d(3).double()
    x = (2 + torch.randn(2, 3, 2, 3, dtype=torch.float64)).requires_grad_()
    for t in (x, x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()):
        assert torch.autograd.gradcheck(lambda t, w, b: layer(t), (t, layer.weight, layer.bias))
        assert torch.autograd.gradgradcheck(lambda t, w, b: layer(t), (t, layer.weight, layer.bias))
    assert spy.served and all(spy.served)


@pytest.mark.parametrize("shape,normalized", [((4, 6, 5), [6, 5]), ((2, 3, 4, 5), (3, 4, 5)), ((7, 33), 33)])
@pytest.mark.parametrize("options", [{}, dict(elementwise_affine=False), dict(bias=False)])
def test_layer_norm_over_several_dimensions_matches_the_python_path(shape, normalized, options, monkeypatch, spy):
    _compare(lambda: normkit.LayerNorm(normalized, **options), _x(*shape), monkeypatch, spy)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 6), (2, 5, 3, 4)])
def test_sync_batch_norm_without_a_process_group_matches_the_python_path(shape, train, monkeypatch, spy):
    _compare(lambda: normkit.SyncBatchNorm(5), _x(*shape), monkeypatch, spy, train=train)


def test_layer_norm_of_a_non_contiguous_input_matches_the_python_path(monkeypatch, spy):
    x = _x(33, 6).t()  # (6, 33) transposed
    _compare(lambda: normkit.LayerNorm(6), x.t().contiguous().t().t(), monkeypatch, spy)
    _compare(lambda: normkit.LayerNorm(6), x.t(), monkeypatch, spy)


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_python_path(eps, dtype, monkeypatch, spy):
    _compare(lambda: normkit.RMSNorm(64, eps=eps, dtype=dtype), _x(4, 3, 64, dtype=dtype), monkeypatch, spy)


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 6), (2, 5, 3, 4)])
@pytest.mark.parametrize("mode", ["eval", "train without running statistics"])
def test_functional_batch_norm_without_an_update_matches_the_python_path(shape, mode, act, monkeypatch, spy):
    torch.manual_seed(0)
    x = _x(*shape).requires_grad_()
    w, b = (torch.rand(5) + 0.5).requires_grad_(), torch.rand(5).requires_grad_()
    rm, rv = torch.rand(5), torch.rand(5) + 0.5
    train = mode != "eval"

    def run():
        y = NF.batch_norm(x, None if train else rm, None if train else rv, w, b, train, act=act)
        return [y, *torch.autograd.grad(y.square().sum(), [x, w, b])]

    got = run()
    assert spy.served == [True]
    _python_path(monkeypatch)
    _same(got, run())


@pytest.mark.parametrize("act", [None, "relu"])
def test_eval_with_only_the_residual_requiring_grad_takes_the_python_paths_route(act, monkeypatch, spy):
    layer = normkit.BatchNormAct1d(5, act=act).eval().requires_grad_(False)
    x, r = _x(8, 5), _x(8, 5, offset=-3.0).requires_grad_()

    def run():
        y = layer(x, r)
        return [y, *torch.autograd.grad(y.square().sum(), [r])]

    got = run()
    assert spy.served == [True]
    _python_path(monkeypatch)
    _same(got, run())


def test_functional_batch_norm_that_moves_running_statistics_stays_in_python(spy):
    rm, rv = torch.zeros(5), torch.ones(5)
    NF.batch_norm(torch.randn(8, 5), rm, rv, training=True)
    assert spy.served == [] and not torch.equal(rm, torch.zeros(5))


def test_the_functions_are_served_too(spy):
    x, w, b = _x(4, 8, 5), torch.rand(8), torch.rand(8)
    for served, want in [
        (NF.layer_norm(x, 5, None, None), torch.nn.functional.layer_norm(x, [5])),
        (NF.group_norm(x, 2, w, b), torch.nn.functional.group_norm(x, 2, w, b)),
        (NF.rms_norm(x, [5]), torch.nn.functional.rms_norm(x, [5])),
    ]:
        torch.testing.assert_close(served, want)
    assert spy.served == [True, True, True]


# ----------------------------------------------------------------------------- what is not served
def test_bad_input_is_not_served_and_raises_the_clear_error_leaving_the_buffers(spy):
    layer = normkit.BatchNorm2d(4)
    before = _state(layer)
    for bad, message in [(torch.randn(2, 5, 3, 3), "num_features"), (torch.randn(1, 4, 1, 1), "more than 1 value"),
                         (torch.randn(2, 4, 3), "4D input"), (torch.randn(2, 4, 3, 3).int(), "floating-point")]:
        with pytest.raises(normkit.NormInputError, match=message):
            layer(bad)
    assert spy.served == [False] * 4
    _same(list(_state(layer).values()), list(before.values()))
    with pytest.raises(normkit.NormInputError, match="normalized_shape"):
        normkit.LayerNorm(6)(torch.randn(2, 5))
    with pytest.raises(normkit.NormInputError, match="num_groups"):
        NF.group_norm(torch.randn(2, 6, 3), 4)


class _Subclass(torch.Tensor):
    pass


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_transforms_modes_tracing_subclasses_and_empty_tensors_are_not_served(spy):
    """The route sends transforms, modes, tracing and subclasses to torch's operators before any C++ call;
    the one-call path itself hands back what it cannot run (an empty tensor)."""
    layer = normkit.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4)
    want = torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias)

    def never_called(call):
        spy.served.clear()
        call()
        assert spy.served == []

    never_called(lambda: torch.func.vmap(layer)(x.unsqueeze(0)))
    never_called(lambda: torch.func.grad(lambda t: layer(t).sum())(x))
    with _Recorder() as rec:
        never_called(lambda: layer(x))
    assert rec.ops  # the mode saw torch's operations
    with torch.device("cpu"):  # a torch function mode
        never_called(lambda: layer(x))
    never_called(lambda: torch.jit.trace(layer, x, check_trace=False))
    never_called(lambda: torch.testing.assert_close(layer(x.as_subclass(_Subclass)), want))
    spy.served.clear()
    layer(torch.randn(0, 3, 4, 4))
    assert spy.served == [False]


def test_forward_mode_ad_and_other_backends_are_not_served(spy):
    layer = normkit.LayerNorm(5)
    x = torch.randn(3, 5)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        y = layer(fwAD.make_dual(x, torch.ones_like(x)))
        assert fwAD.unpack_dual(y).tangent is not None
    with normkit.backend("reference"):
        layer(x)
    assert spy.served == []  # refused before the C++ call


def test_a_training_update_under_a_saved_tensor_hook_is_served(spy):
    """A saved-tensor hook that is not checkpointing's recomputation: the route's policy says update, and
    the one-call path moves the statistics once."""
    layer = normkit.BatchNorm1d(4)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        layer(torch.randn(8, 4, requires_grad=True)).sum().backward()
        layer.eval()(torch.randn(8, 4, requires_grad=True)).sum().backward()
    assert spy.served == [True, True] and int(layer.num_batches_tracked) == 1


def test_a_recomputed_forward_is_served_without_moving_the_statistics(spy):
    layer = normkit.BatchNorm1d(4)
    x = torch.randn(8, 4, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True)
    y.sum().backward()  # the forward runs again inside the backward pass
    assert spy.served == [True, True] and int(layer.num_batches_tracked) == 1


LAYERS = [
    (lambda: normkit.BatchNorm2d(4), (2, 4, 5, 5)),
    (lambda: normkit.BatchNormAct2d(4), (2, 4, 5, 5)),
    (lambda: normkit.LayerNorm(8), (3, 6, 8)),
    (lambda: normkit.GroupNorm(2, 4), (2, 4, 5)),
    (lambda: normkit.RMSNorm(8), (3, 8)),
    (lambda: normkit.LayerNorm2d(4), (2, 4, 3, 5)),
]


def _layer_and_twin(make, train=True):
    torch.manual_seed(0)
    layer = make().train(train)
    return layer, copy.deepcopy(layer)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("make,shape", LAYERS)
def test_inference_mode_is_served_with_the_python_paths_bits(make, shape, train, monkeypatch, spy):
    layer, twin = _layer_and_twin(make, train)
    x = _x(*shape)
    with torch.inference_mode():
        got = layer(x)
        assert spy.served == [True] and got.is_inference()
        _python_path(monkeypatch)
        want = twin(x)
    _same([got], [want])
    _same(list(_state(layer).values()), list(_state(twin).values()))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("make,shape", LAYERS)
def test_autocast_is_served_with_the_python_paths_bits(make, shape, train, monkeypatch, spy):
    # under CPU autocast a Linear hands the norm bfloat16 activations; the layer's float32 parameters stay
    layer, twin = _layer_and_twin(make, train)
    h = _x(*shape).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(h)
        assert spy.served == [True]
        _python_path(monkeypatch)
        want = twin(h)
    assert got.dtype == want.dtype == torch.bfloat16
    _same([got], [want])
    g1 = torch.autograd.grad(got.float().square().sum(), [h, *layer.parameters()])
    g2 = torch.autograd.grad(want.float().square().sum(), [h, *twin.parameters()])
    _same(list(g1), list(g2))
    _same(list(_state(layer).values()), list(_state(twin).values()))


@pytest.mark.parametrize("make,shape", LAYERS)
def test_gradients_that_arrive_expanded_or_transposed(make, shape, monkeypatch, spy):
    # a mean over a dimension hands back an expanded gradient; a transpose a non-contiguous one
    layer, twin = _layer_and_twin(make)
    x = _x(*shape).requires_grad_()

    def grads(module):
        y = module(x)
        loss = y.mean(dim=0).sum() + y.transpose(0, -1).cumsum(0).square().mean()
        return torch.autograd.grad(loss, [x, *module.parameters()])

    got = grads(layer)
    assert spy.served == [True]
    _python_path(monkeypatch)
    _same(list(got), list(grads(twin)))


def test_the_profiler_names_each_served_layer(spy):
    layers = [normkit.BatchNorm1d(4), normkit.GroupNorm(2, 4), normkit.LayerNorm(4), normkit.RMSNorm(4)]
    x = torch.randn(8, 4, 3)
    with torch.profiler.profile() as prof:
        normkit.BatchNorm1d(4)(x)
        layers[1](x)
        layers[2](x.transpose(1, 2))
        layers[3](x.transpose(1, 2).contiguous())
    keys = {e.key for e in prof.key_averages()}
    assert all(spy.served)
    assert {"normkit::batch_norm", "normkit::group_norm", "normkit::layer_norm", "normkit::rms_norm"} <= keys


NODES = [
    (lambda: normkit.BatchNorm1d(6), (8, 6), "BatchNormBackward"),
    (lambda: normkit.BatchNorm1d(4).eval(), (8, 4), "BatchNormEvalBackward"),  # 2-D with grad: the kernel route
    (lambda: normkit.GroupNorm(2, 4), (3, 4, 5), "GroupNormBackward"),
    (lambda: normkit.LayerNorm(6), (3, 5, 6), "LayerNormBackward"),
    (lambda: normkit.RMSNorm(6), (3, 5, 6), "RMSNormBackward"),
    (lambda: normkit.LayerNorm2d(4), (2, 4, 3, 3), "LayerNorm2dBackward"),
]


@pytest.mark.parametrize("make,shape,node", NODES)
def test_the_autograd_nodes_behave_like_torchs(make, shape, node, spy):
    """The hand-written nodes (csrc/autograd.h): named, hookable, honouring a graph task's wanted inputs,
    refusing a second backward through a freed graph and an in-place change of a saved input."""
    torch.manual_seed(0)
    layer = make()
    x = _x(*shape).requires_grad_()
    y = layer(x)
    assert y.grad_fn.name() == f"normkit::eager::{node}"
    dy = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, [layer.weight], dy, retain_graph=True)  # dx not computed, dγ the same
    assert torch.equal(gw, torch.autograd.grad(y, [x, layer.weight], dy, retain_graph=True)[1])
    calls = []
    y.grad_fn.register_prehook(lambda grads: calls.append("pre"))
    y.grad_fn.register_hook(lambda grads_in, grads_out: calls.append("post"))
    y.backward(dy)
    assert calls == ["pre", "post"]
    with pytest.raises(RuntimeError, match="second time"):
        y.backward(dy)
    z = x.detach().clone().requires_grad_()
    h = z * 1
    out = layer(h)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    assert spy.served and all(spy.served)


IN_PLACE_CASES = [(make, shape, cl) for make, shape in LAYERS + [(lambda: normkit.GroupNorm(2, 4), (2, 4, 3, 5))]
                  for cl in ([False, True] if len(shape) == 4 else [False])]


@pytest.mark.parametrize("make,shape,channels_last", IN_PLACE_CASES)
def test_an_output_can_be_changed_in_place_with_grad(make, shape, channels_last, monkeypatch, spy):
    """A layer's output is a tensor of its own, not a view made under no-grad: y.relu_() (and other in-place
    ops after the layer) work with autograd as after torch.nn's layers, and give the Python path's gradients."""
    layer, twin = _layer_and_twin(make)
    x = _x(*shape, channels_last=channels_last).requires_grad_()

    def run(module):
        y = module(x)
        y.relu_()
        return [y.detach(), *torch.autograd.grad(y.square().sum(), [x, *module.parameters()])]

    got = run(layer)
    assert spy.served == [True]
    _python_path(monkeypatch)
    _same(got, run(twin))

