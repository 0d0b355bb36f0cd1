"""PyTorch's own test *procedures* for modules and ops, applied to normkit's twins.

``tests/test_torch_db.py`` runs the *inputs* of ``module_db`` / ``op_db`` through checks of its own.
This file re-implements the procedures PyTorch itself runs over those inputs (pytorch's
``test/test_modules.py``, ``test/test_ops.py``, ``test/test_ops_gradients.py``,
``test/test_ops_fwd_gradients.py`` through ``common_utils.TestGradients._check_helper``, and
``test/test_meta.py``; none ships in the torch wheel) and runs each one twice on the same
seeded input: on torch.nn's class or function and on normkit's twin. The rule is
:func:`same_as_torch`: normkit's outcome is torch's — torch's result, or an error of torch's type.

=====================================================  ==========================================
pytorch procedure                                      here
=====================================================  ==========================================
TestModule.test_forward (+ ``.float()``/``.double()``)  test_forward
TestModule.test_factory_kwargs                         test_factory_kwargs
TestModule.test_repr                                   test_repr
TestModule.test_pickle (+ deepcopy, state_dict)        test_pickle_and_state_dict
TestModule.test_non_contiguous_tensors                 test_non_contiguous_tensors
TestModule.test_grad / test_gradgrad                   test_grad, test_gradgrad
TestModule.test_memory_format                          test_memory_format
TestModule.test_if_train_and_eval_modes_differ         test_if_train_and_eval_modes_differ
TestModule.test_device_ctx_init                        test_device_ctx_init
TestModule.test_to / test_to_empty                     test_to, test_to_empty (+ reset_parameters)
TestModule.test_errors                                 test_errors
TestCommon.test_noncontiguous_samples                  test_op_noncontiguous_samples
TestCommon.test_out (ops without ``out=``)             test_op_out
TestCommon.test_dtypes                                 test_op_dtypes
TestBwdGradients.test_fn_grad / test_fn_gradgrad       test_op_fn_grad, test_op_fn_gradgrad
TestFwdGradients.test_fn_fwgrad_bwgrad                 test_op_fn_fwgrad_bwgrad
TestFwdGradients.test_forward_mode_AD                  test_op_forward_mode_ad
TestMeta.test_meta_outplace / TestFakeTensor           test_op_meta_and_fake
=====================================================  ==========================================

Beyond pytorch's procedures (issue 21): parameters *and* buffers that are non-contiguous views,
read and written through the view as torch.nn does (``test_non_contiguous_state``); a forward and
backward of a module on the meta device (``test_meta_forward``); ``to_empty`` followed by
``reset_parameters()`` giving torch's state; ``inspect.signature`` of every class, ``forward`` and
function (``test_signature``, ``test_forward_signature``, ``test_function_signature``);
SyncBatchNorm's keywords; an InstanceNorm backward after its statistics moved
(``test_instance_norm_backward_after_statistics_update``); ``SyncBatchNorm`` (module_db has no entry
for it: it runs BatchNorm1d/2d/3d's inputs, where torch.nn.SyncBatchNorm without a process group
computes BatchNorm) and the lazy BatchNorms (BatchNorm's inputs without ``num_features``).

Each procedure runs on normkit's ``reference`` and ``auto`` (C++ kernels) backends where it computes;
module records are (entry, module input, train/eval as pytorch's ``@modules`` chooses), op records
(op, sample).

Not here: ``test_cpu_gpu_parity`` and ``test_multiple_device_transfer`` (CUDA only);
``test_check_inplace`` (no norm takes ``inplace``: test_signature pins the constructor arguments);
``test_variant_consistency_eager`` (the norm functions have no method or in-place variant, and
their aliases are torch's own functions); ``test_python_ref*`` and ``test_compare_cpu``.

Deliberate differences (README), asserted as such: a refused batch raises ``normkit.NormInputError``
(a ``ValueError`` and a ``RuntimeError``) and changes no buffer where torch.nn has already counted
``num_batches_tracked`` (test_errors). Error *messages* are normkit's own, so ``error_regex`` is not
matched, only the error type.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import io
import math
import zlib

import pytest
import torch
from test_torch_db import FUNCTIONS, MODULES, OPS, TOL, TWINS
from torch import nn

import normkit

common_modules = pytest.importorskip("torch.testing._internal.common_modules")
common_utils = pytest.importorskip("torch.testing._internal.common_utils")
FunctionInput = common_modules.FunctionInput
ModuleErrorEnum = common_modules.ModuleErrorEnum
noncontiguous_like = common_utils.noncontiguous_like

BACKENDS = ["reference", "auto"]
F32, F64 = torch.float32, torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The procedures run on one intra-op thread: their tensors hold tens of values, and on a busy
    2-core machine each of torch's OpenMP regions costs more than the work (a 4×5×5 layer_norm:
    19 ms with two threads, 6 µs with one). normkit's kernels give the same bits for any count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the rule
_TORCH_OUTCOMES: dict = {}


def same_as_torch(run_torch, run_normkit, *, key=None, compare=None, torch_may_fail=False, **tol):
    """normkit's outcome is torch's: ``run_normkit()`` equals ``run_torch()`` (``compare``, else
    ``assert_close`` with ``tol``), or both raise and normkit's error is an instance of torch's type.

    A procedure that passes in pytorch's own suite must pass for torch here too (else the harness,
    not normkit, is wrong), unless ``torch_may_fail``. ``key`` caches torch's outcome (for the
    gradient checks, which run once per normkit backend)."""
    if key is not None and key in _TORCH_OUTCOMES:
        ok, expected = _TORCH_OUTCOMES[key]
    else:
        try:
            ok, expected = True, run_torch()
        except Exception as err:  # noqa: BLE001 - torch's refusal is the expected outcome
            ok, expected = False, err
        if key is not None:
            _TORCH_OUTCOMES[key] = ok, expected
    if not ok:
        if not torch_may_fail:
            raise AssertionError("the procedure failed for torch.nn itself") from expected
        with pytest.raises(type(expected)):
            run_normkit()
        return None
    got = run_normkit()
    if compare is not None:
        compare(got, expected)
    else:
        torch.testing.assert_close(got, expected, equal_nan=True, **tol)
    return got


def _seeded(seed, fn, *args):
    """``fn(*args)`` with torch's global generator seeded (and restored afterwards), so torch's run
    and normkit's see the same module inputs, samples and random gradients."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _backend(backend, fn):
    def run(*args):
        with normkit.backend(backend):
            return fn(*args)
    return run


