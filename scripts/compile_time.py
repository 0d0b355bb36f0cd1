"""Cold compile time under ``torch.compile``: a timm model as shipped against its ``normkit.convert`` conversion.

Each compile runs in a fresh process with empty Inductor and Triton caches (a new ``TORCHINDUCTOR_CACHE_DIR``, the FX
graph and AOT autograd caches off), so neither contender profits from the other's compiled kernels; the contenders
alternate (A B, B A, ...). Timed: from ``torch.compile`` to the end of the first call (a training step, or an eval
forward under no_grad), the model built from its config (no weights, 10 classes), one 4×3×64×64 batch, two threads.
Printed: every run's seconds, then the medians and their ratio torch ÷ normkit (> 1: normkit compiles faster).

    PYTHONPATH=src .venv/bin/python scripts/compile_time.py resnet18 train --rounds 2
    PYTHONPATH=src .venv/bin/python scripts/compile_time.py convnext_atto eval --rounds 2

Its results are quoted in docs/benchmarks.md, section "One front door, torch.compile and per-call cost (issue 21,
5 Dec)".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(model_name: str, mode: str, which: str) -> None:
    """Build, (convert,) compile and run once; print the seconds from ``torch.compile`` to the first result."""
    import copy
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    # timm imports torchvision, whose CUDA wheel's compiled ops do not load beside the CPU torch: its fake-kernel
    # registrations need the two schemas to exist (schemas only, nothing calls them)
    for op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import timm

    import normkit

    torch.set_num_threads(2)
    torch.manual_seed(0)
    extra = {"img_size": 64} if "vit" in model_name else {}
    model = timm.create_model(model_name, pretrained=False, num_classes=10, **extra)
    if which == "normkit":
        model = normkit.convert(copy.deepcopy(model))
    model.train(mode == "train")
    x = torch.randn(4, 3, 64, 64)
    t0 = time.perf_counter()
    compiled = torch.compile(model)
    if mode == "train":
        compiled(x).sum().backward()
    else:
        with torch.no_grad():
            compiled(x)
    print(f"{time.perf_counter() - t0:.3f}")


def one_run(model_name: str, mode: str, which: str) -> float:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"),
                   TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        out = subprocess.run([sys.executable, __file__, "--child", model_name, mode, which], env=env, check=True,
                             capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a timm model name, e.g. resnet18")
    p.add_argument("mode", choices=("train", "eval"))
    p.add_argument("--rounds", type=int, default=2, help="compiles per contender (default 2)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("which", nargs="?", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.model, a.mode, a.which)
        return
    times = {"torch": [], "normkit": []}
    for r in range(a.rounds):
        for which in (("torch", "normkit") if r % 2 == 0 else ("normkit", "torch")):
            s = one_run(a.model, a.mode, which)
            times[which].append(s)
            print(f"{a.model} {a.mode} {which:8s} {s:7.1f} s", flush=True)
    mt, mn = statistics.median(times["torch"]), statistics.median(times["normkit"])
    print(f"{a.model} {a.mode}: median torch {mt:.1f} s, normkit {mn:.1f} s, ratio torch / normkit {mt / mn:.2f}")


if __name__ == "__main__":
    main()
