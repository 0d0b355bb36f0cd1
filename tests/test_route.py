"""The ``auto`` route keeps normkit's promise: the same bits for any thread count.

:func:`normkit.route.prefer_aten` hands some plain eager CPU calls to aten's own kernels. Several of
those are not thread-count independent on torch 2.13 (BatchNorm on ``(N, C)`` and channels_last
input, LayerNorm's dγ/dβ, GroupNorm's dx), so the rule may only pick aten where aten is. These
tests run each layer on the ``auto`` backend with 1 and with 2 threads and compare outputs,
gradients and running statistics bit for bit, at the small sizes where the rule weighs aten, and
check that the aten calls the rule does make are the thread-independent ones.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normkit
from normkit import route

CASES = {
    "bn1d_train_2d": (lambda: normkit.BatchNorm1d(256), (64, 256), "train"),
    "bn1d_eval_grad_2d": (lambda: normkit.BatchNorm1d(256), (64, 256), "eval"),
    "bn1d_eval_nograd_2d": (lambda: normkit.BatchNorm1d(256), (64, 256), "infer"),
    "bn2d_train_nchw": (lambda: normkit.BatchNorm2d(16), (8, 16, 8, 8), "train"),
    "bn2d_train_channels_last": (lambda: normkit.BatchNorm2d(16), (4, 16, 8, 8, "cl"), "train"),
    "bn2d_eval_grad": (lambda: normkit.BatchNorm2d(16), (8, 16, 8, 8), "eval"),
    "gn_train": (lambda: normkit.GroupNorm(8, 32), (2, 32, 8, 8), "train"),
    "gn_infer": (lambda: normkit.GroupNorm(8, 32), (2, 32, 8, 8), "infer"),
    "in_train": (lambda: normkit.InstanceNorm2d(8, affine=True), (4, 8, 6, 6), "train"),
    "ln_train": (lambda: normkit.LayerNorm(256), (64, 256), "train"),
    "ln_train_2rows": (lambda: normkit.LayerNorm(256), (2, 256), "train"),
    "ln_infer": (lambda: normkit.LayerNorm(256), (64, 256), "infer"),
    "rms_train": (lambda: normkit.RMSNorm(256), (64, 256), "train"),
    "ln2d_train": (lambda: normkit.LayerNorm2d(16), (4, 16, 8, 8), "train"),
}


def _run(make, shape, mode, threads):
    channels_last = shape[-1] == "cl"
    shape = shape[:-1] if channels_last else shape
    torch.manual_seed(0)
    layer = make()
    for p in layer.parameters():
        p.data.uniform_(0.5, 1.5)
    x = 3 + torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape)
    layer.train(mode.startswith("train"))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if mode in ("infer", "train_nograd"):
            with torch.no_grad():
                return [layer(x)], layer
        x.requires_grad_(True)
        y = layer(x)
        grads = torch.autograd.grad(y, [x, *layer.parameters()], dy)
        return [y.detach(), *grads, *(b.clone() for b in layer.buffers())], layer
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("name", list(CASES))
def test_auto_route_is_thread_count_independent(name):
    make, shape, mode = CASES[name]
    one, _ = _run(make, shape, mode, 1)
    two, _ = _run(make, shape, mode, 2)
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        assert torch.equal(a, b), f"{name}: tensor {i} differs between 1 and 2 threads"


@pytest.mark.parametrize("op,shape,expected", [
    ("batch_norm_train", (64, 256), False),          # aten splits (N, C) sums across threads
    ("batch_norm_train", (8, 16, 8, 8), True),       # NCHW: channel-parallel, small
    ("batch_norm_train", (64, 16, 8, 8), False),     # ≥ ATEN_BELOW: normkit's kernels are faster
    ("batch_norm_infer", (64, 256), False),          # its backward's dγ/dβ over (N, C) rows (see below)
    ("batch_norm_infer", (8, 16, 8, 8), True),
    ("batch_norm_infer", (64, 16, 32, 32), True),    # eval: any size
    ("layer_norm", (64, 256), False),                # dγ/dβ in per-thread buffers
    ("group_norm", (2, 32, 8, 8), False),            # dx differs with the thread count
    ("rms_norm", (64, 256), False),                  # aten's is composite: slower
])
def test_rule_picks_aten_only_where_it_is_thread_and_grad_independent(op, shape, expected):
    x = torch.empty(shape)
    with normkit.backend("auto"):
        assert route.prefer_aten(op, x) is expected
        if op != "batch_norm_infer":  # the answer does not depend on whether a backward follows
            assert route.prefer_aten(op, x, needs_grad=False) is expected
        else:  # eval BatchNorm without a backward: aten (its forward is what normkit's op computes too)
            assert route.prefer_aten(op, x, needs_grad=False) is True
    with normkit.backend("cpu"):  # an explicit backend always runs its kernels
        assert route.choose(op, False, x) in (route.ONE_CALL, route.KERNELS)
    # fused: aten would need extra passes, except eval BatchNorm (its op computes torch.nn's sequence anyway)
    assert route.prefer_aten(op, x, fused=True) is (expected and op == "batch_norm_infer")
    channels_last = torch.empty(8, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert route.prefer_aten("batch_norm_train", channels_last) is False


@pytest.mark.parametrize("name", ["bn1d_eval_grad_2d", "gn_train", "ln_train", "rms_train", "bn2d_train_nchw"])
def test_forward_is_the_same_with_and_without_grad(name):
    """Inference (no_grad) and a forward that a backward follows take the same route: same bits."""
    make, shape, mode = CASES[name]
    with_grad, _ = _run(make, shape, mode, 1)
    without, _ = _run(make, shape, "infer" if mode != "train" else "train_nograd", 1)
    assert torch.equal(with_grad[0], without[0])


def test_aten_really_is_thread_dependent_where_the_rule_avoids_it():
    """The premise, so a future torch that fixes it shows up here: aten's BatchNorm on (N, C) input
    and LayerNorm's dγ differ between 1 and 2 threads (if this fails, the rule can be relaxed)."""
    torch.manual_seed(0)
    x = (3 + torch.randn(64, 256)).requires_grad_()
    w = torch.randn(256, requires_grad=True)
    dy = torch.randn(64, 256)
    out = {}
    for t in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(t)
        try:
            bn = torch.nn.functional.batch_norm(x, None, None, w, None, training=True)
            ln = torch.nn.functional.layer_norm(x, [256], w, None)
            out[t] = (bn.detach(), torch.autograd.grad(ln, w, dy)[0])
        finally:
            torch.set_num_threads(old)
    assert not torch.equal(out[1][0], out[2][0]) or not torch.equal(out[1][1], out[2][1])



