"""End to end: one training step of a small ResNet, torch.nn norms vs ``normkit.convert(fuse=True)``.

The model (He et al., 2016, CIFAR-style): a 3×3 stem, three stages of two BasicBlocks (32, 64,
128 channels, stride 2 between stages), global average pooling, a linear head; every
``conv → BN → ReLU`` is an ``nn.Sequential`` (so ``convert(fuse=True)`` fuses it), the block tail
is ``relu(bn(conv(h)) + shortcut)``. Batch 128 of 32×32×3 inputs, cross-entropy, SGD with
momentum. Both models start from the same weights and see the same batches; the losses of the
first steps are compared (same math, fp32 rounding only) and the step times are paired.

If ``normkit.fold`` exists (BN folded into the preceding conv), inference of the folded copy is
timed against the unfolded eval model too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import normkit

from .timing import Clock, paired, summary


def _cbr(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.first = _cbr(cin, cout, stride)
        self.conv = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.bn(self.conv(self.first(x))) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, widths=(32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        layers = [_cbr(3, widths[0], 1)]
        cin = widths[0]
        for i, w in enumerate(widths):
            layers += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def run(device: str, batch: int, rounds: int, channels_last: bool = False,
        widths: tuple[int, ...] = (32, 64, 128)) -> list[dict]:
    """Records for the training step (and the folded-inference row when ``normkit.fold`` exists)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    base = SmallResNet(widths).to(device).to(memory_format=fmt)
    models = {"torch": base, "normkit": normkit.convert(copy.deepcopy(base), fuse=True)}
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 3, 32, 32, generator=g).to(device).contiguous(memory_format=fmt),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(4)]
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in models.items()}
    clock = Clock(device)
    losses: dict[str, list[float]] = {k: [] for k in models}

    def train_step(name):
        model, opt = models[name], opts[name]
        counter = [0]

        def step():
            x, y = data[counter[0] % len(data)]
            counter[0] += 1
            holder = {}

            def body():
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                holder["loss"] = loss

            t = clock.time(body)
            losses[name].append(float(holder["loss"].detach()))
            return t
        return step

    for m in models.values():
        m.train()
    # the same first three steps on both models: losses must agree to fp32 rounding
    first = {k: train_step(k) for k in models}
    for _ in range(3):
        for k in models:
            first[k]()
    loss_diff = max(abs(a - b) for a, b in zip(losses["torch"], losses["normkit"], strict=True))
    times = paired({k: train_step(k) for k in models}, rounds=rounds, warmup=1)
    shape = [batch, 3, 32, 32]
    out = [_record("ResNet train step", shape, device, times,
                   {"first_losses": {k: v[:3] for k, v in losses.items()}, "max_loss_diff": loss_diff},
                   "channels_last" if channels_last else "nchw")]
    if hasattr(normkit, "fold"):
        evals = {"unfolded": copy.deepcopy(base).eval(), "folded": normkit.fold(copy.deepcopy(base).eval())}
        x = data[0][0]

        def infer(m):
            def step():
                with torch.no_grad():
                    return clock.time(lambda: m(x))
            return step

        with torch.no_grad():
            fold_diff = float((evals["unfolded"](x) - evals["folded"](x)).abs().max())
        t = paired({k: infer(m) for k, m in evals.items()}, rounds=rounds, warmup=1)
        out.append(_record("ResNet eval: folded vs unfolded", shape, device,
                           {"torch": t["unfolded"], "normkit": t["folded"]}, {"max_output_diff": fold_diff},
                           "channels_last" if channels_last else "nchw"))
    return out


def _record(op, shape, device, times, extra, layout) -> dict:
    base = summary(times["torch"])["median_ms"]
    impls = {}
    for name, ts in times.items():
        s = summary(ts)
        impls[name] = {**s, "times_ms": [t * 1e3 for t in ts], "speedup_vs_torch": base / s["median_ms"]}
    return {"op": op, "op_key": "e2e", "mode": "step", "shape": shape, "layout": layout, "dtype": "float32",
            "device": device, "impls": impls, **extra}
