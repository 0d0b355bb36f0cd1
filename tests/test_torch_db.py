"""normkit against torch.nn on PyTorch's own test inputs: ``module_db`` and ``op_db``.

For every ``torch.testing._internal`` entry of torch.nn's normalization modules (BatchNorm1d/2d/3d,
GroupNorm, InstanceNorm1d/2d/3d, LayerNorm, RMSNorm) and functions (``nn.functional.batch_norm``,
``group_norm``, ``instance_norm``, ``layer_norm``, ``rms_norm``), normkit's twin is run beside
torch's on the same inputs and state, on each CPU backend (``reference`` and ``auto`` = the CPU
kernels):

* values: forward, backward (input and parameters), running statistics;
* autograd beyond first order: gradcheck and gradgradcheck (float64), ``torch.func.jvp``,
  ``torch.func.vmap``, ``torch.func.grad`` — each must give torch's result, or fail where torch
  fails (e.g. ``vmap`` over a training BatchNorm that updates running statistics);
* channels_last input: values and output memory format;
* error inputs: torch's error type.

The rule is :func:`same_outcome`: torch's result, or torch's kind of error.
"""

from __future__ import annotations

import pytest
import torch

import normkit

common_modules = pytest.importorskip("torch.testing._internal.common_modules")
common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")

TWINS = {
    "nn.BatchNorm1d": normkit.BatchNorm1d,
    "nn.BatchNorm2d": normkit.BatchNorm2d,
    "nn.BatchNorm3d": normkit.BatchNorm3d,
    "nn.GroupNorm": normkit.GroupNorm,
    "nn.InstanceNorm1d": normkit.InstanceNorm1d,
    "nn.InstanceNorm2d": normkit.InstanceNorm2d,
    "nn.InstanceNorm3d": normkit.InstanceNorm3d,
    "nn.LayerNorm": normkit.LayerNorm,
    "nn.RMSNorm": normkit.RMSNorm,
}
MODULES = [info for info in common_modules.module_db if info.name in TWINS]
FUNCTIONS = {
    "nn.functional.batch_norm": normkit.functional.batch_norm,
    "nn.functional.group_norm": normkit.functional.group_norm,
    "nn.functional.instance_norm": normkit.functional.instance_norm,
    "nn.functional.layer_norm": normkit.functional.layer_norm,
    "nn.functional.rms_norm": normkit.functional.rms_norm,
}
OPS = [op for op in common_methods.op_db if op.name in FUNCTIONS and op.variant_test_name == ""]
BACKENDS = ["reference", "auto"]
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def same_outcome(run_torch, run_normkit, error_type=Exception, **tol):
    """``run_normkit()`` equals ``run_torch()``, or both raise (normkit an ``error_type``)."""
    try:
        expected = run_torch()
    except Exception as err:  # noqa: BLE001 - torch's refusal is the expected outcome
        with pytest.raises(type(err) if error_type is None else error_type):
            run_normkit()
        return None
    got = run_normkit()
    torch.testing.assert_close(got, expected, **tol)
    return got


# ----------------------------------------------------------------------------- module_db
def _inputs(info, dtype, training, requires_grad=True):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training)


