"""DistributedDataParallel + SyncBatchNorm on CPU (gloo): a small CNN on scikit-learn's digits.

Run with two processes::

    torchrun --nproc_per_node=2 -m normkit.examples.ddp_syncbn [--steps 60] [--batch 16]

Each rank draws its own mini-batch of ``--batch`` images per step (the global batch is
``world_size × batch``); the model's BatchNorm2d layers are converted with
``normkit.SyncBatchNorm.convert_sync_batchnorm`` so every rank normalizes with the statistics
of the global batch, and DDP averages the gradients. Rank 0 prints the loss every few steps and
the test accuracy at the end; every rank holds the same running statistics. Falls back to
random data when scikit-learn is missing. Takes a few seconds. ``--local-bn`` keeps per-rank
BatchNorm instead, for comparison (each rank then normalizes with its own ``--batch`` samples, and
the ranks' running statistics differ).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import normkit


def load_data(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # random images, random labels: the loss still goes down (memorisation)
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(512, 1, 8, 8, generator=gen), torch.randint(0, 10, (512,), generator=gen), "random data"
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target), "scikit-learn digits"


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10),
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16, help="samples per rank and step")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local-bn", action="store_true",
                        help="for comparison: keep per-rank BatchNorm (statistics of each rank's own batch)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, log=print) -> dict:
    """Train in the already initialised default process group; rank 0 logs. Returns the figures."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = normkit.convert(make_cnn())  # torch.nn.BatchNorm2d → normkit.BatchNorm2d
    if not args.local_bn:
        model = normkit.SyncBatchNorm.convert_sync_batchnorm(model)
    n_sync = sum(isinstance(m, normkit.SyncBatchNorm) for m in model.modules())
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    x, y, source = load_data(args.seed)
    n_test = len(x) // 5
    x_test, y_test, x_train, y_train = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    say = log if rank == 0 else (lambda *a, **k: None)
    say(f"{world} ranks (gloo, CPU), {n_sync} SyncBatchNorm layers, {source}: {len(x_train)} train / "
        f"{n_test} test images, global batch {world * args.batch}")
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own samples
    start = time.perf_counter()
    losses = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=gen)
        loss = nn.functional.cross_entropy(ddp(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world)
        if step == 1 or step % 10 == 0 or step == args.steps:
            say(f"step {step:4d}  loss {losses[-1]:.4f}")
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    # Every rank normalized with the same global statistics, so the running statistics agree.
    stats = torch.cat([m.running_var for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    seconds = time.perf_counter() - start
    say(f"test accuracy {acc:.3f}; running statistics identical on all ranks: {same}; {seconds:.1f}s "
        f"({1000 * seconds / args.steps:.0f} ms/step)")
    return {"losses": losses, "accuracy": acc, "same_running_stats": same, "sync_layers": n_sync}


def main(argv=None) -> int:
    args = parse_args(argv)
    dist.init_process_group("gloo")  # torchrun provides RANK, WORLD_SIZE, MASTER_ADDR/PORT
    try:
        result = run(args, log=lambda msg: print(msg, flush=True))
    finally:
        dist.destroy_process_group()
    return 0 if result["same_running_stats"] or args.local_bn else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
