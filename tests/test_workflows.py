"""What users do with a converted model, beyond plain training: each workflow gives torch.nn's numbers.

Gradient penalties (double backward), per-sample gradients (``vmap(grad(functional_call))``),
Hessians, forward-mode AD, ``torch.jit.script`` / ``trace``, ``torch.onnx.export`` → onnxruntime,
``torch.export`` save/load in training mode, ``torch.compile(fullgraph=True)`` of BatchRenorm, and
the checks every op makes whoever calls it. Each runs on every CPU backend.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
from torch import nn

import normkit

BACKENDS = ["reference", "auto"]
TOL = dict(rtol=1e-4, atol=1e-5)


def critic(norms: str) -> nn.Sequential:
    """A small WGAN critic: conv → norm → activation, twice, then a linear score."""
    def norm(c):
        return {"ln": nn.GroupNorm(1, c), "in": nn.InstanceNorm2d(c, affine=True), "gn": nn.GroupNorm(2, c),
                "bn": nn.BatchNorm2d(c)}[norms]

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.LeakyReLU(0.2),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), norm(8), nn.LeakyReLU(0.2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 1))


def twins(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(torch.nn model, the same model converted to normkit), with equal state."""
    torch_model = model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = normkit.convert(_deepcopy(model), to="normkit")
    return torch_model, ours


def _deepcopy(model):
    import copy

    return copy.deepcopy(model)