def _pair(info, module_input, dtype, training, seed=0):
    """torch's module and normkit's twin with the same (non-trivial) state, in ``training`` mode."""
    ctor = module_input.constructor_input
    ref = info.module_cls(*ctor.args, **ctor.kwargs).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=dtype))
        for name, b in ref.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=b.dtype))
    ours = TWINS[info.name](*ctor.args, **ctor.kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    ref.train(training), ours.train(training)
    return ref, ours


def _args(module_input):
    fwd = module_input.forward_input
    return fwd.args, fwd.kwargs


def _clone_args(args):
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


def _module_ids():
    return [info.name for info in MODULES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("info", MODULES, ids=_module_ids())
def test_module_values(info, dtype, training, backend):
    """Forward, backward and buffers equal torch.nn's for every module_db input."""
    for k, module_input in enumerate(_inputs(info, dtype, training)):
        ref, ours = _pair(info, module_input, dtype, training, seed=k)
        args, kwargs = _args(module_input)
        a_ref, a_ours = _clone_args(args), _clone_args(args)
        y_ref = ref(*a_ref, **kwargs)
        with normkit.backend(backend):
            y_ours = ours(*a_ours, **kwargs)
        torch.testing.assert_close(y_ours, y_ref, **TOL[dtype])
        for name, b in ref.named_buffers():
            torch.testing.assert_close(dict(ours.named_buffers())[name], b, **TOL[dtype], msg=name)
        if not y_ref.requires_grad:
            continue
        dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(k), dtype=dtype)
        wrt_ref = [t for t in (*a_ref, *ref.parameters()) if isinstance(t, torch.Tensor) and t.requires_grad]
        wrt_ours = [t for t in (*a_ours, *ours.parameters()) if isinstance(t, torch.Tensor) and t.requires_grad]
        g_ref = torch.autograd.grad(y_ref, wrt_ref, dy)
        with normkit.backend(backend):
            g_ours = torch.autograd.grad(y_ours, wrt_ours, dy)
        torch.testing.assert_close(g_ours, g_ref, **TOL[dtype])


def _functional(module):
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())

    def f(x, *ps):
        return torch.func.functional_call(module, ({**dict(zip(params, ps, strict=True)), **buffers}), (x,))

    return f, tuple(params.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info", MODULES, ids=_module_ids())
def test_module_autograd_and_transforms(info, training, backend):
    """gradcheck, gradgradcheck, jvp, vmap and torch.func.grad give torch.nn's results (float64)."""
    dtype = torch.float64
    for k, module_input in enumerate(_inputs(info, dtype, training)):
        args, kwargs = _args(module_input)
        if kwargs or len(args) != 1 or args[0].numel() == 0:
            continue
        x = args[0].detach()
        ref, ours = _pair(info, module_input, dtype, training, seed=k)
        with normkit.backend(backend):
            f, params = _functional(ours)
            inputs = (x.clone().requires_grad_(), *[p.detach().clone().requires_grad_() for p in params])
            assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
            assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)
        tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=dtype)
        batch = torch.stack([x, 2 * x + 1])

        def jvp(module, x=x, tangent=tangent):
            return torch.func.jvp(lambda t: module(t), (x,), (tangent,))[1]

        def vmap(module, batch=batch):
            return torch.func.vmap(module)(batch)

        def grad(module, x=x):
            return torch.func.grad(lambda t: (module(t) ** 2).sum())(x)

        for transform in (jvp, vmap, grad):
            r, o = _pair(info, module_input, dtype, training, seed=k)
            with normkit.backend(backend):
                same_outcome(lambda t=transform, r=r: t(r), lambda t=transform, o=o: t(o), **TOL[dtype])
            for name, b in r.named_buffers():  # what a transform did to the buffers, torch did too
                torch.testing.assert_close(dict(o.named_buffers())[name], b, **TOL[dtype], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", [i for i in MODULES if i.name[-2:] in ("2d", "3d") or i.name == "nn.GroupNorm"],
                         ids=lambda i: i.name)
def test_module_channels_last(info, backend):
    """channels_last input: torch.nn's values and torch.nn's output memory format."""
    dtype = torch.float32
    for k, module_input in enumerate(_inputs(info, dtype, True)):
        args, kwargs = _args(module_input)
        x = args[0] if args else None
        if kwargs or len(args) != 1 or x.dim() not in (4, 5):
            continue
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.detach().contiguous(memory_format=fmt)
        ref, ours = _pair(info, module_input, dtype, True, seed=k)
        y_ref = ref(x)
        with normkit.backend(backend):
            y_ours = ours(x)
        torch.testing.assert_close(y_ours, y_ref, **TOL[dtype])
        assert y_ours.is_contiguous(memory_format=fmt) == y_ref.is_contiguous(memory_format=fmt)
        assert y_ours.is_contiguous() == y_ref.is_contiguous()


@pytest.mark.parametrize("info", [i for i in MODULES if i.module_error_inputs_func is not None],
                         ids=lambda i: i.name)
def test_module_error_inputs(info):
    """Each module_db error input raises torch's error type, at the same step (construction/forward)."""
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                           training=True)
    assert errors
    for err in errors:
        ctor = err.module_error_input.constructor_input
        fwd = err.module_error_input.forward_input
        if err.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(err.error_type):
                TWINS[info.name](*ctor.args, **ctor.kwargs)
            continue
        module = TWINS[info.name](*ctor.args, **ctor.kwargs)
        with pytest.raises(err.error_type):
            module(*fwd.args, **fwd.kwargs)


# ----------------------------------------------------------------------------- op_db
def _sample_call(fn, sample, dtype=None):
    """``fn(sample)`` on fresh copies of every tensor (running statistics are updated in place),
    floating ones converted to ``dtype`` if given."""
    def clone(a):
        if not isinstance(a, torch.Tensor):
            return a
        b = a.detach().clone()
        if dtype is not None and b.is_floating_point():
            b = b.to(dtype)
        return b.requires_grad_(a.requires_grad)

    inp = clone(sample.input)
    args = [clone(a) for a in sample.args]
    kwargs = {k: clone(v) for k, v in sample.kwargs.items()}
    return fn(inp, *args, **kwargs), inp, args, kwargs


