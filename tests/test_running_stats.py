"""Running statistics of every normkit BatchNorm form: checkpoint-safe and skipping non-finite batches.

Oracles: the same layer run without checkpointing (buffers must be bit-identical), torch.nn's
BatchNorm (same numbers up to rounding, same output for a non-finite batch), and torch.nn under
checkpointing (which does count twice: proof that the recomputation really ran).
"""

from __future__ import annotations

import copy
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import normkit
from normkit import running_stats

# name -> (factory(C, **kwargs), input shape)
FORMS = {
    "bn1d": (lambda c, **kw: normkit.BatchNorm1d(c, **kw), (6, 3, 5)),
    "bn2d": (lambda c, **kw: normkit.BatchNorm2d(c, **kw), (4, 3, 5, 7)),
    "bn3d": (lambda c, **kw: normkit.BatchNorm3d(c, **kw), (2, 3, 3, 4, 5)),
    "masked": (lambda c, **kw: normkit.BatchNorm1d(c, **kw), (4, 3, 9)),
    "sync_local": (lambda c, **kw: normkit.SyncBatchNorm(c, **kw), (4, 3, 5, 7)),
    "renorm": (lambda c, **kw: normkit.BatchRenorm2d(c, warmup_steps=0, **kw), (4, 3, 5, 7)),
    "ghost": (lambda c, **kw: normkit.GhostBatchNorm2d(c, virtual_batch_size=3, **kw), (7, 3, 5, 7)),
}


class Block(nn.Module):
    """conv → norm → relu; a forward hook-free block so checkpoint can recompute it."""

    def __init__(self, form: str, **kw) -> None:
        super().__init__()
        factory, shape = FORMS[form]
        self.form, self.shape = form, shape
        self.norm = factory(3, **kw)
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        self.mask = None
        if form == "masked":
            gen = torch.Generator().manual_seed(3)
            self.mask = torch.rand(shape[0], shape[2], generator=gen) > 0.3

    def forward(self, x):
        h = x * self.scale
        y = self.norm(h, self.mask) if self.mask is not None else self.norm(h)
        return torch.relu(y)


def _batch(shape, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (3.0 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.named_buffers()}


def _step(block, x, ckpt):
    x = x.clone().requires_grad_()
    y = checkpoint(block, x, use_reentrant=ckpt) if ckpt is not None else block(x)
    y.square().sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "m_none"])
@pytest.mark.parametrize("form", list(FORMS))
def test_checkpointed_step_updates_buffers_once(form, momentum, use_reentrant):
    plain = Block(form, momentum=momentum).double()
    ckpt = copy.deepcopy(plain)
    for step in range(3):
        x = _batch(plain.shape, step)
        y0, dx0 = _step(plain, x, None)
        y1, dx1 = _step(ckpt, x, use_reentrant)
        assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
        for (name, a), b in zip(_buffers(plain).items(), _buffers(ckpt).values(), strict=True):
            assert torch.equal(a, b), f"step {step}: {name} differs under checkpointing"
        assert torch.equal(plain.scale.grad, ckpt.scale.grad)
    expected = 3 * (3 if form == "ghost" else 1)  # ghost counts virtual batches (7 = 3 + 3 + 1)
    assert int(ckpt.norm.num_batches_tracked) == expected


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointed_buffers_match_torch_nn_which_counts_twice(use_reentrant):
    """normkit under checkpointing = torch.nn without; torch.nn under checkpointing counts twice."""
    ours = nn.Sequential(nn.Conv2d(3, 4, 3), normkit.BatchNorm2d(4), nn.ReLU()).double()
    theirs = copy.deepcopy(ours)
    theirs[1] = nn.BatchNorm2d(4).double()
    theirs_ckpt = copy.deepcopy(theirs)
    x = _batch((5, 3, 8, 9), 0).requires_grad_()
    checkpoint(ours, x, use_reentrant=use_reentrant).sum().backward()
    theirs(x).sum().backward()
    checkpoint(theirs_ckpt, x, use_reentrant=use_reentrant).sum().backward()
    for key, value in theirs[1].state_dict().items():
        torch.testing.assert_close(ours[1].state_dict()[key], value, rtol=1e-12, atol=1e-14)
    assert int(theirs_ckpt[1].num_batches_tracked) == 2  # the recomputation ran (and torch counted it)
    assert int(ours[1].num_batches_tracked) == 1


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_instance_norm_with_running_stats_is_checkpoint_safe_too(use_reentrant):
    plain = nn.Sequential(nn.Conv2d(3, 3, 1), normkit.InstanceNorm2d(3, track_running_stats=True)).double()
    ckpt = copy.deepcopy(plain)
    theirs = copy.deepcopy(plain)
    theirs[1] = nn.InstanceNorm2d(3, track_running_stats=True).double()
    x = _batch((4, 3, 5, 6), 0).requires_grad_()
    plain(x).sum().backward()
    checkpoint(ckpt, x, use_reentrant=use_reentrant).sum().backward()
    checkpoint(theirs, x, use_reentrant=use_reentrant).sum().backward()
    for (name, a), b in zip(_buffers(plain).items(), _buffers(ckpt).values(), strict=True):
        assert torch.equal(a, b), name
    if use_reentrant:  # (non-reentrant recomputation stops after the last saved tensor, before torch's update)
        assert not torch.allclose(theirs[1].running_mean, plain[1].running_mean)  # torch.nn moved twice


