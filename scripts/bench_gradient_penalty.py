"""Time a WGAN-GP critic step (gradient penalty: double backward) with torch.nn vs normkit layers.

normkit's custom ops differentiate their backward by recomputing the forward on torch's operators
(docs/compatibility.md); this measures what that costs on a whole step. Paired interleaved rounds,
medians, ratio = torch ÷ normkit (> 1: normkit faster).

    PYTHONPATH=src:tests python scripts/bench_gradient_penalty.py [norm=gn] [threads=1] [batch=128]

(GroupNorm runs normkit's kernels at every size — the C++ eager ops, whose backward recomputes the
forward through aten when create_graph is on; with norm=bn, NCHW batches below
normkit.route.ATEN_BELOW take torch's own operators.)
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch
from test_workflows import critic, gradient_penalty, twins  # the workflow test's critic and penalty


def main(norm: str = "gn", threads: int = 1, batch: int = 128, rounds: int = 15, steps: int = 5) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    theirs, ours = twins(critic(norm))
    real, fake = 2 + torch.randn(batch, 3, 8, 8), torch.randn(batch, 3, 8, 8)

    def step(model):
        (gradient_penalty(model, real, fake) + model(real).mean()).backward()

    times = {"torch": [], "normkit": []}
    for _ in range(rounds):
        for name, model in (("torch", theirs), ("normkit", ours)):
            start = time.perf_counter()
            for _ in range(steps):
                step(model)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    t, n = statistics.median(times["torch"]), statistics.median(times["normkit"])
    print(f"WGAN-GP critic step ({norm}, batch {batch}, {threads} thread(s)): torch.nn {t:.2f} ms, "
          f"normkit {n:.2f} ms, x torch {t / n:.2f}")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["gn"]), *(int(a) for a in sys.argv[2:4]))