def gradient_penalty(model, real, fake):
    """WGAN-GP (Gulrajani et al., 2017): E[(‖∇_x̃ D(x̃)‖₂ − 1)²] at x̃ between real and fake samples."""
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=torch.Generator().manual_seed(3))
    mixed = (eps * real + (1 - eps) * fake).requires_grad_()
    score = model(mixed)
    (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norms", ["ln", "in", "gn"])
def test_wgan_gp_gradient_penalty(norms, backend):
    torch.manual_seed(0)
    theirs, ours = twins(critic(norms))
    real, fake = 2 + torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    gp_theirs = gradient_penalty(theirs, real, fake)
    g_theirs = torch.autograd.grad(gp_theirs, list(theirs.parameters()), allow_unused=True, materialize_grads=True)
    with normkit.backend(backend):
        gp_ours = gradient_penalty(ours, real, fake)
        g_ours = torch.autograd.grad(gp_ours, list(ours.parameters()), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(gp_ours, gp_theirs, **TOL)
    torch.testing.assert_close(g_ours, g_theirs, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_vmap_grad_functional_call(backend):
    """Opacus-style per-sample gradients of a model with GroupNorm, LayerNorm and an eval BatchNorm."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.LayerNorm(4 * 6 * 6), nn.Linear(4 * 6 * 6, 3)).eval()
    theirs, ours = twins(model)
    x, target = torch.randn(5, 3, 6, 6), torch.randint(0, 3, (5,))

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = dict(m.named_buffers())

        def loss(p, xi, ti):
            out = torch.func.functional_call(m, (p, buffers), (xi[None],))
            return nn.functional.cross_entropy(out, ti[None])

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)

    expected = per_sample(theirs)
    with normkit.backend(backend):
        got = per_sample(ours)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", ["LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d"])
def test_hessian_and_forward_ad(layer, backend):
    torch.manual_seed(2)
    ctor = {"LayerNorm": lambda: nn.LayerNorm(5), "RMSNorm": lambda: nn.RMSNorm(5),
            "GroupNorm": lambda: nn.GroupNorm(1, 3), "BatchNorm1d": lambda: nn.BatchNorm1d(3)}[layer]
    theirs, ours = twins(ctor().double())
    x = 1 + torch.randn(4, 3, 5, dtype=torch.float64)
    if layer == "BatchNorm1d":
        theirs.eval(), ours.eval()

    def score(m):
        return lambda t: (m(t) ** 3).sum()

    h_theirs = torch.func.hessian(score(theirs))(x)
    tangent = torch.randn_like(x)
    import torch.autograd.forward_ad as fwad

    with normkit.backend(backend):
        h_ours = torch.func.hessian(score(ours))(x)
        with fwad.dual_level():
            tan_ours = fwad.unpack_dual(ours(fwad.make_dual(x, tangent))).tangent
    with fwad.dual_level():
        tan_theirs = fwad.unpack_dual(theirs(fwad.make_dual(x, tangent))).tangent
    torch.testing.assert_close(h_ours, h_theirs)
    assert tan_ours is not None and tan_ours.abs().max() > 0
    torch.testing.assert_close(tan_ours, tan_theirs)


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), normkit.BatchNorm2d(8), nn.ReLU(),
                         normkit.GroupNormAct(2, 8, act="silu"), normkit.BatchNormAct2d(8),
                         normkit.InstanceNorm2d(8, affine=True), normkit.FrozenBatchNorm2d(8),
                         normkit.LayerNorm(6))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_jit_script(mode):
    torch.manual_seed(4)
    model = getattr(_net(), mode)()
    scripted = torch.jit.script(model)
    assert list(scripted.state_dict()) == list(model.state_dict())
    x = 1 + torch.randn(4, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y_script = scripted(x)
    after_script = {k: v.clone() for k, v in model.state_dict().items()}  # shared tensors: the same state moved
    model.load_state_dict(before)
    y_eager = model(x)
    torch.testing.assert_close(y_script, y_eager, **TOL)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(after_script[key], value, **TOL, msg=key)


@pytest.mark.parametrize("layer", [lambda: normkit.BatchRenorm2d(3), lambda: normkit.GhostBatchNorm2d(3),
                                   lambda: normkit.SyncBatchNorm(3)], ids=["renorm", "ghost", "sync"])
def test_jit_script_refuses_what_it_cannot_compile(layer):
    with pytest.raises(NotImplementedError, match="TorchScript"):
        torch.jit.script(nn.Sequential(layer()))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_onnx_export_runs_in_onnxruntime(tmp_path, dynamo):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(5)
    model = _net().eval()
    x = 1 + torch.randn(2, 3, 6, 6)
    path = tmp_path / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    want = model(x)
    # eight norms in a row amplify float32 rounding: tolerance relative to the output's scale
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_traced_model_with_wrong_channel_count_raises():
    model = _net().eval()
    traced = torch.jit.trace(model, (torch.randn(2, 3, 6, 6),))
    with pytest.raises(RuntimeError):
        traced(torch.randn(2, 4, 6, 6))


def test_torch_export_training_program_saves_and_loads():
    torch.manual_seed(6)
    model = _net().train()
    x = 1 + torch.randn(4, 3, 6, 6)
    program = torch.export.export(model, (x,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    torch.testing.assert_close(loaded.module()(x), model(x), **TOL)


def test_batch_renorm_compiles_fullgraph():
    torch.manual_seed(7)
    layer, twin = normkit.BatchRenorm2d(3, warmup_steps=2), normkit.BatchRenorm2d(3, warmup_steps=2)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x = 2 + torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(compiled(x), twin(x), **TOL)
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("call", [
    lambda: torch.ops.normkit.batch_norm_infer(torch.randn(2, 4, 3), torch.zeros(3), torch.ones(3), None, None,
                                               None, 1e-5, ""),
    lambda: torch.ops.normkit.batch_norm_train(torch.randn(2, 4, 3), torch.ones(2), None, None, 1e-5, ""),
    lambda: torch.ops.normkit.group_norm(torch.randn(2, 4, 3), 2, torch.ones(5), None, None, 1e-5, ""),
    lambda: torch.ops.normkit.group_norm(torch.randn(2, 4, 3), 3, None, None, None, 1e-5, ""),
    lambda: torch.ops.normkit.layer_norm(torch.randn(2, 4), [4], torch.ones(3), None, 1e-5),
    lambda: torch.ops.normkit.layer_norm(torch.randn(2, 4), [5], None, None, 1e-5),
    lambda: torch.ops.normkit.rms_norm(torch.randn(2, 4), [4], torch.ones(40), 1e-5),
    lambda: torch.ops.normkit.batch_norm_backward(torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.zeros(2),
                                                  torch.ones(4), None, None, None, "", True, False),
    lambda: torch.ops.normkit.batch_norm_backward(torch.randn(2, 4, 2), torch.randn(2, 4, 3), torch.zeros(4),
                                                  torch.ones(4), None, None, None, "", True, False),
    lambda: torch.ops.normkit.group_norm_backward(torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.zeros(2),
                                                  torch.ones(4), 2, None, None, None, "", False, False),
    lambda: torch.ops.normkit.row_norm_backward(torch.randn(2, 4), torch.randn(2, 4), torch.zeros(2),
                                                torch.ones(3), [4], None, False),
], ids=["infer-mean", "train-weight", "gn-weight", "gn-groups", "ln-weight", "ln-shape", "rms-weight", "bwd-mean",
        "bwd-dy", "gn-bwd-mean", "row-bwd-rstd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_op_calls_check_what_they_read(call, backend):
    with normkit.backend(backend), pytest.raises(normkit.NormInputError, match="torch.ops.normkit"):
        call()


# ----------------------------------------------------------------------------- parity with torch.nn
def test_lazy_batchnorm_is_torch_lazy_and_loads_a_checkpoint():
    lazy = normkit.LazyBatchNorm2d()
    assert isinstance(lazy, nn.LazyBatchNorm2d) and isinstance(lazy, normkit.BatchNorm2d)
    source = nn.BatchNorm2d(3)
    source(torch.randn(4, 3, 2, 2))
    lazy.load_state_dict(source.state_dict())
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(lazy.eval()(x), source.eval()(x))
    assert type(lazy) is normkit.BatchNorm2d and lazy.num_features == 3


@pytest.mark.parametrize("eps, training", [(0.0, True), (-1.0, True), (-1.0, False)])
def test_batch_norm_eps_rule(eps, training):
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="eps"):
        torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, eps=eps)
    with pytest.raises(ValueError, match="eps"):
        normkit.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, eps=eps)


def test_empty_1d_batch_norm_and_complex_rms_norm_as_torch():
    x = torch.randn(0)
    torch.testing.assert_close(normkit.functional.batch_norm(x, None, None, training=True),
                               torch.nn.functional.batch_norm(x, None, None, training=True))
    z = torch.randn(3, 4, dtype=torch.complex64)
    torch.testing.assert_close(normkit.functional.rms_norm(z, (4,)), torch.nn.functional.rms_norm(z, (4,)))


@pytest.mark.parametrize("fn", ["batch_norm", "layer_norm", "group_norm", "instance_norm"])
def test_mixed_dtypes_refused_where_torch_refuses(fn):
    x = torch.randn(4, 4, 3, dtype=torch.float64)
    w = torch.ones(4 if fn != "layer_norm" else 3)
    args = {"batch_norm": ((None, None, w, w), dict(training=True)), "layer_norm": (((3,), w, w), {}),
            "group_norm": ((2, w, w), {}), "instance_norm": ((None, None, w, w), {})}[fn]
    with pytest.raises(RuntimeError):
        getattr(torch.nn.functional, fn)(x, *args[0], **args[1])
    with pytest.raises(RuntimeError, match="dtype"):
        getattr(normkit.functional, fn)(x, *args[0], **args[1])
    half = x.half()  # float16 input with float32 parameters: accepted by both
    torch.testing.assert_close(getattr(normkit.functional, fn)(half, *args[0], **args[1]).float(),
                               getattr(torch.nn.functional, fn)(half, *args[0], **args[1]).float(),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fn", ["batch_norm", "layer_norm", "group_norm", "rms_norm"])
def test_integer_input_raises_not_implemented(fn):
    x = torch.ones(4, 3, 2, dtype=torch.int64)
    args = {"batch_norm": (None, None), "layer_norm": ((2,),), "group_norm": (3,), "rms_norm": ((2,),)}[fn]
    with pytest.raises(NotImplementedError):
        getattr(torch.nn.functional, fn)(x, *args, **({"training": True} if fn == "batch_norm" else {}))
    with pytest.raises(NotImplementedError):
        getattr(normkit.functional, fn)(x, *args, **({"training": True} if fn == "batch_norm" else {}))


@pytest.mark.parametrize("cls, args", [("InstanceNorm2d", (3,)), ("RMSNorm", (5,)), ("LayerNorm", (5,)),
                                       ("GroupNorm", (3, 3)), ("BatchNorm2d", (3,))])
def test_output_memory_format_as_torch(cls, args):
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    ours, theirs = getattr(normkit, cls)(*args)(x), getattr(nn, cls)(*args)(x)
    assert ours.is_contiguous() == theirs.is_contiguous()
    assert ours.is_contiguous(memory_format=torch.channels_last) == \
        theirs.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_batch_norm_nan_input_leaves_other_gradients_finite(backend):
    x = torch.randn(4, 3, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    grads = []
    for layer in (nn.BatchNorm2d(3).eval(), normkit.BatchNorm2d(3).eval()):
        xi = x.clone().requires_grad_()
        with normkit.backend(backend):
            layer(xi).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert torch.isfinite(grads[1]).all()


def test_running_statistics_as_parameters_are_refused():
    layer = normkit.BatchNorm2d(3)
    layer.running_mean = nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="running_mean"):
        layer(torch.randn(4, 3, 2, 2))


def test_sync_batchnorm_takes_torch_bias_keyword():
    ours, theirs = normkit.SyncBatchNorm(3, bias=False), nn.SyncBatchNorm(3, bias=False)
    assert ours.bias is None and ours.weight is not None
    assert list(ours.state_dict()) == list(theirs.state_dict())
