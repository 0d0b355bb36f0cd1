"""``normkit bench --suite models``, group ``inplace``: memory and time of in-place activated BatchNorm.

Three networks, each as torch.nn builds it and after ``normkit.convert(model, inplace=True)``
(:mod:`normkit.tools.inplace`: BatchNorm → LeakyReLU pairs and BatchNorms feeding only a convolution become
:class:`normkit.InPlaceABN`; the function is unchanged):

* ``preact_resnet_leaky`` — a pre-activation ResNet (He et al., "Identity Mappings in Deep Residual Networks",
  2016; the WideResNet family InPlace-ABN was introduced with): a 3×3 stem, three stages of two blocks
  ``x + conv(act(bn(conv(act(bn(x))))))`` with LeakyReLU(0.01), a final BN → LeakyReLU, pooling, a linear head;
* ``resnet_leaky`` — the post-activation ResNet of :mod:`.e2e` with LeakyReLU(0.01): ``conv → BN → act`` and the
  block tail ``act(bn(conv(h)) + shortcut)``, whose BatchNorm feeds the add (not swapped);
* ``efficientnet_block`` — EfficientNet-style MBConv stages (Tan & Le, 2019): ``conv1×1 → BN → SiLU →
  depthwise 3×3 → BN → SiLU → conv1×1 → BN`` (projection, identity activation), residual where the shape
  allows; only the projection BatchNorms that feed the next block's convolution are swapped (SiLU is not
  invertible, a projection feeding a residual add keeps its input anyway).

For each, one record with: the first training steps' loss and gradients compared (max difference),
bytes autograd saves for backward (:func:`normkit.bench.models.saved_bytes`: every save, and distinct
storages), the peak memory of one training step, and paired step times (torch ÷ normkit > 1: normkit faster).

**Peak memory** is measured in a fresh process per model (``python -m normkit.bench.inplace``): Linux's
resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) over one training step (forward,
loss, backward, SGD step) after two warm-up steps, minus the resident memory just before it — so parameters,
gradients and optimizer state present between steps are not counted, every tensor the step allocates is.
glibc's mmap threshold is set to 64 KiB in that process so that freed tensors go back to the system at once
(otherwise a freed tensor's pages stay resident and hide the next allocation). It is whole-process accounting
(CPU tensors and allocator slack), not a tensor census; it needs Linux (elsewhere the field is None).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import torch
from torch import nn

import normkit

from .timing import Clock, paired, summary

_CLASSES = 10


# ----------------------------------------------------------------------------- the networks
class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, slope: float = 0.01) -> None:
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin), nn.LeakyReLU(slope)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), nn.LeakyReLU(slope)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        a = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(self.act2(self.bn2(self.conv1(a)))) + shortcut


class PreActResNet(nn.Module):
    def __init__(self, widths=(32, 64, 128), classes: int = _CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [PreActBlock(cin, w, 1 if i == 0 else 2), PreActBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn, self.act = nn.BatchNorm2d(cin), nn.LeakyReLU(0.01)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.act(self.bn(self.blocks(self.stem(x)))).mean(dim=(2, 3)))


def resnet_leaky(widths=(32, 64, 128)) -> nn.Module:
    """:class:`normkit.bench.e2e.SmallResNet` with every ReLU a LeakyReLU(0.01)."""
    from .e2e import SmallResNet

    class Leaky(nn.Module):  # the block tail act(bn(conv(h)) + shortcut) calls torch.relu: patch the blocks
        def __init__(self, block):
            super().__init__()
            self.block = block
            self.act = nn.LeakyReLU(0.01)

        def forward(self, x):
            b = self.block
            return self.act(b.bn(b.conv(b.first(x))) + b.shortcut(x))

    model = SmallResNet(widths)
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            for name, child in list(m._modules.items()):
                if type(child) is nn.ReLU:
                    m._modules[name] = nn.LeakyReLU(0.01)
    feats = model.features
    for name, child in list(feats._modules.items()):
        if type(child).__name__ == "BasicBlock":
            feats._modules[name] = Leaky(child)
    return model


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.SiLU())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetStyle(nn.Module):
    def __init__(self, widths=(16, 24, 40, 80), classes: int = _CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.SiLU())
        blocks, cin = [], widths[0]
        for w in widths[1:]:
            blocks += [MBConv(cin, w, 2), MBConv(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, 4 * cin, 1, bias=False), nn.BatchNorm2d(4 * cin), nn.SiLU())
        self.fc = nn.Linear(4 * cin, classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean(dim=(2, 3)))


_SMALL, _FULL = (8, 16, 16), (32, 64, 128)
NETWORKS = {
    "preact_resnet_leaky": ("PreAct ResNet, BN→LeakyReLU", lambda tiny: PreActResNet(_SMALL if tiny else _FULL)),
    "resnet_leaky": ("ResNet, LeakyReLU tails", lambda tiny: resnet_leaky(_SMALL if tiny else _FULL)),
    "efficientnet_block": ("EfficientNet-style MBConv",
                           lambda tiny: EfficientNetStyle((8, 8, 16, 16) if tiny else (16, 24, 40, 80))),
}


def pair(key: str, tiny: bool, device: str = "cpu") -> dict[str, nn.Module]:
    """{"torch": the network, "normkit": a copy after convert(inplace=True)}, the same weights (non-trivial BN
    affine and running statistics, so that nothing is an identity)."""
    torch.manual_seed(0)
    base = NETWORKS[key][1](tiny).to(device)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return {"torch": base, "normkit": normkit.convert(copy.deepcopy(base), inplace=True)}


def _data(batch: int, device: str, steps: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 32, 32, generator=g).to(device),
             torch.randint(0, _CLASSES, (batch,), generator=g).to(device)) for _ in range(steps)]


def _step_fn(model: nn.Module, opt, data):
    counter = [0]

    def body():
        x, y = data[counter[0] % len(data)]
        counter[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return body


def agreement(models: dict[str, nn.Module], batch: int, device: str) -> dict[str, float]:
    """One training step of each model on the same batch against the float64 truth (torch's model in float64):
    the largest error of the loss, of the parameter gradients (per parameter, relative to its largest gradient
    or 1e-3 of the largest of all, whichever is larger) and of the running statistics, for torch's float32
    model and normkit's."""
    x, y = _data(batch, device, 1)[0]
    truth = copy.deepcopy(models["torch"]).double()
    runs = {}
    for name, m in {**models, "float64": truth}.items():
        m.train()
        m.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(m(x.to(next(m.parameters()).dtype)), y)
        loss.backward()
        stats = [b.detach().clone() for n, b in m.named_buffers() if n.endswith(("running_mean", "running_var"))]
        runs[name] = (float(loss.detach()), [p.grad.detach().double() for p in m.parameters()], stats)
    t_loss, t_grads, t_stats = runs["float64"]
    floor = 1e-3 * max(float(g.abs().max()) for g in t_grads)
    out = {}
    for name in models:
        loss, grads, stats = runs[name]
        out[f"{name}_loss_err"] = abs(loss - t_loss)
        out[f"{name}_grad_err"] = max(float((g - t).abs().max()) / max(float(t.abs().max()), floor)
                                      for g, t in zip(grads, t_grads, strict=True))
        out[f"{name}_stat_err"] = max(float((s.double() - t.double()).abs().max()) for s, t in
                                      zip(stats, t_stats, strict=True))
    out["loss_diff"] = abs(runs["normkit"][0] - runs["torch"][0])
    return out


def peak_step_bytes(key: str, impl: str, batch: int, tiny: bool, threads: int | None) -> int | None:
    """Peak memory of one training step in a fresh process (module docstring), or None off Linux."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "normkit.bench.inplace", key, impl, str(batch), "1" if tiny else "0",
           str(threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"peak memory process failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure_peak(key: str, impl: str, batch: int, tiny: bool) -> int:
    import gc

    model = pair(key, tiny)[impl]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = _step_fn(model, opt, _data(batch, "cpu"))
    step()
    step()
    gc.collect()
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return _status_bytes("VmHWM") - before


def record(key: str, device: str, batch: int, rounds: int, tiny: bool, threads: int | None) -> dict:
    """One network's record (module docstring)."""
    from .models import saved_bytes

    label = NETWORKS[key][0]
    models = pair(key, tiny, device)
    agree = agreement(models, batch, device)
    x, y = _data(batch, device, 1)[0]
    saved = {k: saved_bytes(m, x, y) for k, m in models.items()}
    peaks = {}
    if device == "cpu":
        peaks = {k: peak_step_bytes(key, k, batch, tiny, threads) for k in models}
    clock = Clock(device)
    data = _data(batch, device)
    steps = {}
    for name, m in models.items():
        m.train()
        body = _step_fn(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), data)
        steps[name] = (lambda body=body: clock.time(body))
    times = paired(steps, rounds=rounds, warmup=2)
    base = summary(times["torch"])["median_ms"]
    impls = {}
    for name, ts in times.items():
        s = summary(ts)
        impls[name] = {**s, "times_ms": [t * 1e3 for t in ts], "speedup_vs_torch": base / s["median_ms"]}
    swapped = sum(1 for m in models["normkit"].modules() if isinstance(m, normkit.InPlaceABN))
    writes = sum(1 for m in models["normkit"].modules() if isinstance(m, normkit.InPlaceABN) and m.inplace)
    ratio = {k: saved["normkit"][k] / saved["torch"][k] for k in ("total", "distinct")}
    peak_ratio = peaks["normkit"] / peaks["torch"] if peaks and peaks.get("torch") else None
    return {"op": label, "op_key": f"inplace_{key}", "group": "inplace", "mode": "train step",
            "shape": [batch, 3, 32, 32], "layout": "nchw", "dtype": "float32", "device": device, "impls": impls,
            "max_loss_diff": agree["loss_diff"], "agreement": agree, "saved_bytes": saved,
            "ratio_saved_normkit_vs_torch": ratio, "peak_step_bytes": peaks or None,
            "ratio_peak_normkit_vs_torch": peak_ratio, "inplace_layers": swapped, "writing_layers": writes,
            "convert": "convert(model, inplace=True)",
            "peak_method": "VmHWM over one step minus VmRSS before it, fresh process, MALLOC_MMAP_THRESHOLD_=65536"}


def records(device: str, batch: int, rounds: int, tiny: bool, threads: int | None) -> list[dict]:
    return [record(k, device, batch, rounds, tiny, threads) for k in NETWORKS]


if __name__ == "__main__":  # the peak-memory child process: key impl batch tiny threads
    _key, _impl, _batch, _tiny, _threads = sys.argv[1:6]
    if int(_threads):
        torch.set_num_threads(int(_threads))
    print(json.dumps({"peak_bytes": _measure_peak(_key, _impl, int(_batch), _tiny == "1")}))
