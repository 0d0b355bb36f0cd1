"""normkit.recalibrate: running statistics == exact statistics of all the data (float64 oracle)."""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import queue as queue_module
import time

import pytest
import torch
from torch import nn

import normkit
from normkit.tools.recalibrate import ChannelMoments


class BNAct2d(normkit.BatchNorm2d):
    """A fused BN + activation layer as normkit's are (``act`` attribute)."""

    def __init__(self, c, act="relu"):
        super().__init__(c)
        self.act = act

    def forward(self, x):
        return self._normalize(x, None, self.act)


def seq(*m):
    return nn.Sequential(*m)


def two_layer(bn, conv=nn.Conv2d):
    return lambda: seq(conv(3, 7, 3), bn(7), nn.ReLU(), nn.Dropout(0.5), conv(7, 5, 1), bn(5))


# name: (model factory, shape of one sample)
CASES = {
    "torch_bn1d_2d_input": (lambda: seq(nn.Linear(4, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3),
                                        nn.BatchNorm1d(3)), (4,)),
    "normkit_bn1d_3d_input": (two_layer(normkit.BatchNorm1d, nn.Conv1d), (3, 9)),
    "torch_bn2d": (two_layer(nn.BatchNorm2d), (3, 6, 5)),
    "normkit_bn2d": (two_layer(normkit.BatchNorm2d), (3, 6, 5)),
    "normkit_bn2d_fused_act": (two_layer(BNAct2d), (3, 6, 5)),
    "torch_bn3d": (two_layer(nn.BatchNorm3d, nn.Conv3d), (3, 4, 5, 3)),
    "normkit_bn3d": (two_layer(normkit.BatchNorm3d, nn.Conv3d), (3, 4, 5, 3)),
    "sync_bn_single_process": (two_layer(nn.SyncBatchNorm), (3, 6, 5)),
    "momentum_none": (two_layer(lambda c: normkit.BatchNorm2d(c, momentum=None)), (3, 6, 5)),
    "lazy_bn": (lambda: seq(nn.Conv2d(3, 7, 3), normkit.LazyBatchNorm2d()), (3, 6, 5)),
    "with_other_norms": (lambda: seq(nn.Conv2d(3, 8, 3), normkit.GroupNorm(2, 8), normkit.BatchNorm2d(8),
                                     normkit.InstanceNorm2d(8, track_running_stats=True), nn.BatchNorm2d(8),
                                     nn.Flatten(), normkit.LayerNorm(8 * 4 * 3), nn.RMSNorm(8 * 4 * 3)),
                         (3, 6, 5)),
}
if hasattr(normkit, "SyncBatchNorm"):
    CASES["normkit_sync_bn"] = (two_layer(normkit.SyncBatchNorm), (3, 6, 5))
BATCH_SIZES = (8, 5, 8, 3)  # uneven, and the batches have different means (see make_batches)


def make_batches(sample_shape, gen, sizes=BATCH_SIZES):
    """Batches whose means differ: pooled variance != mean of per-batch variances."""
    return [(float(i) + 3 + (0.5 + 0.3 * i) * torch.randn((n, *sample_shape), generator=gen), torch.zeros(n))
            for i, n in enumerate(sizes)]


def direct_statistics(model, batches):
    """Each BN's inputs captured whole (BN in training mode, rest eval), concatenated, then var_mean."""
    model = copy.deepcopy(model).eval()
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    seen = {name: [] for name in bns}
    for name, m in bns.items():
        m.train()
        m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(
            args[0].detach().to(torch.float64).transpose(0, 1).reshape(args[0].shape[1], -1)))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    out = {}
    for name, parts in seen.items():
        allv = torch.cat(parts, dim=1)
        var, mean = torch.var_mean(allv, dim=1, correction=1)
        out[name] = (mean, var)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_recalibrate_matches_direct_statistics(name):
    factory, shape = CASES[name]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = factory()
    batches = make_batches(shape, gen)
    model(batches[0][0])  # materialize lazy layers; moves running statistics away from data
    model.train()
    model[-1 if isinstance(model[-1], nn.modules.batchnorm._BatchNorm) else 0].eval()  # mixed flags
    flags = [m.training for m in model.modules()]
    others = {k: v.clone() for k, v in model.state_dict().items()}
    expected = direct_statistics(model, batches)
    assert expected, "the case has no BatchNorm"
    out = normkit.recalibrate(model, batches)
    assert out is model
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    for bn_name, (mean, var) in expected.items():
        bn = model.get_submodule(bn_name)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-6, atol=1e-6)
        assert int(bn.num_batches_tracked) == len(batches)
    for k, v in model.state_dict().items():  # nothing else changed (parameters, other norms' buffers)
        if not any(k.startswith(b + ".") for b in expected):
            assert torch.equal(v, others[k]), k


