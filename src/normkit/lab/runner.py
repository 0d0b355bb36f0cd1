"""Run the claims: the seed plan (a fixed number of seeds, or sequential looks within a budget), the runs
in one or more processes, the figures, and ``results.json``'s entries.

The sequential plan works in rounds. Round 1 gives every part of every claim the first look's seeds
(3). After each round every claim is evaluated; a check decided at a look keeps that decision (see
:mod:`normkit.lab.sequential`). The next round extends, for every claim whose verdict is still open
(then for the undecided checks of claims whose verdict is already settled, as "mixed"), only the parts
its undecided checks read, to their next look — as long as the modeled time of the run stays within the
budget (:mod:`normkit.lab.costs`; cheaper requests first). The plan depends on the results and the
cost model only, never on a clock, so two runs make the same plan and give the same numbers.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .context import Context
from .costs import PER_CLAIM_S, STARTUP_S, makespan
from .framework import (
    FAIL,
    INCONCLUSIVE,
    MIXED,
    NOT_EVALUATED,
    PASS,
    UNDECIDED,
    Claim,
    Outcome,
    Part,
    Result,
    evaluate,
    verdict_of,
)
from .sequential import SEQUENTIAL, FixedDesign, SequentialDesign, active


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


def worker_init(threads: int, user_data=None) -> None:
    """A worker process of ``--jobs``: the same thread count, deterministic settings and data as the main one."""
    import warnings

    from . import data as D
    from .train import deterministic

    deterministic(threads)
    D.use(user_data)
    warnings.simplefilter("ignore")  # the main process shows the notices once


@dataclass
class _ClaimRun:
    claim: Claim
    parts: list[Part]
    started: bool = False
    outcome: Outcome | None = None
    checks: list[tuple[str, Result]] = field(default_factory=list)
    decided: dict[int, Result] = field(default_factory=dict)  # check -> its first decisive result (final)
    open: dict[int, str] = field(default_factory=dict)  # undecided check -> why it stays open
    error: str | None = None  # the traceback of a failed run or aggregation
    looks: int = 0  # rounds in which it got seeds

    @property
    def verdict(self) -> str:
        return verdict_of([r for _, r in self.checks])


class Runner:
    """One ``normkit lab`` run: ``design`` (fixed with ``seeds`` per part, or sequential within ``budget``
    modeled seconds) over ``claims``."""

    def __init__(self, claims: Sequence[Claim], ctx: Context, design: FixedDesign | SequentialDesign = SEQUENTIAL,
                 budget: float | None = None, seeds: int | None = None, log=print):
        if design.sequential == (seeds is not None):
            raise ValueError("Runner: a sequential design takes a budget, a fixed one a number of seeds")
        self.ctx, self.design, self.budget, self.seeds, self.log = ctx, design, budget, seeds, log
        self.states = [_ClaimRun(c, list(c.parts(ctx))) for c in claims]
        self.part_of: dict[tuple, Part] = {}
        for st in self.states:
            for p in st.parts:
                self.part_of.setdefault(p.key, p)
        self.count: dict[tuple, int] = {}  # run key -> seeds computed (always seeds 0 .. count-1)
        self.results: dict[tuple, Any] = {}  # (run key, seed) -> result
        self.cpu: dict[tuple, float] = {}
        self.cost: dict[tuple, float] = {}  # modeled seconds
        self.errors: dict[tuple, str] = {}
        self.modeled = STARTUP_S + PER_CLAIM_S * len(self.states)
        self.rounds: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------- costs
    def estimate(self, key: tuple) -> float:
        """Modeled seconds of the next seed of run ``key``: the mean of its seeds so far, or its prior."""
        done = [self.cost[(key, s)] for s in range(self.count.get(key, 0))]
        return sum(done) / len(done) if done else self.part_of[key].cost.seconds

    def _jobs(self, targets: dict[tuple, int], taken: set) -> list[tuple[tuple, int]]:
        return [(k, s) for k, n in targets.items() for s in range(self.count.get(k, 0), n) if (k, s) not in taken]

    def _fits(self, jobs: list[tuple[tuple, int]]) -> bool:
        if self.budget is None:
            return True
        return self.modeled + makespan(self.estimate(k) for k, _ in jobs) <= self.budget

    # ------------------------------------------------------------------------------- the plan
    def _first_round(self) -> tuple[list, list]:
        first = self.seeds if self.seeds is not None else self.design.looks[0]
        chosen: list[tuple[tuple, int]] = []
        taken: set = set()
        claims = []
        for st in self.states:
            jobs = self._jobs({p.key: first for p in st.parts}, taken)
            if self._fits(chosen + jobs):
                chosen += jobs
                taken.update(jobs)
                st.started = True
                claims.append(st)
        return chosen, claims

    def _next_round(self) -> tuple[list, list]:
        requests = []
        for st in self.states:
            if not st.started or st.error is not None:
                continue
            phase = {INCONCLUSIVE: 0, MIXED: 1}.get(st.verdict)
            if phase is None:
                continue
            targets: dict[tuple, int] = {}
            extending = []
            for i, (_, r) in enumerate(st.checks):
                if r.status != UNDECIDED:
                    continue
                needed = st.claim.needs(i, st.parts)
                if not needed:
                    continue
                n = self.design.usable(min(self.count.get(p.key, 0) for p in needed))
                if r.n is not None and r.n < n:  # it reads a run its needs do not name: it would never move
                    st.open[i] = f"(internal) the check read {r.n} seeds where its runs have {n}"
                    continue
                nxt = self.design.next_look(n)
                if nxt is None:
                    st.open[i] = f"still undecided at the design's last look ({n} seeds)"
                    continue
                for p in needed:
                    targets[p.key] = max(targets.get(p.key, 0), nxt)
                extending.append((i, n, nxt))
            if extending:
                requests.append((phase, st, targets, extending))
        chosen: list[tuple[tuple, int]] = []
        taken: set = set()
        claims = []
        costed = []
        for phase, st, targets, extending in requests:
            jobs = self._jobs(targets, set())
            costed.append((phase, sum(self.estimate(k) for k, _ in jobs), st.claim.id, st, targets, extending))
        settling = False  # a claim with an open verdict got seeds this round: the others wait
        for phase, cost, _, st, targets, extending in sorted(costed, key=lambda r: r[:3]):
            if phase == 1 and settling:
                for i, n, _ in extending:
                    st.open[i] = (f"undecided after {n} seeds; the claim's verdict no longer depends on it, and "
                                  "the claims whose verdict was open came first")
                continue
            jobs = self._jobs(targets, taken)
            if self._fits(chosen + jobs):
                settling = settling or phase == 0
                chosen += jobs
                taken.update(jobs)
                claims.append(st)
                for i, _, _ in extending:
                    st.open.pop(i, None)
            else:
                left = (self.budget or 0) - self.modeled - makespan(self.estimate(k) for k, _ in chosen)
                for i, n, nxt in extending:
                    st.open[i] = (f"the budget ran out: undecided after {n} seeds; its next look ({nxt} seeds) "
                                  f"needed about {cost:.0f} s more of modeled time, {max(left, 0):.0f} s were left")
        return chosen, claims

    # ------------------------------------------------------------------------------- running
    def _execute(self, jobs: list[tuple[tuple, int]], claims: list[_ClaimRun]) -> None:
        jobs = sorted(jobs, key=lambda j: (-self.estimate(j[0]), j[1]))  # the longest first
        look = len(self.rounds) + 1
        ids = sorted({st.claim.id for st in claims})
        start = time.perf_counter()
        done = self.ctx.execute(
            [((k, s), self.part_of[k].fn, (*self.part_of[k].args, s)) for k, s in jobs],
            desc=f"round {look}: claims {', '.join(map(str, ids))}",
        )
        for (k, s), (result, cpu, error) in done.items():
            self.results[(k, s)] = result
            self.cpu[(k, s)] = cpu
            if error is not None:
                self.errors[(k, s)] = error
            self.cost[(k, s)] = self.part_of[k].cost.of(result)
        for k, s in jobs:
            self.count[k] = max(self.count.get(k, 0), s + 1)
        actual = makespan(self.cost[j] for j in jobs)
        self.modeled += actual
        for st in claims:
            st.looks += 1
        wall = time.perf_counter() - start
        self.rounds.append({"round": look, "claims": ids, "runs": len(jobs), "modeled_s": round(actual, 1),
                            "wall_s": round(wall, 1), "cpu_s": round(sum(self.cpu[j] for j in jobs), 1)})
        budget = f" of {self.budget:.0f}" if self.budget is not None else ""
        self.log(f"  round {look}: {len(jobs)} runs for claim(s) {', '.join(map(str, ids))}: {wall:.1f} s "
                 f"(modeled {actual:.1f} s; {self.modeled:.0f}{budget} s of modeled time used)")

    def _evaluate(self) -> None:
        for st in self.states:
            if not st.started or st.error is not None:
                continue
            res = {}
            for p in st.parts:
                n = self.count.get(p.key, 0)
                errors = [self.errors[(p.key, s)] for s in range(n) if (p.key, s) in self.errors]
                if errors:
                    st.error = errors[0]
                    break
                res[p.name] = [self.results[(p.key, s)] for s in range(n)]
            if st.error is not None:
                continue
            try:
                with active(self.design):
                    outcome = st.claim.collect(self.ctx, res)
                    _, checks = st.claim.criterion.evaluate(outcome.metrics)
            except Exception:
                st.error = traceback.format_exc()
                continue
            merged = []
            for i, (d, r) in enumerate(checks):
                if i in st.decided:
                    r = st.decided[i]
                elif r.status in (PASS, FAIL) and self.design.sequential:
                    st.decided[i] = r
                merged.append((d, r))
            st.outcome, st.checks = outcome, merged

    def run(self) -> None:
        jobs, claims = self._first_round()
        while jobs:
            self._execute(jobs, claims)
            self._evaluate()
            if not self.design.sequential:
                break
            jobs, claims = self._next_round()

    # ------------------------------------------------------------------------------- the report's entries
    def entries(self, out_dir: str) -> list[dict[str, Any]]:
        out = []
        for st in self.states:
            c = st.claim
            keys = [(p.key, s) for p in st.parts for s in range(self.count.get(p.key, 0))]
            base = {"id": c.id, "title": c.title, "claim": c.claim, "anchor": c.anchor,
                    "criterion": c.criterion.description, "setup": c.setup}
            if not st.started:
                entry = {**base, "test": "", "checks": [], "verdict": NOT_EVALUATED, "verdict_reason": "",
                         "metrics": {}, "figure": None,
                         "notes": [f"not run: the budget ({self.budget:g} s of modeled time) was spent before this "
                                   "claim's first look"]}
            elif st.error is not None:
                entry = {**base, "test": "", "checks": [], "verdict": NOT_EVALUATED, "verdict_reason": "",
                         "metrics": {}, "figure": None, "traceback": st.error,
                         "notes": [f"the experiment failed: {st.error.strip().splitlines()[-1]}"]}
            else:
                entry = evaluate(c, st.outcome, st.checks, test=self.design.name)
                entry["metrics"] = jsonable(entry["metrics"])
                for i, ch in enumerate(entry["checks"]):
                    if ch["status"] == UNDECIDED:
                        ch["open"] = st.open.get(i, "") if self.design.sequential else (
                            f"the fixed design's one look ({self.seeds} seeds); more seeds (--seeds) or the "
                            "sequential design (--budget) decide")
                if entry["verdict"] == INCONCLUSIVE:
                    entry["verdict_reason"] = "; ".join(
                        f"{ch['check']}: {ch['detail']}" + (f" [{ch['open']}]" if ch.get("open") else "")
                        for ch in entry["checks"] if ch["status"] == UNDECIDED)
                entry["figure"] = figure_name(c)
                try:
                    draw(st.outcome, os.path.join(out_dir, entry["figure"]))
                except Exception as err:  # a figure must not lose the numbers
                    entry["figure"] = None
                    entry["notes"].append(f"the figure failed: {type(err).__name__}: {err}")
            checked = [p for p in st.parts if not p.display]
            entry["seeds"] = max((self.count.get(p.key, 0) for p in checked), default=0)
            entry["seeds_by_part"] = {p.name: self.count.get(p.key, 0) for p in st.parts}
            entry["looks"] = st.looks
            entry["cpu_s"] = round(sum(self.cpu.get(k, 0.0) for k in keys), 2)  # its runs' CPU (shared runs in each)
            entry["modeled_s"] = round(sum(self.cost.get(k, 0.0) for k in keys), 2)
            out.append(entry)
        return out


def run_all(claims: Sequence[Claim], ctx: Context, out_dir: str, *, design=SEQUENTIAL, budget: float | None = None,
            seeds: int | None = None, log=print) -> tuple[list[dict[str, Any]], Runner]:
    """Run ``claims`` and return their results.json entries (figures written to ``out_dir``) and the runner."""
    os.makedirs(out_dir, exist_ok=True)
    runner = Runner(claims, ctx, design, budget=budget, seeds=seeds, log=log)
    runner.run()
    entries = runner.entries(out_dir)
    for e in entries:
        log(f"  claim {e['id']:2d}  {e['title']:<42} {e['verdict']:<14} {e['seeds']:3d} seeds  "
            f"(cpu {e['cpu_s']:.1f} s)")
    return entries, runner
