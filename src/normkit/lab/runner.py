"""Run claims, draw their figures, assemble ``results.json``'s structure."""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Sequence
from typing import Any

from .context import Context
from .framework import NOT_EVALUATED, Claim, evaluate


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars to floats/ints, tuples to lists, NaN/Inf to None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric value of type {type(value).__name__} is not a number or list")


def figure_name(claim: Claim) -> str:
    return f"claim{claim.id:02d}.png"


def draw(outcome, path: str) -> None:
    """Draw the outcome's figure with the Agg canvas (no display needed) into ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=getattr(outcome, "size", (10, 4.2)), layout="constrained")
    FigureCanvasAgg(fig)
    outcome.plot(fig, outcome.metrics)
    fig.savefig(path, dpi=100)


def run_claim(claim: Claim, ctx: Context, out_dir: str) -> dict[str, Any]:
    """Run one claim; an experiment that crashes is reported (verdict 'not evaluated', the error in notes)."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        outcome = claim.run(ctx)
        entry = evaluate(claim, outcome)
        entry["metrics"] = jsonable(entry["metrics"])
        entry["figure"] = figure_name(claim)
        draw(outcome, os.path.join(out_dir, entry["figure"]))
    except Exception as err:  # one broken experiment must not lose the other ten
        entry = {
            "id": claim.id,
            "title": claim.title,
            "claim": claim.claim,
            "anchor": claim.anchor,
            "criterion": claim.criterion.description,
            "test": "",
            "checks": [],
            "verdict": NOT_EVALUATED,
            "verdict_reason": "",
            "metrics": {},
            "figure": None,
            "setup": claim.setup,
            "notes": [f"the experiment failed: {type(err).__name__}: {err}"],
            "traceback": traceback.format_exc(),
        }
    entry["elapsed_s"] = round(time.perf_counter() - start, 2)
    entry["cpu_s"] = round(time.process_time() - cpu, 2)  # all threads of this process
    return entry


def worker_init(threads: int) -> None:
    """A worker process of ``--jobs``: the same thread count and deterministic settings as the main one."""
    import warnings

    from .train import deterministic

    deterministic(threads)
    warnings.simplefilter("ignore")  # the main process shows the notices once


def run_all(claims: Sequence[Claim], ctx: Context, out_dir: str, log=print) -> list[dict[str, Any]]:
    os.makedirs(out_dir, exist_ok=True)
    if ctx.executor is not None:
        for claim in claims:  # the shared, expensive runs start in the workers while the first claims run here
            if claim.plan is not None:
                claim.plan(ctx)
    entries = []
    for i, claim in enumerate(claims, start=1):
        ctx.position = f"[{i}/{len(claims)}] "
        entry = run_claim(claim, ctx, out_dir)
        entries.append(entry)
        log(
            f"  claim {claim.id:2d}  {claim.title:<42} {entry['verdict']:<14} {entry['elapsed_s']:6.1f} s  "
            f"(cpu {entry['cpu_s']:.1f} s)"
        )
    return entries