def test_exact_where_update_bn_is_wrong():
    """update_bn averages per-batch variances: it misses the spread of the batch means."""
    gen = torch.Generator().manual_seed(1)
    batches = [(10.0 * i + torch.randn(16, 3, 4, 4, generator=gen),) for i in range(4)]
    data = torch.cat([b[0] for b in batches]).double().transpose(0, 1).reshape(3, -1)
    var, mean = torch.var_mean(data, dim=1, correction=1)
    ours = normkit.recalibrate(seq(normkit.BatchNorm2d(3)), batches)[0]
    torch.testing.assert_close(ours.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_var.double(), var, rtol=1e-6, atol=1e-6)
    swa = seq(nn.BatchNorm2d(3))
    torch.optim.swa_utils.update_bn([b[0] for b in batches], swa)
    torch.testing.assert_close(swa[0].running_mean.double(), mean, rtol=1e-5, atol=1e-5)  # means agree
    assert (swa[0].running_var.double() - var).abs().min() > 50  # ~1 vs ~126: update_bn is far off


def test_large_mean_and_max_batches():
    gen = torch.Generator().manual_seed(2)
    batches = [1e4 + torch.randn(7, 33, generator=gen, dtype=torch.float64) for _ in range(5)]
    model = seq(normkit.BatchNorm1d(33, dtype=torch.float64))
    normkit.recalibrate(model, iter(batches), max_batches=3)
    var, mean = torch.var_mean(torch.cat(batches[:3]), dim=0, correction=1)
    torch.testing.assert_close(model[0].running_mean, mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(model[0].running_var, var, rtol=1e-9, atol=0)
    assert int(model[0].num_batches_tracked) == 3


def test_channel_moments_merge_is_concatenation():
    gen = torch.Generator().manual_seed(3)
    parts = [5 + torch.randn(n, 4, 3, generator=gen, dtype=torch.float64) for n in (1, 6, 2, 9)]
    mom = ChannelMoments()
    for p in parts:
        mom.add_batch(p)
    var, mean = torch.var_mean(torch.cat(parts).transpose(0, 1).reshape(4, -1), dim=1, correction=1)
    assert mom.count == 18 * 3
    torch.testing.assert_close(mom.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mom.unbiased_var(), var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batches, max_batches, message", [
    ([], None, "batches: expected at least one batch"),
    ([torch.randn(4, 3)], 0, "max_batches: expected a positive number"),
    (["not a tensor"], None, "batches: expected tensors or tuples"),
])
def test_bad_input_changes_nothing(batches, max_batches, message):
    model = seq(normkit.BatchNorm1d(3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=message):
        normkit.recalibrate(model, batches, max_batches=max_batches)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- across ranks (gloo)
class FakeSyncBatchNorm(nn.BatchNorm1d):
    """Local statistics in forward; recalibrate treats it as a SyncBatchNorm (by its name)."""

    process_group = None


def _rank_data(rank):
    gen = torch.Generator().manual_seed(10 + rank)
    sizes = [(5, 3, 1), (0,)][rank]  # uneven per rank; rank 1 has no data at all
    return [float(rank) * 4 + torch.randn(n, 3, generator=gen) for n in sizes]


class _Gate(nn.Module):
    """Passes batches of one row (or none) around the BN: they have no batch statistics."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return self.bn(x) if x.shape[0] > 1 else x


def _worker(rank, world, init_file, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bn = FakeSyncBatchNorm(3)
        batches = _rank_data(rank)
        model = _Gate(bn).train()
        normkit.recalibrate(model, batches)
        queue.put((rank, bn.running_mean.tolist(), bn.running_var.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_sync_batch_norm_merges_ranks(tmp_path):
    world = 2
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    queue = ctx.Queue()
    init_file = os.path.join(tmp_path, "store")
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, queue), daemon=True)
             for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    results = []
    try:
        _collect(procs, queue, results, world, start)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * world
    data = torch.cat([x for r in range(world) for x in _rank_data(r) if x.shape[0] > 1]).double()
    var, mean = torch.var_mean(data, dim=0, correction=1)
    assert len(results) == world
    for _, rmean, rvar in results:
        torch.testing.assert_close(torch.tensor(rmean, dtype=torch.float64), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.tensor(rvar, dtype=torch.float64), var, rtol=1e-6, atol=1e-6)


def _collect(procs, queue, results, world, start):
    while len(results) < world:  # poll, so a crashed worker fails the test at once
        try:
            results.append(queue.get(timeout=1))
        except queue_module.Empty:
            assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
            assert time.monotonic() - start < 90, "workers did not finish"
