"""SyncBatchNorm against single-process torch.nn.BatchNorm on the concatenated batch.

Real processes: one ``torch.multiprocessing.spawn`` per world size (2 and 3 ranks), gloo on
127.0.0.1. Every rank runs every case of its world (data below), in float64:
each rank gets its slice of a global batch (uneven sizes, an empty rank, one sample per rank),
and after every training step its output, its input gradient, the parameter gradients summed
over ranks and the running statistics must equal torch.nn.BatchNorm run in one process on the
whole batch, within 1e-9; then eval outputs. The workers record the largest error per case and
the parent asserts per named case. Local tests cover the not-distributed path and conversion.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normkit
from normkit import SyncBatchNorm
from normkit.nn import SyncBatchNormAct

TOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Case:
    world: int
    sizes: tuple[int, ...]  # samples on each rank
    tail: tuple[int, ...]  # (C, *spatial)
    kwargs: dict = dataclasses.field(default_factory=dict)
    channels_last: bool = False
    act: str = ""  # SyncBatchNormAct with a residual when set
    steps: int = 3
    expect_error: bool = False
    large_mean: bool = False
    float32: bool = False  # float32: at most 2× single-process normkit.BatchNorm's error vs the float64 truth


CASES = {
    "w2_uneven_4d": Case(2, (5, 2), (3, 5, 7)),
    "w2_one_sample_per_rank": Case(2, (1, 1), (7,)),
    "w2_channels_last": Case(2, (3, 4), (7, 3, 5), channels_last=True),
    "w2_momentum_none_not_affine": Case(2, (2, 3), (3, 9), {"momentum": None, "affine": False}, steps=4),
    "w2_relu_residual": Case(2, (3, 2), (5, 4, 3), act="relu"),
    "w2_large_mean": Case(2, (4, 3), (33,), large_mean=True),
    "w2_global_count_1": Case(2, (1, 0), (3,), expect_error=True),
    "w3_empty_rank": Case(3, (4, 0, 3), (3, 5)),
    "w3_uneven_5d": Case(3, (1, 3, 2), (3, 2, 3, 4)),
    "w3_no_running_stats": Case(3, (2, 2, 1), (7, 4), {"track_running_stats": False}),
    "w2_float32_large_mean": Case(2, (5, 3), (7, 4, 3), large_mean=True, float32=True),
    "w3_float32_empty_rank": Case(3, (3, 0, 4), (5, 6), float32=True),
}


def torch_bn(case: Case) -> nn.Module:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}[len(case.tail)]
    return cls(case.tail[0], **case.kwargs, dtype=torch.float64)


def randomize(layer: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if not name.endswith("num_batches_tracked"):
                noise = torch.rand(t.shape, generator=gen, dtype=t.dtype)
                t.copy_(0.5 + noise if ("weight" in name or "var" in name) else noise - 0.5)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def run_case_float32(case: Case, rank: int) -> dict:
    """float32: per compared tensor, how far our error (vs the float64 truth) exceeds 2× the error of
    single-process normkit BatchNorm (same kernels, whole batch) — distributing must cost no accuracy.
    (torch.nn's CPU BatchNorm accumulates float32 statistics in float64; that comparison is the core's.)"""
    gen = torch.Generator().manual_seed(sum(case.sizes) * 7 + len(case.tail))
    truth = torch_bn(case)
    randomize(truth, gen)
    theirs = getattr(normkit, type(truth).__name__)(case.tail[0], **case.kwargs)
    theirs.load_state_dict(truth.state_dict())
    ours = SyncBatchNorm(case.tail[0], **case.kwargs)
    ours.load_state_dict(truth.state_dict())
    lo, hi = sum(case.sizes[:rank]), sum(case.sizes[: rank + 1])
    excess: dict[str, float] = {}

    def compare(what: str, mine: torch.Tensor, torch32: torch.Tensor, exact: torch.Tensor) -> None:
        err_ours, err_torch = _max_err(mine.double(), exact), _max_err(torch32.double(), exact)
        floor = 1e-6 * max(exact.abs().max().item() if exact.numel() else 0.0, 1.0)
        excess[what] = max(excess.get(what, 0.0), err_ours - 2 * err_torch - floor, 0.0)

    for _ in range(case.steps):
        x = torch.randn((sum(case.sizes), *case.tail), generator=gen, dtype=torch.float64)
        x = ((1e4 + x) if case.large_mean else (3.0 + 0.5 * x)).float()
        dy = torch.randn(x.shape, generator=gen)
        inputs = [x[lo:hi].clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
        outs = [layer(inp) for layer, inp in zip((ours, theirs, truth), inputs, strict=True)]
        for out in outs:
            out.backward(dy[lo:hi] if out is outs[0] else dy.to(out.dtype))
        compare("y", outs[0].detach(), outs[1].detach()[lo:hi], outs[2].detach()[lo:hi])
        compare("dx", inputs[0].grad, inputs[1].grad[lo:hi], inputs[2].grad[lo:hi])
        for name, p in ours.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)
            compare("d" + name, grad, theirs.get_parameter(name).grad, truth.get_parameter(name).grad)
            for layer in (ours, theirs, truth):
                layer.get_parameter(name).grad = None
        for key, value in truth.state_dict().items():
            if "num_batches" not in key:
                compare(key, ours.state_dict()[key], theirs.state_dict()[key], value)
    return {"errors": excess}


def run_case(case: Case, rank: int, group_of_one) -> dict:
    """One case on this rank: the largest error over every compared tensor (or the error raised)."""
    if case.float32:
        return run_case_float32(case, rank)
    gen = torch.Generator().manual_seed(len(case.sizes) * 1000 + sum(case.sizes) * 10 + len(case.tail))
    ref = torch_bn(case)
    randomize(ref, gen)
    cls = SyncBatchNormAct if case.act else SyncBatchNorm
    extra = {"act": case.act} if case.act else {}
    ours = cls(case.tail[0], **case.kwargs, **extra, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    lo, hi = sum(case.sizes[:rank]), sum(case.sizes[: rank + 1])
    total = sum(case.sizes)
    errors: dict[str, float] = {}

    def note(what: str, err: float) -> None:
        errors[what] = max(errors.get(what, 0.0), err)

    def batch() -> torch.Tensor:
        x = torch.randn((total, *case.tail), generator=gen, dtype=torch.float64)
        x = (1e4 + x) if case.large_mean else (3.0 + 0.5 * x)
        return x.contiguous(memory_format=torch.channels_last) if case.channels_last else x

    if case.expect_error:
        x = batch()
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        try:
            ours(x[lo:hi])
        except normkit.NormInputError as err:
            changed = [k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])]
            return {"raised": str(err), "changed": changed}
        return {"raised": None}

    for _ in range(case.steps):
        x, dy, res = batch(), torch.randn((total, *case.tail), generator=gen, dtype=torch.float64), None
        if case.act:
            res = torch.randn((total, *case.tail), generator=gen, dtype=torch.float64)
        x_all = x.clone().requires_grad_()
        y_all = ref(x_all)
        if case.act:
            y_all = torch.relu(y_all + res)
        y_all.backward(dy)
        x_mine = x[lo:hi].clone().requires_grad_()
        y_mine = ours(x_mine, None if res is None else res[lo:hi])
        y_mine.backward(dy[lo:hi])
        note("y", _max_err(y_mine.detach(), y_all.detach()[lo:hi]))
        note("dx", _max_err(x_mine.grad, x_all.grad[lo:hi]))
        if case.channels_last and y_mine.numel():
            note("y_not_channels_last", float(not y_mine.is_contiguous(memory_format=torch.channels_last)))
        for name, p in ours.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)  # what DistributedDataParallel does (then divides by the world size)
            note("d" + name, _max_err(grad, ref.get_parameter(name).grad))
            p.grad, ref.get_parameter(name).grad = None, None
        for key, value in ref.state_dict().items():
            mine = ours.state_dict()[key]
            note(key, float(not torch.equal(mine, value)) if "num_batches" in key else _max_err(mine, value))
    ref.eval(), ours.eval()
    x = batch()
    # eval uses the running statistics, or (track_running_stats=False) this rank's own batch, as torch
    expected = ref(x)[lo:hi] if ref.track_running_stats else ref(x[lo:hi])
    note("eval_y", _max_err(ours(x[lo:hi]).detach(), expected.detach()))
    # A group of one rank is plain BatchNorm: bit for bit normkit.BatchNorm's result.
    ours.train()
    ours.process_group = group_of_one
    twin_cls = {2: normkit.BatchNorm1d, 3: normkit.BatchNorm1d, 4: normkit.BatchNorm2d, 5: normkit.BatchNorm3d}
    twin = twin_cls[len(case.tail) + 1](case.tail[0], **case.kwargs, dtype=torch.float64)
    twin.load_state_dict(ours.state_dict())
    x = batch()[: max(hi - lo, 2)]
    y_twin = twin(x)
    if case.act:
        y_twin = torch.relu(y_twin)
    note("group_of_one_not_bitwise_bn", float(not torch.equal(ours(x), y_twin)))
    return {"errors": errors}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
        results = {}
        with normkit.backend("reference"):
            for name, case in CASES.items():
                if case.world != world:
                    continue
                try:
                    results[name] = run_case(case, rank, groups[rank])
                except Exception:  # recorded per case: one failure must not hide the others
                    results[name] = {"exception": traceback.format_exc()}
                dist.barrier()
        if world == 2:  # the example: DistributedDataParallel + SyncBatchNorm, in this same world
            from normkit.examples import ddp_syncbn

            try:
                results["ddp_example"] = ddp_syncbn.run(ddp_syncbn.parse_args(["--steps", "4"]), log=lambda m: None)
            except Exception:
                results["ddp_example"] = {"exception": traceback.format_exc()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world: int, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp(f"world{world}")
    # spawn, not fork: numba's OpenMP pool (cpu backend) does not survive fork(), so forked ranks would
    # silently fall back to the reference backend instead of testing the default kernels.
    mp.start_processes(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True, start_method="spawn")
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = _run_world(world, tmp_path_factory)
        return cache[world]

    return get


@pytest.mark.distributed
@pytest.mark.parametrize("case_name", list(CASES))
def test_sync_batchnorm_equals_batchnorm_on_concatenated_batch(case_name, worlds):
    case = CASES[case_name]
    per_rank = [r[case_name] for r in worlds(case.world)]
    for rank, result in enumerate(per_rank):
        assert "exception" not in result, f"rank {rank}:\n{result['exception']}"
        if case.expect_error:
            assert result["raised"] is not None, f"rank {rank} did not refuse a global count of 1"
            assert "1 value per channel in total over 2 ranks" in result["raised"]
            assert "GroupNorm" in result["raised"] and "eval()" in result["raised"]
            assert result["changed"] == [], f"rank {rank}: a refused batch changed {result['changed']}"
            continue
        bad = {k: v for k, v in result["errors"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: errors above {TOL}: {bad}"


# ----------------------------------------------------------------------------- local (no spawn)
@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 9), (3, 5, 4, 7), (2, 5, 3, 2, 4)], ids=["2d", "3d", "4d", "5d"])
def test_not_distributed_is_exactly_batchnorm(shape):
    gen = torch.Generator().manual_seed(7)
    x = 3 + 0.5 * torch.randn(shape, generator=gen)
    twin = {2: normkit.BatchNorm1d, 3: normkit.BatchNorm1d, 4: normkit.BatchNorm2d, 5: normkit.BatchNorm3d}
    bn = twin[len(shape)](5)
    randomize(bn, gen)
    sbn = SyncBatchNorm(5)
    sbn.load_state_dict(bn.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = bn(xa), sbn(xb)
    dy = torch.randn(shape, generator=gen)
    ya.backward(dy), yb.backward(dy)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad) and torch.equal(bn.weight.grad, sbn.weight.grad)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, sbn.state_dict()[key]), key
    bn.eval(), sbn.eval()
    assert torch.equal(bn(x), sbn(x))


def test_state_dict_is_torch_sync_batchnorm_and_batchnorm():
    ours = SyncBatchNorm(7)
    for twin in (nn.SyncBatchNorm(7), nn.BatchNorm2d(7)):
        randomize(twin, torch.Generator().manual_seed(1))
        ours.load_state_dict(twin.state_dict(), strict=True)
        twin.load_state_dict(ours.state_dict(), strict=True)
        assert list(ours.state_dict()) == list(twin.state_dict())
    assert repr(ours) == repr(nn.SyncBatchNorm(7))
    # not a torch.nn.SyncBatchNorm: DistributedDataParallel refuses those in CPU modules
    assert not isinstance(ours, nn.SyncBatchNorm) and isinstance(ours, nn.modules.batchnorm._BatchNorm)


def test_channels_last_kept_and_one_value_refused_locally():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert SyncBatchNorm(3)(x).is_contiguous(memory_format=torch.channels_last)
    layer = SyncBatchNorm(3)
    with pytest.raises(normkit.NormInputError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    assert int(layer.num_batches_tracked) == 0
    with pytest.raises(normkit.NormInputError, match="at least 2D"):
        layer(torch.randn(3))


class _FusedBN(nn.BatchNorm2d):
    """Stands in for a fused norm + activation layer: a BatchNorm with an ``act`` attribute."""

    def __init__(self, c, act):
        super().__init__(c)
        self.act = act

    def forward(self, x, residual=None):
        return nn.functional.silu(super().forward(x) + (0 if residual is None else residual))


def test_convert_sync_batchnorm_keeps_tensors_and_activation():
    renorm = normkit.BatchRenorm2d(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), normkit.BatchNorm2d(4), nn.SyncBatchNorm(4),
        nn.Sequential(nn.BatchNorm1d(4), _FusedBN(4, "silu"), _FusedBN(4, nn.ReLU())), renorm,
    )
    model.eval()
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.warns(UserWarning, match="left BatchRenorm2d alone"):
        out = SyncBatchNorm.convert_sync_batchnorm(model, process_group="pg")
    assert out is model
    kinds = [type(m) for m in (model[1], model[2], model[3], model[4][0], model[4][1], model[4][2], model[5])]
    assert kinds == [SyncBatchNorm] * 4 + [SyncBatchNormAct] * 2 + [normkit.BatchRenorm2d]
    assert all(m.process_group == "pg" for m in model.modules() if isinstance(m, SyncBatchNorm))
    assert model[4][1].act == "silu" and isinstance(model[4][2].act, nn.ReLU) and not model[1].training
    for key, value in model.state_dict(keep_vars=True).items():
        assert value is tensors[key], key  # the same tensors: an optimizer built before still works
    # Not distributed, the fused layer computes act(bn(x) + residual).
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ref = _FusedBN(4, "silu").eval()
    ref.load_state_dict(model[4][1].state_dict())
    torch.testing.assert_close(model[4][1](x, r), ref(x, r))
    torch.testing.assert_close(model[4][2](x), torch.relu(nn.functional.batch_norm(
        x, model[4][2].running_mean, model[4][2].running_var, model[4][2].weight, model[4][2].bias)))


def test_convert_and_back_via_normkit_convert():
    model = nn.Sequential(nn.SyncBatchNorm(3))
    normkit.convert(model)
    assert type(model[0]) is SyncBatchNorm
    normkit.convert(model, to="torch")
    assert type(model[0]) is nn.SyncBatchNorm


@pytest.mark.distributed
def test_ddp_example_trains_with_distributed_data_parallel(worlds):
    """normkit.examples.ddp_syncbn's training loop (what ``torchrun ... -m normkit.examples.ddp_syncbn`` runs)."""
    for rank, result in enumerate(r["ddp_example"] for r in worlds(2)):
        assert "exception" not in result, f"rank {rank}:\n{result['exception']}"
        assert result["sync_layers"] == 2 and result["same_running_stats"]
        assert len(result["losses"]) == 4 and all(0 < v < 10 for v in result["losses"])