def _meta(t):
    """What the meta device and FakeTensorMode know of a tensor, as pytorch's test_meta compares it:
    shape, dtype, requires_grad and the significant strides (of dims longer than one, in a tensor
    with elements: ``torch._prims_common.check_significant_strides``)."""
    if not isinstance(t, torch.Tensor):
        return t
    strides = None
    if t.layout == torch.strided and t.numel() > 0:
        strides = tuple(st if n > 1 else None for n, st in zip(t.shape, t.stride(), strict=True))
    return tuple(t.shape), strides, t.dtype, t.requires_grad


def _equal(got, expected):
    assert got == expected


# ----------------------------------------------------------------------------- module entries
@dataclasses.dataclass(frozen=True)
class Entry:
    """A module under test: torch.nn's class, normkit's twin, and the ModuleInfo whose inputs feed them."""

    name: str
    theirs: type
    ours: type
    info: common_modules.ModuleInfo
    lazy: bool = False  # constructed without num_features (the info's first constructor argument)

    @property
    def modes(self) -> list[bool]:
        # @modules(module_db): both modes where the entry says train and eval differ, else training only
        return [True, False] if self.info.train_and_eval_differ else [True]

    def inputs(self, dtype=F32, training=True, requires_grad=False, device="cpu"):
        inputs = self.info.module_inputs_func(self.info, device=device, dtype=dtype, requires_grad=requires_grad,
                                              training=training)
        if self.lazy:
            for mi in inputs:
                ctor = mi.constructor_input
                mi.constructor_input = FunctionInput(*ctor.args[1:], **ctor.kwargs)
        return inputs

    def input(self, k, dtype=F32, training=True, requires_grad=False, device="cpu"):
        """Module input ``k``: on CPU, fresh copies of the same seeded tensors on every call."""
        if device != "cpu":
            return self.inputs(dtype, training, requires_grad, device)[k]
        mi = copy.copy(_cpu_inputs(self, dtype, training, requires_grad)[k])
        fwd = mi.forward_input
        mi.forward_input = FunctionInput(*_clone(fwd.args), **_clone(fwd.kwargs))
        return mi


@functools.cache
def _cpu_inputs(entry, dtype, training, requires_grad):
    return _seeded(_seed(entry.info.name), entry.inputs, dtype, training, requires_grad)


def _clone(obj):
    return _traverse(obj, lambda t: t.detach().clone().requires_grad_(t.requires_grad))


_BN = {info.name: info for info in MODULES if info.name.startswith("nn.BatchNorm")}
ENTRIES = [Entry(info.name, info.module_cls, TWINS[info.name], info) for info in MODULES]
SYNC = [Entry(f"nn.SyncBatchNorm[{d}]", nn.SyncBatchNorm, normkit.SyncBatchNorm, _BN[f"nn.BatchNorm{d}"])
        for d in ("1d", "2d", "3d")]
LAZY = [Entry(f"nn.LazyBatchNorm{d}", getattr(nn, f"LazyBatchNorm{d}"), getattr(normkit, f"LazyBatchNorm{d}"),
              _BN[f"nn.BatchNorm{d}"], lazy=True) for d in ("1d", "2d", "3d")]
COMPUTED = ENTRIES + SYNC  # every procedure
ALL = COMPUTED + LAZY  # the procedures torch runs on lazy modules too (construction, forward, state)


def _records(entries, modes=True):
    """One record per (entry, module input, mode): pytest params ``entry, k, training``."""
    params = []
    for entry in entries:
        for k, mi in enumerate(entry.inputs()):
            for training in entry.modes if modes else [True]:
                tag = f"{k}" + (f"-{mi.desc}" if mi.desc else "")
                mode = "train" if training else "eval"
                params.append(pytest.param(entry, k, training, id=f"{entry.name}-{tag}-{mode}"))
    return params


def _build(cls, module_input, dtype=None, training=True, device=None):
    ctor = module_input.constructor_input
    m = cls(*ctor.args, **ctor.kwargs)
    if device is not None:
        m.to(device)
    if dtype is not None:
        m.to(dtype)
    m.train(training)
    return m


def _fwd(module_input):
    return module_input.forward_input.args, module_input.forward_input.kwargs


def _state(m):
    """Every parameter and buffer (uninitialized lazy ones as None), detached copies."""
    return {name: None if nn.parameter.is_lazy(t) else t.detach().clone()
            for name, t in (*m.named_parameters(), *m.named_buffers())}


def _randomize(m, seed):
    """Non-trivial parameters and running statistics (the defaults 1/0 hide mixed-up tensors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=torch.float64))
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=torch.float64))


def _module_procedure(proc, entry, k, *args, backend="auto", **options):
    """Run ``proc(cls, *args)`` for torch.nn's class and normkit's twin (normkit under ``backend``),
    seeded alike, and require torch's outcome."""
    seed = _seed(entry.info.name, k)
    return same_as_torch(lambda: _seeded(seed, proc, entry.theirs, *args),
                         lambda: _seeded(seed, _backend(backend, proc), entry.ours, *args),
                         **options)


