"""The cost model: how the lab turns ``--budget SECONDS`` into a seed plan that does not depend on the
machine.

A budget measured with a clock would make the number of seeds — and so every number and verdict —
depend on how fast the machine is and on what else runs on it. The lab therefore never reads a clock
to decide. Each per-seed run has a *modeled* cost: seconds of one process on the reference machine
(the 2-core development machine, one intra-op thread), either a constant (runs of fixed length) or
``base + per_step · steps`` (the batch-size runs trained to a plateau, whose length is known, and
deterministic, once they ran). A round of runs is modeled as spread over two processes (the longest
first, each to the process that is free first: its makespan), and the run's modeled time is the fixed
start-up and report time plus the rounds' makespans. A group of seeds is only started if the modeled
time with it stays within the budget. So ``--budget`` is reference-machine seconds: the plan, the
numbers and the verdicts are the same on every machine and for every ``--jobs``; the wall time is
about the budget on the reference machine with ``--jobs 2``, shorter on a faster or quieter one and
longer on a loaded one. The report shows the modeled and the measured time side by side.

The constants were measured with :func:`calibrate` (``python -m normkit.lab.costs``): the CPU time of
one seed of each part, single-threaded, on the development machine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PROCESSES = 2  # the reference machine's processes (--jobs 2 on 2 cores)
STARTUP_S = 8.0  # imports, data, the worker's start
PER_CLAIM_S = 1.5  # a claim's aggregation, figure and report section


@dataclass(frozen=True)
class Cost:
    """Modeled seconds of one seed of a part: ``seconds``, or, for a run whose length is known only once
    it ran, ``base + per_step · result['steps'] + per_eval · result['evals']`` (``seconds`` is then the
    estimate before any seed of it ran)."""

    seconds: float
    per_step: float = 0.0
    per_eval: float = 0.0
    base: float = 0.0

    def of(self, result: Any) -> float:
        if self.per_step and isinstance(result, dict) and "steps" in result:
            return self.base + self.per_step * float(result["steps"]) + self.per_eval * float(result.get("evals", 0))
        return self.seconds


def makespan(costs: Iterable[float], processes: int = PROCESSES) -> float:
    """Modeled wall time of running ``costs`` on ``processes``: longest first, each to the least loaded."""
    loads = [0.0] * processes
    for c in sorted(costs, reverse=True):
        i = loads.index(min(loads))
        loads[i] += c
    return max(loads)


def calibrate(claims=None, seed: int = 0, repeats: int = 2) -> dict[str, float]:
    """CPU seconds of one seed of every part of ``claims`` (all by default), in this process: the least of
    ``repeats`` runs (the first pays one-time costs: loading the data, warming the kernels).

    Prints one line per part with its modeled cost next to the measured one; steps for the parts whose
    cost is per step. Run it on a quiet machine; it is how the constants in the claims were set.
    """
    import time

    from .claims import ALL
    from .context import Context
    from .train import deterministic

    deterministic(1)
    ctx = Context(show_progress=False)
    out: dict[str, float] = {}
    seen: set = set()
    for claim in claims or ALL:
        for part in claim.parts(ctx):
            if part.key in seen:
                continue
            seen.add(part.key)
            best, result = float("inf"), None
            for _ in range(repeats):
                t0 = time.process_time()
                result = part.fn(*part.args, seed)
                best = min(best, time.process_time() - t0)
            steps = result.get("steps") if isinstance(result, dict) else None
            out[f"{claim.id}:{part.name}"] = best
            print(f"claim {claim.id:2d} {part.name:<28} measured {best:6.2f} s  modeled {part.cost.of(result):6.2f} s"
                  + (f"  steps {steps}  ({best / steps * 1e6:.0f} us/step)" if steps else ""), flush=True)
    return out


if __name__ == "__main__":  # python -m normkit.lab.costs [claim ids...]
    import sys

    from .claims import BY_ID

    ids = [int(a) for a in sys.argv[1:]]
    calibrate([BY_ID[i] for i in ids] if ids else None)
