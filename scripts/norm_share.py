"""The norm layers' share of a model's step, and the whole-model speed-up faster norms can give at most.

For each model of ``normkit bench --suite zoo`` named (as shipped, unconverted), the training step (SGD, the zoo
suite's loss) and the eval forward are timed twice in paired, interleaved rounds: the model as it is, and a copy whose
norm layers (``normkit.tools.recipes.is_norm_layer``: torch.nn's, timm's, transformers', with their activation for the
norm + act classes) are replaced by ``nn.Identity`` — same shapes, so every other layer costs what it cost. The share
is ``s = 1 − t(without norms) / t(model)`` (medians); with normkit's norms ``r`` times as fast as the original's and
everything else unchanged (Amdahl), the model runs at most ``1 / (1 − s + s/r)`` times as fast, printed for r = 1.5
and r → ∞. One thread, the zoo suite's sizes (batch 4).

    PYTHONPATH=src .venv/bin/python scripts/norm_share.py resnet18 efficientnet_b0 convnext_atto llama --rounds 7

Its results are quoted in docs/ecosystem.md, section 0.5.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from normkit.tools import recipes


def without_norms(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every norm layer replaced by ``nn.Identity``."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and recipes.is_norm_layer(child):
                parent._modules[name] = nn.Identity()
    return twin


def step_fn(built, model: nn.Module, mode: str, loss_of):
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_of(built.output(model)).backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                built.output(model)
    return step


def timed(fn, n: int = 3) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="zoo model keys (normkit.bench.zoo.ZOO)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from normkit.bench import zoo

    specs = {s.key: s for s in zoo.ZOO}
    print("model               mode   norm share   at most x (r=1.5)   at most x (r=inf)")
    for key in a.models:
        built = zoo.build(specs[key], batch=4)
        bare = without_norms(built.model)
        for mode in ("train", "eval"):
            full_step = step_fn(built, built.model, mode, zoo.loss_of)
            bare_step = step_fn(built, bare, mode, zoo.loss_of)
            for f in (full_step, bare_step, full_step, bare_step):
                f()
            full, without = [], []
            for r in range(a.rounds):
                pair = (full_step, bare_step) if r % 2 == 0 else (bare_step, full_step)
                times = {id(f): timed(f) for f in pair}
                full.append(times[id(full_step)])
                without.append(times[id(bare_step)])
            s = max(0.0, 1 - statistics.median(without) / statistics.median(full))
            print(f"{key:<20}{mode:<7}{100 * s:9.1f} %   {1 / (1 - s + s / 1.5):16.3f}   {1 / (1 - s):16.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