def test_checkpoint_under_no_grad_forward_and_nested_backward_in_eval():
    """A forward inside a backward pass in eval mode still normalizes with the running statistics."""
    layer = normkit.BatchNorm2d(3).double().eval()
    before = _buffers(layer)
    x = _batch((2, 3, 4, 5), 1).requires_grad_()
    checkpoint(layer, x, use_reentrant=True).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before.values(), _buffers(layer).values(), strict=True))
    assert not running_stats.in_recomputation()


def _bad(shape, dtype=torch.float16):
    """An fp16 batch with one overflowed value (7e4 > fp16 max → inf)."""
    x = _batch(shape, 5, torch.float32)
    x.view(-1)[7] = 7e4
    return x.to(dtype)


@pytest.mark.parametrize("form", list(FORMS))
def test_nonfinite_batch_leaves_buffers_and_counts(form):
    block = Block(form, momentum=None if form == "bn2d" else 0.1).float()
    norm = block.norm
    block(_batch(block.shape, 1, torch.float32))  # one good batch first: non-trivial state
    before = _buffers(norm)
    bad = _batch(block.shape, 2, torch.float32)
    where = (0, 1) + (2,) * (bad.dim() - 2)
    if block.mask is not None:  # a real (unmasked) position
        n, pos = block.mask.nonzero()[0].tolist()
        where = (n, 1, pos)
    bad[where] = float("inf")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        block(bad)
        block(bad)
    if form == "ghost":  # the inf lies in the first of 3 virtual batches: the other two count
        assert int(norm.num_batches_tracked) == int(before["num_batches_tracked"]) + 4
        assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    else:
        for name, value in _buffers(norm).items():
            assert torch.equal(value, before[name]), f"{name} changed by a non-finite batch"
    assert int(norm.skipped_batches) == 2
    ours = [w for w in seen if issubclass(w.category, RuntimeWarning) and "skipped a training batch" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in seen]
    # statistics keep working: the next good batch moves them again, finite
    block(_batch(block.shape, 3, torch.float32))
    assert torch.isfinite(norm.running_mean).all() and torch.isfinite(norm.running_var).all()
    assert not torch.equal(norm.running_mean, before["running_mean"])


def test_fp16_overflow_batch_output_is_torchs_and_buffers_unchanged():
    ours, theirs = normkit.BatchNorm2d(3), nn.BatchNorm2d(3)
    good, bad = _batch((4, 3, 5, 7), 1, torch.float16), _bad((4, 3, 5, 7))
    assert not torch.isfinite(bad).all()
    for layer in (ours, theirs):
        layer(good.float())
    before = _buffers(ours)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        y_ours = ours(bad)
    y_theirs = theirs(bad.float()).half()
    torch.testing.assert_close(y_ours, y_theirs, equal_nan=True, rtol=1e-3, atol=1e-3)
    assert torch.isnan(y_ours).any()  # the output is torch's: NaN where torch's is
    assert all(torch.equal(before[k], v) for k, v in _buffers(ours).items())
    assert int(ours.skipped_batches) == 1
    assert not torch.isfinite(theirs.running_mean).all()  # what the policy prevents
    assert int(theirs.num_batches_tracked) == 2 and int(ours.num_batches_tracked) == 1


