"""Where the time of the bench's small-ResNet training step goes (torch.profiler, self CPU time).

    python scripts/profile_resnet.py [--batch 128] [--steps 3]

Prints the top ops per model (torch.nn vs ``normkit.convert(fuse=True)``) and the share of the
step spent in normalization, activation and residual-add ops: the most any norm library can
save on this model (Amdahl), next to the convolutions it cannot touch.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import normkit
from normkit.bench.e2e import SmallResNet

# ops whose time a normalization library can change: norms, the (fused) ReLU, the residual add
# (aten::add; the optimizer's in-place aten::add_ is not counted)
_NORM_LIKE = ("batch_norm", "normkit::", "GeneratedBackwardFor_normkit", "threshold_backward", "clamp_min", "relu")


def _norm_like(key: str) -> bool:
    return key == "aten::add" or any(k in key for k in _NORM_LIKE)


def _step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = SmallResNet()
    models = {"torch.nn": base, "normkit (fuse=True)": normkit.convert(copy.deepcopy(base), fuse=True)}
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    for name, model in models.items():
        step = _step_fn(model, x, y)
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        norm = sum(e.self_cpu_time_total for e in events if _norm_like(e.key))
        conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
        print(f"{name}: {total / args.steps / 1e3:.0f} ms/step; norm+act+add {100 * norm / total:.1f}%, "
              f"convolutions {100 * conv / total:.1f}%")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]:
            print(f"   {e.key[:60]:<60} {e.self_cpu_time_total / args.steps / 1e3:8.1f} ms/step")


if __name__ == "__main__":
    main()