def _tensors(inp, args, kwargs):
    return [t for t in (inp, *args, *kwargs.values()) if isinstance(t, torch.Tensor)]


def assert_close_or_closer_to_truth(ours, theirs, truth, **tol):
    """``ours`` equals torch's result within ``tol``, or is nearer the float64 truth than torch's is.

    (torch's float32 LayerNorm backward on a one-element row returns 1.2e-4 where the exact
    gradient is 0, and normkit's is 0.)
    """
    for o, t, r in zip(ours, theirs, truth, strict=True):
        if o is None or t is None:
            assert o is None and t is None
            continue
        try:
            torch.testing.assert_close(o, t, **tol, equal_nan=True)
        except AssertionError:
            ok = torch.isfinite(r)
            assert ((o.double() - r).abs() <= (t.double() - r).abs() + tol["atol"])[ok].all()


def _grads(fn, sample, dtype, k):
    """(output, updated tensors, input/parameter gradients) of ``fn`` on ``sample`` in ``dtype``."""
    y, *state = _sample_call(fn, sample, dtype)
    tensors = _tensors(*state)
    wrt = [t for t in tensors if t.requires_grad]
    grads = ()
    if wrt and y.requires_grad:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad(y, wrt, dy, allow_unused=True)
    return y, tensors, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_function_values(op, dtype, backend):
    """Outputs, running statistics and gradients equal torch.nn.functional's for every op_db sample
    (or are nearer the float64 truth than torch's)."""
    ours_fn = FUNCTIONS[op.name]
    for k, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True)):
        theirs = _grads(op.op, sample, dtype, k)
        truth = _grads(op.op, sample, torch.float64, k)
        with normkit.backend(backend):
            ours = _grads(ours_fn, sample, dtype, k)
        for o, t, r in zip(ours, theirs, truth, strict=True):
            o, t, r = (list(v) if isinstance(v, (list, tuple)) else [v] for v in (o, t, r))
            assert_close_or_closer_to_truth(o, t, r, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_function_autograd_and_transforms(op, backend):
    """gradcheck, gradgradcheck and forward-mode AD (jvp) in float64 for every op_db sample."""
    ours_fn = FUNCTIONS[op.name]
    for sample in op.sample_inputs("cpu", torch.float64, requires_grad=True):
        if sample.input.numel() == 0:
            continue
        differentiable = [(name, v) for name, v in (("input", sample.input), *enumerate(sample.args),
                                                      *sample.kwargs.items())
                          if isinstance(v, torch.Tensor) and v.requires_grad]
        names = [name for name, _ in differentiable]

        def call(fn, *values, sample=sample, names=names):
            given = dict(zip(names, values, strict=True))
            inp = given.get("input", sample.input)
            args = [given.get(i, a) for i, a in enumerate(sample.args)]
            kwargs = {key: given.get(key, v) for key, v in sample.kwargs.items()}
            # running statistics are mutated: give every call its own copies
            args = [a.clone() if isinstance(a, torch.Tensor) and not a.requires_grad else a for a in args]
            kwargs = {key: v.clone() if isinstance(v, torch.Tensor) and not v.requires_grad else v
                      for key, v in kwargs.items()}
            return fn(inp, *args, **kwargs)

        values = tuple(v.detach().clone().requires_grad_() for _, v in differentiable)
        ref_ok = torch.isfinite(call(op.op, *values)).all()
        with normkit.backend(backend):
            if ref_ok:
                assert torch.autograd.gradcheck(lambda *v: call(ours_fn, *v), values, fast_mode=True)
                assert torch.autograd.gradgradcheck(lambda *v: call(ours_fn, *v), values, fast_mode=True)
            tangents = tuple(torch.randn_like(v) for v in values)

            def jvp(fn, call=call, values=values, tangents=tangents):
                return torch.func.jvp(lambda *vals: call(fn, *vals), values, tangents)[1]

            same_outcome(lambda jvp=jvp: jvp(op.op), lambda jvp=jvp: jvp(ours_fn), **TOL[torch.float64],
                         equal_nan=True)


@pytest.mark.parametrize("op", [op for op in OPS if op.error_inputs_func is not None], ids=lambda op: op.name)
def test_function_error_inputs(op):
    errors = list(op.error_inputs("cpu"))
    assert errors
    for err in errors:
        s = err.sample_input
        with pytest.raises(err.error_type):
            FUNCTIONS[op.name](s.input, *s.args, **s.kwargs)


def test_every_norm_of_the_dbs_is_covered():
    assert {info.name for info in MODULES} == set(TWINS)
    assert {op.name for op in OPS} == set(FUNCTIONS)