def test_policy_torch_restores_torch_behaviour():
    ours, theirs = normkit.BatchNorm2d(3), nn.BatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    bad = _bad((4, 3, 5, 7)).float()
    old = normkit.set_nonfinite_policy("torch")
    try:
        assert normkit.get_nonfinite_policy() == "torch"
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ours(bad)
        theirs(bad)
        assert not [w for w in seen if "skipped a training batch" in str(w.message)]  # nothing skipped
    finally:
        assert normkit.set_nonfinite_policy(old) == "torch"
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, equal_nan=True)
    assert torch.isnan(ours.running_var).any()
    assert int(ours.skipped_batches) == 0
    with pytest.raises(ValueError, match="policy"):
        normkit.set_nonfinite_policy("ignore")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_finite_batches_give_bit_identical_buffers_under_both_policies(momentum):
    a = normkit.BatchNorm2d(3, momentum=momentum)
    b = copy.deepcopy(a)
    for step in range(3):
        x = _batch((4, 3, 5, 7), step, torch.float32)
        a(x)
        old = normkit.set_nonfinite_policy("torch")
        try:
            b(x)
        finally:
            normkit.set_nonfinite_policy(old)
    for (name, u), v in zip(_buffers(a).items(), _buffers(b).values(), strict=True):
        assert torch.equal(u, v), name


def test_counter_is_not_state_and_follows_the_layer():
    layer = normkit.BatchNorm2d(3)
    assert "skipped_batches" not in layer.state_dict()
    assert "skipped_batches" not in dict(layer.named_buffers())
    assert int(layer.skipped_batches) == 0
    converted = normkit.convert(nn.Sequential(nn.BatchNorm2d(3)))  # retyped: no constructor ran
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        converted(_bad((4, 3, 5, 7)).float())
    assert int(converted[0].skipped_batches) == 1
    assert int(converted[0].num_batches_tracked) == 0


def test_compiled_fullgraph_skips_and_counts():
    layer = normkit.BatchNorm2d(3, momentum=None)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    good = _batch((4, 3, 5, 7), 1, torch.float32)
    compiled(good)
    before = _buffers(layer)
    bad = good.clone()
    bad[0, 1, 2, 3] = float("nan")
    compiled(bad)
    assert all(torch.equal(before[k], v) for k, v in _buffers(layer).items())
    assert int(layer.skipped_batches) == 1
    compiled(good)
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("policy", ["skip", "torch"])
def test_inductor_compiles_two_batchnorms_as_eager(policy):
    """Two BatchNorms in one Inductor graph (an MLP's training step): the output, the gradients and the
    running statistics equal eager normkit's, and a non-finite batch is still skipped (a form of the finite
    test fed into torch.where was miscompiled by torch 2.13's Inductor: the second layer's output drifted)."""
    old = normkit.set_nonfinite_policy(policy)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), normkit.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32),
                              normkit.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
        twin = copy.deepcopy(model)
        torch._dynamo.reset()
        compiled = torch.compile(twin)
        for step in range(3):
            x = torch.randn(8, 64) + step
            y, yc = model(x), compiled(x)
            torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
            y.square().sum().backward()
            yc.square().sum().backward()
        for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
        for (name, a), b in zip(model.named_buffers(), twin.buffers(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        if policy == "skip":
            before = {k: v.clone() for k, v in twin.state_dict().items()}
            compiled(torch.full((8, 64), float("nan")))
            assert all(torch.equal(before[k], v) for k, v in twin.state_dict().items())
            assert int(twin[1].skipped_batches) == 1
    finally:
        normkit.set_nonfinite_policy(old)


# ----------------------------------------------------------------------------- SyncBatchNorm, 2 ranks
def _sync_worker(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        layer = normkit.SyncBatchNorm(3).double()
        layer(_batch((3, 3, 4), 10 + rank))
        before = _buffers(layer)
        bad = _batch((3, 3, 4), 20 + rank)
        if rank == 1:
            bad[0, 2, 1] = float("inf")  # only rank 1 sees it; the merged statistics are non-finite
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer(bad)
        same = all(torch.equal(before[k], v) for k, v in _buffers(layer).items())
        out.put((rank, same, int(layer.skipped_batches), int(layer.num_batches_tracked)))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_sync_batchnorm_skips_on_every_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_sync_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(0, True, 1, 1), (1, True, 1, 1)]