# ----------------------------------------------------------------------------- signatures
def _params(sig):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("entry", ENTRIES + SYNC[:1] + LAZY, ids=lambda e: e.theirs.__name__)
def test_signature(entry):
    """``inspect.signature(cls)``: torch's parameter names, kinds and defaults (what Lightning's
    ``save_hyperparameters`` and config systems read), then only keyword-only options with defaults
    (LayerNorm's and RMSNorm's ``casting`` and ``offset``)."""
    theirs = _params(inspect.signature(entry.theirs))
    ours = _params(inspect.signature(entry.ours))
    assert ours[:len(theirs)] == theirs
    extra = [p for p in inspect.signature(entry.ours).parameters.values()][len(theirs):]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in extra)


@pytest.mark.parametrize("entry", ENTRIES + SYNC[:1] + LAZY, ids=lambda e: e.theirs.__name__)
def test_forward_signature(entry):
    """``forward``'s parameters start with torch's (test_check_inplace reads the first one); normkit's
    extra arguments (``mask``, ``residual``) are optional."""
    theirs = _params(inspect.signature(entry.theirs.forward))
    ours = _params(inspect.signature(entry.ours.forward))
    assert ours[:len(theirs)] == theirs
    assert all(default is not inspect.Parameter.empty for _, _, default in ours[len(theirs):])


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_function_signature(op):
    theirs = _params(inspect.signature(op.op))
    ours = _params(inspect.signature(FUNCTIONS[op.name]))
    assert ours[:len(theirs)] == theirs
    assert all(default is not inspect.Parameter.empty for _, _, default in ours[len(theirs):])


def test_sync_batchnorm_keywords():
    """torch.nn.SyncBatchNorm's keywords, ``bias=False`` (keyword-only) included, give torch's state."""
    kwargs = dict(eps=1e-3, momentum=0.2, affine=True, track_running_stats=True, process_group=None,
                  device="cpu", dtype=torch.float64, bias=False)
    theirs, ours = nn.SyncBatchNorm(4, **kwargs), normkit.SyncBatchNorm(4, **kwargs)
    assert ours.bias is None and theirs.bias is None
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
    with pytest.raises(TypeError):
        normkit.SyncBatchNorm(4, 1e-5, 0.1, True, True, None, None, None, False)  # bias is keyword-only


