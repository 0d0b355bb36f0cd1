"""normkit on DTensor: sequence/tensor parallel norms and FSDP2 + TP, equal to torch.nn on the same mesh.

Real processes (``torch.multiprocessing.spawn``, gloo on 127.0.0.1): every rank runs every case of its
world on the same data, once with torch.nn's layer and once with normkit's twin, both parallelized the
same way, and records the largest difference of outputs (as full tensors), input and parameter
gradients, or both layers' errors when torch refuses the case. The parent asserts per named case:

* ``SequenceParallel()`` LayerNorm / RMSNorm (input sharded on the sequence dimension, as torchtitan
  shards its norms), forward and backward;
* replicated and batch-sharded DTensor inputs to every norm (BatchNorm, GroupNorm, InstanceNorm,
  LayerNorm2d, the functional forms): torch's result and sharding, or torch's kind of error;
* a small Transformer (RMSNorm and LayerNorm blocks) under FSDP2 (``fully_shard``) and tensor parallel
  (``ColwiseParallel`` / ``RowwiseParallel``, ``SequenceParallel`` norms) on a 2 × 2 mesh, trained
  three steps: losses and gradients equal torch.nn's.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.distributed

tensor_api = pytest.importorskip("torch.distributed.tensor")
parallel_api = pytest.importorskip("torch.distributed.tensor.parallel")
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(t):
    return t.full_tensor() if isinstance(t, tensor_api.DTensor) else t


def _err(a, b) -> float:
    a, b = _full(a), _full(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _outcome(make, x_of):
    """(output, input grad, parameter grads) of ``make()`` on ``x_of()``, or the error it raised."""
    try:
        layer = make()
        x = x_of().detach().requires_grad_()
        y = layer(x)
        _full(y).square().sum().backward() if not isinstance(y, tensor_api.DTensor) else \
            y.square().sum().backward()
        return y, x.grad, [p.grad for p in layer.parameters()], None
    except Exception as err:  # noqa: BLE001 - torch's refusal is an outcome to match
        return None, None, None, err


def _compare(name, torch_make, ours_make, x_of, results):
    want, got = _outcome(torch_make, x_of), _outcome(ours_make, x_of)
    if want[3] is not None or got[3] is not None:
        results[name] = {"torch_error": repr(want[3]) if want[3] else None,
                         "ours_error": repr(got[3]) if got[3] else None,
                         "same_kind": want[3] is not None and got[3] is not None}
        return
    errs = [_err(want[0], got[0]), _err(want[1], got[1])]
    errs += [_err(a, b) for a, b in zip(want[2], got[2], strict=True) if a is not None or b is not None]
    placements = [str(getattr(t, "placements", None)) for t in (want[0], got[0])]
    results[name] = {"err": max(errs), "placements": placements}


def _layer_pair(torch_cls, ours_cls, *args, **kwargs):
    torch.manual_seed(0)
    ref = torch_cls(*args, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    ours = ours_cls(*args, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _sequence_parallel_cases(mesh, results):
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    torch.manual_seed(1)
    x = 3 + torch.randn(2, 8, 16)  # (batch, sequence, hidden): the sequence is split over the ranks
    for name, pair in {"sp_layer_norm": (nn.LayerNorm, normkit.LayerNorm, 16),
                       "sp_rms_norm": (nn.RMSNorm, normkit.RMSNorm, 16)}.items():
        ref, ours = _layer_pair(*pair)
        parallelize_module(ref, mesh, SequenceParallel())
        parallelize_module(ours, mesh, SequenceParallel())
        _compare(name, lambda ref=ref: ref, lambda ours=ours: ours, lambda: x.clone(), results)


def _dtensor_input_cases(mesh, results):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(2)
    images = 1 + torch.randn(4, 6, 5, 5)
    rows = 1 + torch.randn(4, 6, 10)
    layers = {
        "batch_norm_2d": (nn.BatchNorm2d, normkit.BatchNorm2d, (6,), images),
        "group_norm": (nn.GroupNorm, normkit.GroupNorm, (3, 6), images),
        "instance_norm_2d": (nn.InstanceNorm2d, normkit.InstanceNorm2d, (6,), images),
        "layer_norm": (nn.LayerNorm, normkit.LayerNorm, (10,), rows),
        "rms_norm": (nn.RMSNorm, normkit.RMSNorm, (10,), rows),
    }
    for placement in (Replicate(), Shard(0)):
        tag = "replicate" if isinstance(placement, Replicate) else "shard0"
        for name, (torch_cls, ours_cls, args, data) in layers.items():
            for mode in ("train", "eval"):
                ref, ours = _layer_pair(torch_cls, ours_cls, *args)
                ref.train(mode == "train"), ours.train(mode == "train")

                def x_of(data=data, placement=placement):
                    return distribute_tensor(data.clone(), mesh, [placement])

                _compare(f"{name}_{tag}_{mode}", lambda ref=ref: ref, lambda ours=ours: ours, x_of, results)
        # LayerNorm2d against torch's permute form
        ref, ours = _layer_pair(nn.LayerNorm, normkit.LayerNorm2d, 6)

        class Permuted(nn.Module):
            def __init__(self, ln):
                super().__init__()
                self.ln = ln

            def forward(self, x):
                return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

        _compare(f"layer_norm_2d_{tag}", lambda ref=ref: Permuted(ref), lambda ours=ours: ours,
                 lambda placement=placement: distribute_tensor(images.clone(), mesh, [placement]), results)


class _Block(nn.Module):
    def __init__(self, dim: int, norm: type[nn.Module]):
        super().__init__()
        self.attention_norm = norm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = norm(dim)
        self.w1 = nn.Linear(dim, 2 * dim, bias=False)
        self.w2 = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x):
        h = x + self.wo(torch.tanh(self.wq(self.attention_norm(x))))
        return h + self.w2(torch.relu(self.w1(self.ffn_norm(h))))


class _Transformer(nn.Module):
    def __init__(self, rms: bool, layer_norm, rms_norm):
        super().__init__()
        norm = rms_norm if rms else layer_norm
        self.layers = nn.ModuleList(_Block(16, norm) for _ in range(2))
        self.norm = norm(16)
        self.out = nn.Linear(16, 5, bias=False)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.out(self.norm(x))


def _fsdp_tp_cases(mesh2d, results):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp, dp = mesh2d["tp"], mesh2d["dp"]
    for rms in (True, False):
        losses, grads = {}, {}
        for kind, (ln, rn) in {"torch": (nn.LayerNorm, nn.RMSNorm),
                               "normkit": (normkit.LayerNorm, normkit.RMSNorm)}.items():
            torch.manual_seed(3)
            model = _Transformer(rms, ln, rn)
            for block in model.layers:
                parallelize_module(block, tp, {
                    "attention_norm": SequenceParallel(),
                    "wq": ColwiseParallel(input_layouts=Shard(1)),
                    "wo": RowwiseParallel(output_layouts=Shard(1)),
                    "ffn_norm": SequenceParallel(),
                    "w1": ColwiseParallel(input_layouts=Shard(1)),
                    "w2": RowwiseParallel(output_layouts=Shard(1)),
                })
                fully_shard(block, mesh=dp)
            parallelize_module(model, tp, {"norm": SequenceParallel(),
                                           "out": ColwiseParallel(input_layouts=Shard(1),
                                                                  output_layouts=Replicate())})
            fully_shard(model, mesh=dp)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            gen = torch.Generator().manual_seed(4 + dp.get_local_rank())
            steps = []
            for _ in range(3):
                x = torch.randn(2, 8, 16, generator=gen)
                target = torch.randn(2, 8, 5, generator=gen)
                # the block stack starts with this rank's part of the sequence, as after torchtitan's
                # sequence-parallel embedding
                tokens = x.chunk(tp.size(), dim=1)[tp.get_local_rank()]
                loss = nn.functional.mse_loss(_full(model(tokens)), target)
                opt.zero_grad()
                loss.backward()
                steps.append(float(loss))
                opt.step()
            losses[kind] = steps
            grads[kind] = [_full(p.grad).clone() for p in model.parameters()]
        name = "fsdp2_tp_rms" if rms else "fsdp2_tp_layer_norm"
        err = max(abs(a - b) for a, b in zip(losses["torch"], losses["normkit"], strict=True))
        err = max([err] + [_err(a, b) for a, b in zip(grads["torch"], grads["normkit"], strict=True)])
        results[name] = {"err": err, "losses": losses}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    results: dict = {}
    try:
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        from torch.distributed.device_mesh import init_device_mesh

        if world == 2:
            mesh = init_device_mesh("cpu", (2,))
            _sequence_parallel_cases(mesh, results)
            _dtensor_input_cases(mesh, results)
        else:
            _fsdp_tp_cases(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")), results)
    except Exception:  # noqa: BLE001 - reported to the parent
        results["__crash__"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(world: int, tmp_path) -> dict:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(world)]
    for r in results:
        assert "__crash__" not in r, r["__crash__"]
    return results[0]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _run(2, tmp_path_factory.mktemp("dtensor2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _run(4, tmp_path_factory.mktemp("dtensor4"))


@pytest.mark.parametrize("name", ["sp_layer_norm", "sp_rms_norm"])
def test_sequence_parallel_norms_equal_torch(world2, name):
    r = world2[name]
    assert "err" in r, r
    assert r["err"] <= TOL and r["placements"][0] == r["placements"][1]


def test_dtensor_inputs_give_torchs_result_or_torchs_error(world2):
    cases = {k: v for k, v in world2.items() if not k.startswith("sp_")}
    assert len(cases) == 2 * (5 * 2 + 1)
    for name, r in cases.items():
        if "err" in r:
            assert r["err"] <= TOL and r["placements"][0] == r["placements"][1], (name, r)
        else:
            assert r["same_kind"], (name, r)


@pytest.mark.parametrize("name", ["fsdp2_tp_rms", "fsdp2_tp_layer_norm"])
def test_fsdp2_and_tensor_parallel_train_as_torch(world4, name):
    assert world4[name]["err"] <= TOL, world4[name]