@pytest.mark.parametrize("shape", [(64, 256), (4, 16, 5, 5), (4, 16, 5, 5, "cl")])
def test_eval_batchnorm_is_torch_nn_to_the_bit_on_every_route(shape):
    """Unfused eval BatchNorm computes its forward with aten's kernel on both routes (aten, and the
    C++ op a backward needs on (N, C) input), so a converted model's eval outputs are torch.nn's."""
    channels_last = shape[-1] == "cl"
    shape = shape[:-1] if channels_last else shape
    torch.manual_seed(0)
    ref = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(shape[1]).eval()
    ref.running_mean.uniform_(-1, 1)
    ref.running_var.uniform_(0.5, 2)
    ref.weight.data.uniform_(0.5, 1.5)
    ref.bias.data.uniform_(-0.5, 0.5)
    ours = normkit.convert(copy.deepcopy(ref))
    x = 3 + torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = ref(x)
    with torch.no_grad():
        assert torch.equal(ours(x), expected)
    assert torch.equal(ours(x.clone().requires_grad_()), expected)
    with normkit.backend("cpu"):
        assert torch.equal(ours(x), expected)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_fused_eval_batchnorm_is_torch_nn_bn_add_act_to_the_bit(act, residual, grad):
    """Fused eval BatchNorm (+ residual) + activation gives torch.nn's BN → add → activation bits."""
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm2d(8).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = (3 + torch.randn(2, 8, 5, 5)).requires_grad_(grad)
    r = torch.randn(2, 8, 5, 5) if residual else None
    fn = {"relu": torch.relu, "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[act]
    expected = fn(bn(x) + r if residual else bn(x))
    for backend in ("auto", "cpu"):
        with normkit.backend(backend):
            got = normkit.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                training=False, residual=r, act=act)
        assert torch.equal(got, expected), backend


def test_the_c_and_python_tests_of_plain_eager_agree():
    """route._plain_eager_python and normkit._C.plain_cpu answer the same question (the C one for CPU
    tensors): plain eager, plain tensors, in every state the route distinguishes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from normkit import _fast

    entries = _fast.entries()
    if not entries:
        pytest.skip("the C++ extension is not built: the Python test is the only one")
    x, w = torch.randn(2, 3), torch.nn.Parameter(torch.randn(3))

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        pass

    def both(t, others):
        return entries.plain_cpu(t, others), route._plain_eager_python(t, others)

    assert both(x, (w, None)) == (True, True)
    assert both(x, (w.as_subclass(Sub),)) == (False, False)
    assert both(x.as_subclass(Sub), ()) == (False, False)
    assert both(torch.empty(2, 3, device="meta"), ()) == (False, False)
    assert both(x, (torch.empty(3, device="meta"),)) == (False, False)
    with Mode():
        assert both(x, ()) == (False, False)
    with torch.device("cpu"):
        assert both(x, ()) == (False, False)
    seen = []
    torch.func.vmap(lambda t: seen.append(both(t, ())) or t)(torch.randn(2, 3))
    assert seen == [(False, False)]
    torch.jit.trace(lambda t: seen.append(both(t, ())) or t, torch.randn(2), check_trace=False)
    assert seen[-1] == (False, False)