# ----------------------------------------------------------------------------- TestModule
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("entry, k, training", _records(ALL))
def test_forward(entry, k, training, dtype, backend):
    """test_forward: construct, ``.to(dtype)``, forward; then ``.float()``/``.double()`` and forward
    again: outputs, state and class (a lazy module becomes its ``cls_to_become``) are torch's."""

    def proc(cls):
        mi = entry.input(k, dtype, training)
        m = _build(cls, mi, dtype, training)
        args, kwargs = _fwd(mi)
        out = m(*args, **kwargs)
        assert not entry.lazy or type(m) is cls.cls_to_become
        state = _state(m)
        getattr(m, {F32: "float", F64: "double"}[dtype])()
        out2 = m(*args, **kwargs)
        for name, t in (*m.named_parameters(), *m.named_buffers()):
            assert t.device.type == "cpu", name
            assert not t.dtype.is_floating_point or t.dtype == dtype, name
        return out, state, out2, _state(m)

    _module_procedure(proc, entry, k, backend=backend, **TOL[dtype])


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_factory_kwargs(entry, dtype, device):
    """test_factory_kwargs: ``device=`` and ``dtype=`` reach every parameter and buffer (uninitialized
    ones of lazy modules too) exactly as torch's."""

    def proc(cls):
        created = []
        for mi in entry.inputs(dtype):
            ctor = mi.constructor_input
            m = cls(*ctor.args, **ctor.kwargs, device=device, dtype=dtype)
            for name, t in (*m.named_parameters(), *m.named_buffers()):
                assert t.device.type == device, name
                assert not t.dtype.is_floating_point or t.dtype == dtype, name
                created.append((name, type(t).__name__, t.dtype, t.device.type, t.requires_grad,
                                None if nn.parameter.is_lazy(t) else tuple(t.shape)))
        return created

    _module_procedure(proc, entry, 0, compare=_equal)


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_repr(entry):
    """test_repr: ``repr``/``str`` work — and read as torch's (the twins keep torch's class names)."""

    def proc(cls):
        return [(repr(m), str(m)) for m in (_build(cls, mi, F64) for mi in entry.inputs(F64))]

    _module_procedure(proc, entry, 0, compare=_equal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry, k, training", _records(ALL))
def test_pickle_and_state_dict(entry, k, training, backend):
    """test_pickle: after a forward, ``torch.save``/``torch.load`` of the module — and ``deepcopy`` —
    give a module of the same class with the same output; the state_dict loads (strict) into the
    other library's module, which then gives the same output."""

    def proc(cls):
        mi = entry.input(k, F64, training)
        m = _build(cls, mi, F64, training)
        args, kwargs = _fwd(mi)
        out = m(*args, **kwargs)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        copies = [torch.load(buf, weights_only=False), copy.deepcopy(m)]
        for c in copies:
            assert type(c) is type(m)
            torch.testing.assert_close(c(*args, **kwargs), out)
        other = entry.theirs if cls is entry.ours else entry.ours
        o = _build(other, mi, F64, training)
        if entry.lazy:
            with torch.no_grad():
                o(*args, **kwargs)  # materialize before loading
        o.load_state_dict(m.state_dict(), strict=True)
        torch.testing.assert_close(_state(o), _state(m))
        return out, m.state_dict(), o(*args, **kwargs)

    _module_procedure(proc, entry, k, backend=backend, **TOL[F64])


def _traverse(obj, fn):
    if isinstance(obj, (tuple, list)):
        return type(obj)(_traverse(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {name: _traverse(o, fn) for name, o in obj.items()}
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    return obj


def _make_non_contiguous(obj):
    """pytorch's transform: every tensor of dim > 0 becomes a non-contiguous view with its values."""
    def nc(t):
        if t.dim() == 0:
            return t
        out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
        out.requires_grad = t.requires_grad
        return out
    return _traverse(obj, nc)


def _grads(obj):
    return _traverse(obj, lambda t: t.grad if t.requires_grad else None)


def _zero_grad(obj):
    def zero(t):
        t.grad = None
    _traverse(obj, zero)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry, k, training", _records(COMPUTED))
def test_non_contiguous_tensors(entry, k, training, backend):
    """test_non_contiguous_tensors: non-contiguous inputs and output gradients (all four
    combinations) give the contiguous call's output and gradients."""

    def proc(cls):
        mi = entry.input(k, F32, training, requires_grad=True)
        args, kwargs = _fwd(mi)
        if not any(isinstance(t, torch.Tensor) and t.dim() > 0 for t in (*args, *kwargs.values())):
            return None
        m = _build(cls, mi, F32, training)
        default = m(*args, **kwargs)
        grad_output = default.clone().detach_().normal_()
        default.backward(grad_output, retain_graph=True)
        default_grads = copy.deepcopy((_grads(args), _grads(kwargs), [p.grad for p in m.parameters()]))
        nc_args, nc_kwargs = _make_non_contiguous((args, kwargs))
        nc_grad_output = _make_non_contiguous(grad_output)
        results = []
        for (a, kw), g in [((a, kw), g) for a, kw in ((args, kwargs), (nc_args, nc_kwargs))
                           for g in (grad_output, nc_grad_output)]:
            _zero_grad((a, kw))
            _zero_grad(list(m.parameters()))
            out = m(*a, **kw)
            out.backward(copy.deepcopy(g), retain_graph=True)
            torch.testing.assert_close(out, default, equal_nan=True)
            torch.testing.assert_close(_grads(a), default_grads[0], atol=1e-4, rtol=0, equal_nan=True)
            torch.testing.assert_close(_grads(kw), default_grads[1], atol=1e-4, rtol=0, equal_nan=True)
            torch.testing.assert_close([p.grad for p in m.parameters()], default_grads[2], equal_nan=True)
            results.append(out)
        return default, default_grads, results, _state(m)

    _module_procedure(proc, entry, k, backend=backend, **TOL[F32])


def _non_contiguous_view(t):
    """A view of ``t``'s values over every other element of a NaN-filled base (torch's
    ``noncontiguous_like``); returns (view, base)."""
    base = torch.full((*t.shape, 2), math.nan, dtype=t.dtype)
    base[..., 1] = t.detach()
    return base[..., 1], base


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry, k, training", _records(COMPUTED))
def test_non_contiguous_state(entry, k, training, backend):
    """Parameters and running statistics that are non-contiguous views over a NaN-filled base (issue
    21: torch.nn reads and writes them through the view). A forward in ``training`` mode with its
    backward, then a forward in the other mode with its backward, give the outputs, gradients and
    statistics of torch.nn's module holding the same values contiguously; the statistics are updated
    in the very same view objects, the base's NaN filler untouched. (Contiguous on torch's side:
    torch.nn.BatchNorm1d's backward itself reads the filler of a non-contiguous weight, giving NaN dx.)"""

    def proc(cls):
        strided = cls is entry.ours
        mi = entry.input(k, F32, training, requires_grad=True)
        m = _build(cls, mi, F32, training)
        _randomize(m, _seed(entry.name, k))
        views = {}
        if strided:
            for name, p in list(m._parameters.items()):
                if p is not None and p.dim() > 0:
                    view, _ = _non_contiguous_view(p)
                    m._parameters[name] = nn.Parameter(view, requires_grad=p.requires_grad)
                    assert not m._parameters[name].is_contiguous()
            for name, b in list(m._buffers.items()):
                if b is not None and b.dim() > 0:
                    views[name], _ = _non_contiguous_view(b)
                    m._buffers[name] = views[name]
        args, kwargs = _fwd(mi)
        results = []
        for _ in range(2):
            out = m(*args, **kwargs)
            grads = None
            if out.requires_grad:
                wrt = [t for t in (*args, *m.parameters()) if t.requires_grad]
                grads = torch.autograd.grad(out, wrt, torch.randn_like(out), allow_unused=True)
            for name, view in views.items():
                assert m._buffers[name] is view, f"{name} was replaced, not written through the view"
                assert view._base[..., 0].isnan().all(), f"{name}: written outside the view"
            results.append((out, grads, _state(m)))
            m.train(not training)
        return results

    _module_procedure(proc, entry, k, backend=backend, **TOL[F32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry, k, training", [p for p in _records(COMPUTED)
                                                 if p.values[0].name.startswith("nn.InstanceNorm") and not p.values[2]])
def test_instance_norm_backward_after_statistics_update(entry, k, training, backend):
    """An eval-mode InstanceNorm forward (running statistics), then a training forward that updates
    them in place, then one backward through both outputs: torch.nn normalizes with copies of the
    statistics (``running_mean.repeat(N)``), so the first output's gradient is that of the statistics
    it used. (torch.nn's BatchNorm instead reads the updated buffers in that backward: nothing to
    compare there.)"""

    def proc(cls):
        mi = entry.input(k, F32, False, requires_grad=True)
        m = _build(cls, mi, F32, False)
        _randomize(m, _seed(entry.name, k))
        args, kwargs = _fwd(mi)
        first = m(*args, **kwargs)
        m.train()
        second = m(*args, **kwargs)
        wrt = [t for t in (*args, *m.parameters()) if t.requires_grad]
        grads = torch.autograd.grad((first * second.detach()).sum() + second.sum(), wrt, allow_unused=True)
        return first, second, grads, _state(m)

    _module_procedure(proc, entry, k, backend=backend, **TOL[F32])


def _gradient_check(check, entry, k, training, backend):
    """pytorch's _test_gradients_helper: ``check`` (gradcheck / gradgradcheck, batched gradients on,
    fast mode, float64) of the module's output with respect to its inputs and all parameters together,
    then of each parameter alone (with the inputs)."""

    def proc(cls):
        mi = entry.input(k, F64, training, requires_grad=True)
        m = _build(cls, mi, F64, training)
        args, kwargs = _fwd(mi)
        params = tuple(m.parameters())

        def fn(*flat):
            return m(*flat[:len(args)], **kwargs)

        results = [check(fn, (*args, *params))]
        old = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        for p, was in zip(params, old, strict=True):
            p.requires_grad_(was)
            results.append(check(fn, (*args, *params)))
            p.requires_grad_(False)
        return results

    _module_procedure(proc, entry, k, backend=backend, key=(check.__name__, entry.name, k, training))


def gradcheck(fn, inputs):
    return torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, fast_mode=True)


def gradgradcheck(fn, inputs):
    return torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=True, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry, k, training", _records(COMPUTED))
def test_grad(entry, k, training, backend):
    """test_grad: gradcheck with ``check_batched_grad=True`` (``autograd.grad(..., is_grads_batched=True)``)."""
    _gradient_check(gradcheck, entry, k, training, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry, k, training", _records(COMPUTED))
def test_gradgrad(entry, k, training, backend):
    """test_gradgrad: gradgradcheck with ``check_batched_grad=True``."""
    _gradient_check(gradgradcheck, entry, k, training, backend)


def _format_flags(t):
    return (t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last),
            t.is_contiguous(memory_format=torch.channels_last_3d))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry, k, training", _records(COMPUTED))
def test_memory_format(entry, k, training, backend):
    """test_memory_format: every (input format, module format) pair gives the contiguous pair's output
    and (training) gradients; the output's and gradients' memory formats are torch's. (pytorch checks a
    format rule of its own and skips InstanceNorm and LayerNorm on CPU, whose output is contiguous for
    channels_last input; here the rule is torch's actual format, for every entry.)"""

    def proc(cls):
        mi = entry.input(k, F32, training, requires_grad=True)
        args, kwargs = _fwd(mi)
        dims = {a.dim() for a in args if isinstance(a, torch.Tensor)}
        extra = [torch.channels_last] if 4 in dims else [torch.channels_last_3d] if 5 in dims else []
        m = _build(cls, mi, F32, training)
        desired = m(*args, **kwargs)
        ref_grads = None
        if training and desired.requires_grad:
            wrt = [t for t in (*args, *m.parameters()) if t.requires_grad]
            ref_dy = torch.rand_like(desired)
            ref_grads = torch.autograd.grad(desired, wrt, ref_dy)
        seen = []
        for in_fmt in [torch.contiguous_format, *extra]:
            def to_fmt(t, in_fmt=in_fmt):
                ok = in_fmt == torch.contiguous_format or t.dim() == (4 if in_fmt == torch.channels_last else 5)
                c = t.clone().to(memory_format=in_fmt) if ok else t.clone()
                return c.detach().requires_grad_(t.requires_grad)
            a, kw = _traverse((args, kwargs), to_fmt)
            for mod_fmt in [torch.preserve_format, torch.contiguous_format, *extra]:
                m.to(memory_format=mod_fmt)
                out = m(*a, **kw)
                torch.testing.assert_close(out, desired)
                grads = None
                if ref_grads is not None:
                    wrt = [t for t in (*a, *m.parameters()) if t.requires_grad]
                    grads = torch.autograd.grad(out, wrt, torch.empty_like(out).copy_(ref_dy))
                    torch.testing.assert_close(grads, ref_grads)
                seen.append((_format_flags(out), [_format_flags(g) for g in grads or ()]))
        return desired, ref_grads, seen

    _module_procedure(proc, entry, k, backend=backend, **TOL[F32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry, k, training", _records(COMPUTED, modes=False))
def test_if_train_and_eval_modes_differ(entry, k, training, backend):
    """test_if_train_and_eval_modes_differ: with the ``training`` attribute deleted, a forward that
    reads it (AttributeError naming 'training') is allowed only where the entry says train and eval
    differ; one that does not read it gives the output of the module in training mode (torch's)."""

    def proc(cls):
        mi = entry.input(k, F32, training)
        m = _build(cls, mi, F32, training)
        args, kwargs = _fwd(mi)
        if cls is entry.theirs:
            return m(*args, **kwargs)
        delattr(m, "training")
        try:
            return m(*args, **kwargs)
        except AttributeError as err:
            if "'training'" not in str(err):
                raise
            assert entry.info.train_and_eval_differ, f"{entry.name}'s forward reads training"
            return None

    def compare(got, expected):
        if got is not None:
            torch.testing.assert_close(got, expected, **TOL[F32])

    _module_procedure(proc, entry, k, backend=backend, compare=compare)


@pytest.mark.parametrize("entry", ALL, ids=lambda e: e.name)
def test_device_ctx_init(entry):
    """test_device_ctx_init: built under ``with torch.device('meta')``, every parameter and buffer is
    meta with the metadata of the CPU-built one (and of torch's)."""

    def proc(cls):
        with torch.device("meta"):
            metas = [_build(cls, mi) for mi in entry.inputs(F32, device=None)]
        found = []
        for mi, m in zip(entry.inputs(F32), metas, strict=True):
            cpu = _build(cls, mi)
            for (name, t), (_, c) in zip((*m.named_parameters(), *m.named_buffers()),
                                         (*cpu.named_parameters(), *cpu.named_buffers()), strict=True):
                if nn.parameter.is_lazy(t):
                    continue
                assert t.is_meta, name
                assert _meta(t)[:3] + _meta(t)[4:] == _meta(c)[:3] + _meta(c)[4:], name
                found.append((name, type(t).__name__, _meta(t)))
        return found

    _module_procedure(proc, entry, 0, compare=_equal)


@pytest.fixture(params=[False, True], ids=["swap0", "swap1"])
def swap(request):
    """torch.__future__.set_swap_module_params_on_conversion (pytorch's wrapSwapTensorsTest)."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.parametrize("entry, k, training", _records(COMPUTED, modes=False))
def test_to_empty(entry, k, training, swap):
    """test_to_empty: a module built on meta, ``to_empty(device='cpu')``, holds CPU Parameters (new
    ones, or the same swapped); then ``reset_parameters()`` (issue 21: the FSDP2 / large-model loading
    path) gives the state of a module built on CPU, and the forward gives torch's output."""

    def proc(cls):
        with torch.device("meta"):
            mi = entry.input(k, F32, training, device=None)
            m = _build(cls, mi)
        ids = [(id(p), p._cdata) for p in m.parameters()]
        m.to_empty(device="cpu")
        assert all(isinstance(p, nn.Parameter) and p.device.type == "cpu" and p.dtype == F32
                   for p in m.parameters())
        for (i, cdata), p in zip(ids, m.parameters(), strict=True):
            assert (id(p) == i) == swap and p._cdata != cdata
        assert all(b.device.type == "cpu" for b in m.buffers())
        m.reset_parameters()
        cpu_mi = entry.input(k, F32, training)
        torch.testing.assert_close(m.state_dict(), _build(cls, cpu_mi).state_dict(), rtol=0, atol=0)
        args, kwargs = _fwd(cpu_mi)
        return m(*args, **kwargs), m.state_dict()

    _module_procedure(proc, entry, k, **TOL[F32])


@pytest.mark.parametrize("set_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("entry, k, training", _records(COMPUTED, modes=False))
def test_to(entry, k, training, swap, set_grad):
    """test_to: ``module.to(device, dtype)`` over the entry's dtypes keeps every parameter (and its
    ``.grad``) the same Python object (swapped when the swap flag is on, else by ``.data``), moves it,
    and the module then computes torch's output."""

    def proc(cls):
        mi = entry.input(k, F32, training)
        args, kwargs = _fwd(mi)
        m = _build(cls, mi)

        def fresh(module):  # without module.to(), the method under test
            for n, p in list(module.named_parameters(recurse=False)):
                new_p = nn.Parameter(p.detach().clone())
                setattr(module, n, new_p)
                if set_grad:
                    new_p.grad = torch.randn_like(new_p)
            for n, b in list(module.named_buffers(recurse=False)):
                setattr(module, n, b.detach().clone())
        fresh(m)
        params = list(m.parameters())
        if swap and not set_grad and params:
            m(*args, **kwargs).sum().backward()
            m.to(dtype=torch.half)
            m.to(dtype=F32)
        prev = F32
        for dtype in entry.info.dtypes:
            before = [(id(p), p._cdata, id(p.grad) if set_grad else None,
                       p.grad._cdata if set_grad else None) for p in m.parameters()]
            m.to(device="cpu", dtype=dtype)
            for (i, cdata, gi, gcdata), p in zip(before, m.parameters(), strict=True):
                assert isinstance(p, nn.Parameter) and p.device.type == "cpu" and p.dtype == dtype
                assert id(p) == i
                assert (p._cdata != cdata) if swap else (p._cdata == cdata)
                if set_grad:
                    assert p.grad.device.type == "cpu" and p.grad.dtype == dtype
                    if swap:  # a grad whose device and dtype do not change is not swapped
                        assert (p.grad._cdata == gcdata) == (dtype == prev)
                    else:
                        assert id(p.grad) == gi and p.grad._cdata == gcdata
            prev = dtype
        m.to(F64)
        return m(*[a.double() if isinstance(a, torch.Tensor) else a for a in args], **kwargs), _state(m)

    _module_procedure(proc, entry, k, **TOL[F32])  # the statistics of a float32 forward, rounded to half


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry, k, training", _records(ALL))
def test_meta_forward(entry, k, training, backend):
    """A module built on the meta device (``with torch.device('meta')``, the deferred-init path) runs
    its forward and backward there on meta inputs (issue 21): output, gradients and buffers (running
    statistics, ``num_batches_tracked``) stay meta with the metadata torch.nn's module gives on CPU
    (pytorch's test_meta compares a meta run with the real run likewise)."""

    def proc(cls):
        on_meta = cls is entry.ours
        mi = entry.input(k, F32, training, requires_grad=True)
        args, kwargs = _fwd(mi)
        if on_meta:
            with torch.device("meta"):
                m = _build(cls, mi, training=training)
            args, kwargs = _traverse((args, kwargs), lambda t: t.detach().to("meta").requires_grad_(t.requires_grad))
        else:
            m = _build(cls, mi, training=training)
        out = m(*args, **kwargs)
        grads = []
        if out.requires_grad:
            wrt = [t for t in (*args, *m.parameters()) if t.requires_grad]
            grads = [g for g in torch.autograd.grad(out.sum(), wrt, allow_unused=True) if g is not None]
        buffers = dict(m.named_buffers())
        if on_meta:
            assert all(t.is_meta for t in (out, *grads, *buffers.values()))
        return _meta(out), [_meta(g) for g in grads], {name: _meta(t) for name, t in buffers.items()}

    _module_procedure(proc, entry, k, backend=backend, compare=_equal)


_ERROR_ENTRIES = [e for e in COMPUTED if e.info.module_error_inputs_func is not None]


@pytest.mark.parametrize("entry", _ERROR_ENTRIES, ids=lambda e: e.name)
def test_errors(entry):
    """test_errors: each error input raises torch's error type at torch's step (construction or
    forward). Where torch refuses a training batch after counting it in ``num_batches_tracked``,
    normkit's deliberate difference holds: a ``NormInputError`` (a ValueError and a RuntimeError), and
    no buffer changed."""
    info = entry.info
    errors = info.module_error_inputs_func(info, device="cpu", dtype=F32, requires_grad=False, training=True)
    assert errors
    for err in errors:
        mi = err.module_error_input
        if err.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            same_as_torch(lambda mi=mi: _build(entry.theirs, mi), lambda mi=mi: _build(entry.ours, mi),
                          torch_may_fail=True)
            continue
        theirs, ours = _build(entry.theirs, mi), _build(entry.ours, mi)
        before_theirs, before_ours = _state(theirs), _state(ours)
        args, kwargs = _fwd(mi)
        with pytest.raises(Exception) as raised_by_torch:  # noqa: B017 - any refusal; its type is checked below
            theirs(*args, **kwargs)
        with pytest.raises(raised_by_torch.type) as raised:
            ours(*args, **kwargs)
        torch.testing.assert_close(_state(ours), before_ours, rtol=0, atol=0)
        torch_counted = not torch.equal(theirs.num_batches_tracked, before_theirs["num_batches_tracked"])
        if torch_counted:  # the documented difference, not an accident
            assert isinstance(raised.value, normkit.NormInputError)
            assert isinstance(raised.value, ValueError) and isinstance(raised.value, RuntimeError)


# ----------------------------------------------------------------------------- op_db: TestCommon, TestGradients
def _op_records():
    params = []
    for op in OPS:
        for k, _ in enumerate(op.sample_inputs("cpu", F32)):
            params.append(pytest.param(op, k, id=f"{op.name}-{k}"))
    return params


OP_RECORDS = _op_records()


_OP = {op.name: op for op in OPS}


def _samples(op, dtype, requires_grad):
    return _op_samples(op.name, dtype, requires_grad)


@functools.cache
def _op_samples(name, dtype, requires_grad):
    op = _OP[name]
    return _seeded(_seed(name), lambda: list(op.sample_inputs("cpu", dtype, requires_grad=requires_grad)))


def _sample(op, k, dtype, requires_grad=False):
    """Sample ``k``: fresh copies of the same seeded tensors on every call."""
    return _samples(op, dtype, requires_grad)[k].transform(
        lambda t: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t)


def _op_procedure(proc, op, k, *args, backend="auto", **options):
    """``proc(fn, *args)`` for torch's function and normkit's, seeded alike (normkit under ``backend``)."""
    seed = _seed(op.name, k)
    return same_as_torch(lambda: _seeded(seed, proc, op.op, *args),
                         lambda: _seeded(seed, _backend(backend, proc), FUNCTIONS[op.name], *args),
                         **options)


def _sample_tensors(s):
    return [t for t in (s.input, *s.args, *s.kwargs.values()) if isinstance(t, torch.Tensor)]


def _call(fn, s):
    return fn(s.input, *s.args, **s.kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, k", OP_RECORDS)
def test_op_noncontiguous_samples(op, k, backend):
    """test_noncontiguous_samples (float32): the sample with every tensor — running statistics
    included — a non-contiguous view over a NaN-filled base gives torch's output and gradients (for
    non-contiguous output gradients), and the statistics updated through the view hold torch's values
    with the base's NaN filler untouched."""

    def proc(fn):
        s = _sample(op, k, F32, requires_grad=True).noncontiguous()
        out = _call(fn, s)
        tensors = _sample_tensors(s)
        grads = None
        if out.requires_grad:
            wrt = [t for t in tensors if t.requires_grad]
            grads = torch.autograd.grad(out, wrt, noncontiguous_like(torch.randn_like(out)), allow_unused=True)
        bases = [t._base if t._base is not None else t for t in tensors if not t.requires_grad]
        return out, grads, bases

    _op_procedure(proc, op, k, backend=backend, **TOL[F32])


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_op_out(op):
    """test_out for ops that declare ``supports_out=False``: passing ``out=`` raises, as torch's does."""
    assert not op.supports_out

    def proc(fn):
        s = _sample(op, 0, F32)
        return fn(s.input, *s.args, **s.kwargs, out=torch.empty(0))

    with pytest.raises(TypeError):
        proc(op.op)
    _op_procedure(proc, op, 0, torch_may_fail=True)


_DTYPES = [torch.float16, torch.bfloat16, F32, F64, torch.complex64, torch.int64, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_op_dtypes(op, dtype):
    """test_dtypes: for every dtype, each sample works (output and, where torch differentiates in that
    dtype, gradient dtypes and shapes) or fails as torch's does."""
    requires_grad = dtype in op.supported_backward_dtypes("cpu")
    n = len(_samples(op, dtype, requires_grad))
    assert n > 0

    def proc(fn):
        outcomes = []
        for k in range(n):
            s = _sample(op, k, dtype, requires_grad)
            try:
                out = _call(fn, s)
                grads = None
                if out.requires_grad:
                    wrt = [t for t in _sample_tensors(s) if t.requires_grad]
                    grads = [_meta(g) for g in torch.autograd.grad(out.sum().abs(), wrt, allow_unused=True)]
                outcomes.append((_meta(out), grads))
            except Exception as err:  # noqa: BLE001 - compared with torch's outcome below
                outcomes.append(err)
        return outcomes

    def compare(got, expected):
        for k, (o, t) in enumerate(zip(got, expected, strict=True)):
            if isinstance(t, Exception):
                assert isinstance(o, type(t)), f"sample {k}: torch raised {t!r}, normkit gave {o!r}"
            elif isinstance(o, Exception):
                raise AssertionError(f"sample {k}: torch computed it, normkit raised {o!r}") from o
            else:
                assert o == t, f"sample {k}"

    _op_procedure(proc, op, 0, compare=compare)  # proc catches each sample's error: torch's run passes


def _gradcheck_fn(op, fn, s):
    """pytorch's _check_helper: a function of the sample's tensors that require grad, and those tensors."""
    slots = [("input", None)] + [("args", i) for i in range(len(s.args))] + [("kwargs", key) for key in s.kwargs]

    def value(slot):
        where, i = slot
        return s.input if where == "input" else s.args[i] if where == "args" else s.kwargs[i]

    diff = [slot for slot in slots if isinstance(value(slot), torch.Tensor) and value(slot).requires_grad]

    def f(*tensors):
        given = dict(zip(diff, tensors, strict=True))
        inp = given.get(("input", None), s.input)
        args = [given.get(("args", i), a) for i, a in enumerate(s.args)]
        kwargs = {key: given.get(("kwargs", key), v) for key, v in s.kwargs.items()}
        out = op.gradcheck_wrapper(fn, inp, *args, **kwargs)
        return s.output_process_fn_grad(out) if s.output_process_fn_grad is not None else out

    return f, tuple(value(slot) for slot in diff)


def _op_gradient_check(name, check, op, k, backend):
    def proc(fn):
        s = _sample(op, k, F64, requires_grad=True)
        f, inputs = _gradcheck_fn(op, fn, s)
        return check(f, inputs)

    _op_procedure(proc, op, k, backend=backend, key=(name, op.name, k))


def _fast(op):
    return True if op.gradcheck_fast_mode is None else op.gradcheck_fast_mode


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, k", OP_RECORDS)
def test_op_fn_grad(op, k, backend):
    """TestBwdGradients.test_fn_grad: gradcheck with batched gradients, gradient dtypes and undefined
    output gradients checked."""
    _op_gradient_check("fn_grad", lambda f, inputs: torch.autograd.gradcheck(
        f, inputs, check_batched_grad=op.check_batched_grad, check_grad_dtypes=True,
        nondet_tol=op.gradcheck_nondet_tol, fast_mode=_fast(op), check_undefined_grad=True), op, k, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, k", OP_RECORDS)
def test_op_fn_gradgrad(op, k, backend):
    """TestBwdGradients.test_fn_gradgrad: gradgradcheck with batched gradients, for contiguous and
    non-contiguous output gradients."""
    _op_gradient_check("fn_gradgrad", lambda f, inputs: [torch.autograd.gradgradcheck(
        f, inputs, gen_non_contig_grad_outputs=nc, check_batched_grad=op.check_batched_gradgrad,
        check_grad_dtypes=True, nondet_tol=op.gradcheck_nondet_tol, fast_mode=_fast(op)) for nc in (False, True)],
        op, k, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, k", OP_RECORDS)
def test_op_fn_fwgrad_bwgrad(op, k, backend):
    """TestFwdGradients.test_fn_fwgrad_bwgrad: forward-over-reverse gradgradcheck."""
    assert op.supports_fwgrad_bwgrad
    _op_gradient_check("fn_fwgrad_bwgrad", lambda f, inputs: [torch.autograd.gradgradcheck(
        f, inputs, gen_non_contig_grad_outputs=nc, check_fwd_over_rev=True, check_rev_over_rev=False,
        check_batched_grad=False, check_undefined_grad=False, check_grad_dtypes=True,
        nondet_tol=op.gradcheck_nondet_tol, fast_mode=_fast(op)) for nc in (False, True)], op, k, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, k", OP_RECORDS)
def test_op_forward_mode_ad(op, k, backend):
    """TestFwdGradients.test_forward_mode_AD: gradcheck of forward-mode AD, batched forward gradients on."""
    assert op.supports_forward_ad
    _op_gradient_check("forward_mode_AD", lambda f, inputs: torch.autograd.gradcheck(
        f, inputs, check_forward_ad=True, check_backward_ad=False, check_batched_grad=False,
        check_batched_forward_grad=op.check_batched_forward_grad, check_undefined_grad=True,
        check_grad_dtypes=True, nondet_tol=op.gradcheck_nondet_tol, fast_mode=_fast(op)), op, k, backend)


@pytest.mark.parametrize("mode", ["meta", "fake"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, k", OP_RECORDS)
def test_op_meta_and_fake(op, k, backend, mode):
    """test_meta's meta_outplace and TestFakeTensor: the sample on the meta device, or under
    FakeTensorMode, gives an output (and leaves the sample's tensors) with the metadata of torch's
    real run."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    def proc(fn):
        s = _sample(op, k, F32, requires_grad=True)
        if fn is op.op:  # torch's real run
            return _meta(_call(fn, s)), [_meta(t) for t in _sample_tensors(s)]
        if mode == "meta":
            s = s.transform(lambda t: t.to("meta").requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                            else t)
            out = _call(fn, s)
            assert out.is_meta
            return _meta(out), [_meta(t) for t in _sample_tensors(s)]
        with FakeTensorMode() as fake:
            s = s.transform(lambda t: fake.from_tensor(t) if isinstance(t, torch.Tensor) else t)
            out = _call(fn, s)
            assert isinstance(out, FakeTensor)
            return _meta(out), [_meta(t) for t in _sample_tensors(s)]

    _op_procedure(proc, op, k, backend=backend, compare=_equal)


def test_every_procedure_has_records():
    assert {e.name for e in ENTRIES} == set(TWINS)
    assert not any(info.name.startswith("nn.SyncBatchNorm") for info in common_modules.module_db)
    assert len(OP_RECORDS) == sum(len(list(op.sample_inputs("cpu", F32))) for op in OPS) > 0
