"""normkit.func: BatchNorm as a pure function, against torch.nn.functional.batch_norm on clones.

The output is torch's own aten op (compared bitwise); the new running statistics are compared
with what F.batch_norm writes into clones of the buffers; nothing given may change. Then the
transforms that fail for modules (pytorch#85533): grad, vmap (model ensembles), jacrev, and a
whole model through normkit.func.functional_call against the same model run eagerly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit
import normkit.func as NF

SHAPES = {"2d": (6, 5), "3d": (4, 5, 7), "4d": (3, 5, 4, 6), "5d": (2, 5, 3, 2, 4)}


def _data(shape, dtype, seed=0, offset=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (offset + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    c = shape[1]
    rm = torch.rand(c, generator=gen, dtype=torch.float64).to(dtype if dtype != torch.float16 else torch.float32)
    rv = (0.5 + torch.rand(c, generator=gen, dtype=torch.float64)).to(rm.dtype)
    w = (0.5 + torch.rand(c, generator=gen, dtype=torch.float64)).to(rm.dtype)
    b = (torch.rand(c, generator=gen, dtype=torch.float64) - 0.5).to(rm.dtype)
    return x, rm, rv, w, b


@pytest.mark.parametrize("momentum", [0.1, 0.5], ids=["m0.1", "m0.5"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_batch_norm_is_torchs_and_mutates_nothing(shape_name, dtype, training, momentum):
    offset = 1e4 if shape_name == "3d" else 3.0
    x, rm, rv, w, b = _data(SHAPES[shape_name], dtype, offset=offset)
    given = [t.clone() for t in (x, rm, rv, w, b)]
    out, new_rm, new_rv = NF.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5)
    for t, g in zip((x, rm, rv, w, b), given, strict=True):
        assert torch.equal(t, g), "an argument was mutated"
    rm_t, rv_t = rm.clone(), rv.clone()
    out_t = nn.functional.batch_norm(x, rm_t, rv_t, w, b, training, momentum, 1e-5)
    assert torch.equal(out, out_t)
    assert torch.equal(new_rm, rm_t) and torch.equal(new_rv, rv_t)  # torch's own functional op: bitwise
    if not training:
        assert new_rm is rm and new_rv is rv


def test_batch_norm_without_running_stats_and_tensor_momentum():
    x, rm, rv, w, b = _data((4, 3, 5), torch.float64)
    out, m, v = NF.batch_norm(x, None, None, w, b, True)
    assert m is None and v is None
    assert torch.equal(out, nn.functional.batch_norm(x, None, None, w, b, True))
    momentum = torch.tensor(1 / 3, dtype=torch.float64)
    _, m, v = NF.batch_norm(x, rm, rv, w, b, True, momentum)
    rm_t, rv_t = rm.clone(), rv.clone()
    nn.functional.batch_norm(x, rm_t, rv_t, w, b, True, 1 / 3)
    torch.testing.assert_close(m, rm_t, rtol=1e-15, atol=0)
    torch.testing.assert_close(v, rv_t, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        NF.batch_norm(torch.randn(1, 3), rm[:3], rv[:3], training=True)
    with pytest.raises(normkit.NormInputError, match="running_mean"):
        NF.batch_norm(x, None, None, training=False)


def test_grad_matches_autograd():
    x, rm, rv, w, b = _data((4, 3, 5, 2), torch.float64)

    def loss(w, b, x):
        out, new_rm, new_rv = NF.batch_norm(x, rm, rv, w, b, True)
        return (out.sin().sum() + 0 * new_rm.sum()), (new_rm, new_rv)

    (gw, gb, gx), (new_rm, _) = torch.func.grad(loss, argnums=(0, 1, 2), has_aux=True)(w, b, x)
    wt, bt, xt = (t.clone().requires_grad_() for t in (w, b, x))
    rm_t, rv_t = rm.clone(), rv.clone()
    nn.functional.batch_norm(xt, rm_t, rv_t, wt, bt, True).sin().sum().backward()
    for ours, theirs in ((gw, wt.grad), (gb, bt.grad), (gx, xt.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_rm, rm_t, rtol=0, atol=0)


def test_vmap_over_independent_batch_norms():
    """An ensemble of 3 BatchNorms (stacked buffers and parameters) over 3 different batches."""
    data = [_data((4, 3, 5), torch.float64, seed=s) for s in range(3)]
    x, rm, rv, w, b = (torch.stack(parts) for parts in zip(*data, strict=True))
    out, new_rm, new_rv = torch.func.vmap(lambda *a: NF.batch_norm(*a, training=True))(x, rm, rv, w, b)
    for i, (xi, rmi, rvi, wi, bi) in enumerate(data):
        rmi, rvi = rmi.clone(), rvi.clone()
        yi = nn.functional.batch_norm(xi, rmi, rvi, wi, bi, True)
        torch.testing.assert_close(out[i], yi, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(new_rm[i], rmi, rtol=1e-15, atol=0)
        torch.testing.assert_close(new_rv[i], rvi, rtol=1e-15, atol=0)


def test_jacrev_matches_autograd_jacobian():
    x, rm, rv, w, b = _data((3, 2, 4), torch.float64)
    jac = torch.func.jacrev(lambda x: NF.batch_norm(x, rm, rv, w, b, True)[0])(x)
    ref = torch.autograd.functional.jacobian(lambda x: nn.functional.batch_norm(x, None, None, w, b, True), x)
    torch.testing.assert_close(jac, ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- whole models
def torch_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6),
        nn.BatchNorm1d(6, momentum=None),
    ).double()


def normkit_model():
    model = torch_model()
    model[1] = normkit.BatchNorm2d(4).double()
    model.append(normkit.GhostBatchNorm1d(6, virtual_batch_size=4).double())  # 7 = 4 + 3
    return model


def _images(seed=0, n=7):
    return 3 + torch.randn(n, 3, 7, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("make", [torch_model, normkit_model], ids=["torch_nn", "normkit"])
def test_functional_call_returns_what_the_model_would_write(make):
    model = make()
    eager = copy.deepcopy(model)
    state = {k: v.clone() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
    given = {k: v.clone() for k, v in state.items()}
    for step in range(3):
        x = _images(step)
        out, buffers = NF.functional_call(model, state, (x,))
        ref = eager(x)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        assert set(buffers) == set(dict(eager.named_buffers()))
        for name, value in eager.named_buffers():
            torch.testing.assert_close(buffers[name], value, rtol=1e-14, atol=0, msg=name)
        for k, v in given.items():
            assert torch.equal(state[k], v), f"{k} was mutated"
        state.update(buffers)
        given = {k: v.clone() for k, v in state.items()}
    for name, value in model.named_buffers():  # the model's own buffers never moved
        assert torch.equal(value, dict(make().named_buffers())[name])


def test_functional_call_under_grad_gives_eager_gradients_and_buffers():
    model = torch_model()
    eager = copy.deepcopy(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = _images()

    def loss(params, buffers, x):
        out, new = NF.functional_call(model, {**params, **buffers}, (x,))
        return out.square().mean(), new

    grads, new = torch.func.grad(loss, has_aux=True)(params, buffers, x)
    eager(x).square().mean().backward()
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12)
    for name, b in eager.named_buffers():
        torch.testing.assert_close(new[name], b, rtol=1e-14, atol=0)


def test_functional_call_vmap_over_an_ensemble_and_jacrev():
    models = [torch_model() for _ in range(3)]
    for i, m in enumerate(models):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * (i + 1))
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = _images()

    def run(p, b):
        return NF.functional_call(base, {**p, **b}, (x,))

    out, new = torch.func.vmap(run)(params, buffers)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-12, atol=1e-12)
        for name, b in m.named_buffers():
            # the batched conv/linear round differently from the unbatched ones: not bitwise
            torch.testing.assert_close(new[name][i], b, rtol=1e-12, atol=1e-15)
    # jacrev with respect to the input of a fresh model
    model = torch_model()
    state = {**{k: v.detach() for k, v in model.named_parameters()}, **dict(model.named_buffers())}
    x = _images(n=3)
    jac = torch.func.jacrev(lambda x: NF.functional_call(model, state, (x,))[0])(x)
    ref = torch.autograd.functional.jacobian(lambda x: copy.deepcopy(model)(x), x)
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-12)


def test_functional_call_refuses_an_unknown_batchnorm_in_training():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyBN(3))
    with pytest.raises(normkit.NormInputError, match="MyBN"):
        NF.functional_call(model, dict(model.named_buffers()), (torch.randn(2, 3, 4, 4),))
    model.eval()  # eval mutates nothing: fine
    NF.functional_call(model, {}, (torch.randn(2, 3, 4, 4),))


# ----------------------------------------------------------------------------- normkit layers under transforms
def test_functional_call_of_normkit_layers_under_grad_and_vmap():
    """normkit's BatchNorm forms take torch's operators under a transform; their buffer writes are returned."""
    model = normkit_model()
    eager = copy.deepcopy(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = _images()

    def loss(params, buffers, x):
        out, new = NF.functional_call(model, {**params, **buffers}, (x,))
        return out.square().mean(), new

    grads, new = torch.func.grad(loss, has_aux=True)(params, buffers, x)
    eager(x).square().mean().backward()
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12)
    for name, b in eager.named_buffers():
        torch.testing.assert_close(new[name], b, rtol=1e-12, atol=1e-15)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), f"{name} was mutated"
    # an ensemble of two normkit models under vmap
    models = [normkit_model() for _ in range(2)]
    with torch.no_grad():
        for p in models[1].parameters():
            p.add_(0.01)
    p_stack, b_stack = torch.func.stack_module_state(models)
    out, new = torch.func.vmap(lambda p, b: NF.functional_call(models[0], {**p, **b}, (x,)))(p_stack, b_stack)
    for i, m in enumerate(models):
        ref = copy.deepcopy(m)
        torch.testing.assert_close(out[i], ref(x), rtol=1e-10, atol=1e-12)
        for name, b in ref.named_buffers():
            torch.testing.assert_close(new[name][i], b, rtol=1e-12, atol=1e-15)
