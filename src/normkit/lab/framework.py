"""Claims, criteria, checks with a stated test over seeds, and verdicts.

A :class:`Claim` is declared before it runs: its statement, the paper anchor (with the number
the paper reports), a :class:`Criterion` — a list of :class:`Check` functions over the metrics the
experiment will produce, each naming the runs it reads — and the experiment as per-seed
:class:`Part` runs and a ``collect`` that turns their results into metrics. Each check ends in one
of four states:

* ``pass`` / ``fail`` — decided: for a comparison of arms, the one-sided bound on the mean over
  seeds (of the per-seed paired differences) clears the margin, or the other bound misses it
  (:func:`at_least`, :func:`within`); for a per-seed yes/no, the share of seeds where it holds is
  shown to be above or below 1/2 (:func:`every_seed`). How wide the bounds are is the active
  design's (:mod:`normkit.lab.sequential`): the fixed design's one-sided 95 % Student-t and
  Clopper-Pearson bounds, or the group-sequential bounds that keep the error rate at 5 % over
  repeated looks;
* ``inconclusive`` — the seeds' uncertainty straddles the margin; the check's detail gives the
  numbers, and more seeds are the remedy ("too little data");
* ``not evaluated`` — its inputs are missing (an arm was skipped; the claim's notes say why).

The claim's verdict is computed, never written by hand:

* ``supported``      every evaluated check passed;
* ``not supported``  every evaluated check failed;
* ``mixed``          at least one passed and at least one failed (an inconclusive check cannot
  change that);
* ``inconclusive``   otherwise, when an inconclusive check could still turn the verdict;
* ``not evaluated``  no check could be evaluated.

Outcomes that were not observed within a budget are *censored*: recorded as the string
``"> CAP"`` (:func:`censored`), never as the cap itself, and compared through their bounds
(:func:`bounds_of`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .costs import Cost
from .sequential import FIXED, design, t95  # noqa: F401  (t95: the fixed design's quantiles, re-exported)

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
MIXED = "mixed"
INCONCLUSIVE = "inconclusive"
NOT_EVALUATED = "not evaluated"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, MIXED, INCONCLUSIVE, NOT_EVALUATED)

PASS, FAIL, UNDECIDED, SKIPPED = "pass", "fail", "inconclusive", "not evaluated"
STATUSES = (PASS, FAIL, UNDECIDED, SKIPPED)

Metrics = dict[str, Any]  # name -> number | "> cap" | list of those (None = not measured)

TEST_NAME = FIXED.name  # the fixed design's test; a run states the design it used


@dataclass(frozen=True)
class Result:
    """A check's outcome: ``status`` (pass / fail / inconclusive / not evaluated) and the numbers behind it."""

    status: str
    detail: str = ""
    n: int | None = None  # the seeds the test used (a look of the design), when it is a test over seeds

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"Result: status: expected one of {STATUSES}, got {self.status!r}")

    @property
    def passed(self) -> bool | None:
        return True if self.status == PASS else False if self.status == FAIL else None


@dataclass(frozen=True)
class Check:
    """One part of a criterion: ``test(metrics)`` gives a :class:`Result`, a bool (decided) or None (missing)."""

    description: str
    test: Callable[[Metrics], Result | bool | None]
    needs: tuple[str, ...] = ()  # the parts (per-seed runs) it reads; () = every part its claim checks

    def __call__(self, metrics: Metrics) -> Result:
        try:
            result = self.test(metrics)
        except MissingMetric as missing:
            return Result(SKIPPED, f"not measured: {missing.args[0]}")
        if isinstance(result, Result):
            return result
        if result is None:
            return Result(SKIPPED, "not measured")
        return Result(PASS if result else FAIL)


@dataclass(frozen=True)
class Criterion:
    """What the data must show for the claim to be supported; every check is declared up front."""

    description: str
    checks: tuple[Check, ...]

    def __post_init__(self):
        if not self.checks:
            raise ValueError("a Criterion needs at least one Check")

    def evaluate(self, metrics: Metrics) -> tuple[str, list[tuple[str, Result]]]:
        results = [(c.description, c(metrics)) for c in self.checks]
        return verdict_of([r for _, r in results]), results


def _status(r: Result | bool | None) -> str:
    if isinstance(r, Result):
        return r.status
    return SKIPPED if r is None else PASS if r else FAIL


def verdict_of(results: Sequence[Result | bool | None]) -> str:
    """The verdict from the checks' results (bools and None are accepted for decided / missing checks)."""
    states = [_status(r) for r in results]
    evaluated = [s for s in states if s != SKIPPED]
    if not evaluated:
        return NOT_EVALUATED
    if PASS in evaluated and FAIL in evaluated:
        return MIXED
    if all(s == PASS for s in evaluated):
        return SUPPORTED
    if all(s == FAIL for s in evaluated):
        return NOT_SUPPORTED
    return INCONCLUSIVE


class MissingMetric(KeyError):
    """A check asked for a metric that was not measured (its arm was skipped)."""


def need(metrics: Metrics, name: str) -> Any:
    """``metrics[name]``, or raise :class:`MissingMetric` when it is absent or None."""
    value = metrics.get(name)
    if value is None or (isinstance(value, list) and any(v is None for v in value)):
        raise MissingMetric(name)
    return value


def mean(values: Sequence[float]) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else math.nan


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single value): the spread over seeds."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ----------------------------------------------------------------------------- censored outcomes
def censored(cap: float) -> str:
    """A value known only to exceed ``cap`` (e.g. "never reached the target within 300 steps")."""
    return f"> {cap:g}"


def is_censored(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(">")


def bounds_of(value: Any) -> tuple[float, float]:
    """(lower, upper) bounds of an observed number (equal) or of a censored ``"> cap"`` (cap, inf)."""
    if is_censored(value):
        return float(value[1:]), math.inf
    return float(value), float(value)


# ----------------------------------------------------------------------------- the stated test
@dataclass(frozen=True)
class Interval:
    """Mean over seeds with its one-sided bounds (lo, hi) under the active design; ``n`` seeds used."""

    mean: float
    lo: float
    hi: float
    n: int
    look: str = ""  # "over 8 seeds, look 3 of 8"

    def text(self, unit: str = "") -> str:
        if self.n < 2:
            return f"{self.mean:+.3g}{unit} from {self.n} seed{'s' if self.n != 1 else ''}"
        kind = "sequential 95 % bounds" if design().sequential else "95 % bounds"
        return f"{self.mean:+.3g}{unit}, {kind} [{self.lo:+.3g}, {self.hi:+.3g}] {self.look}"


def _usable(values: Sequence[Any]) -> list:
    """The values a test may use now: the first n seeds, n the design's last look at or below len(values)."""
    return list(values)[: design().usable(len(values))]


def interval(values: Sequence[float]) -> Interval:
    """Mean of ``values`` (one per seed, from seed 0) with one-sided bounds: mean ± c·s/√n, c the active
    design's critical value for n seeds (the fixed design: Student-t 95 %); one value: no spread known."""
    d = design()
    v = [float(x) for x in _usable(values)]
    n, m = len(v), mean(v)
    if n < 2:
        return Interval(m, -math.inf, math.inf, n)
    half = d.t_critical(n) * std(v) / math.sqrt(n)
    return Interval(m, m - half, m + half, n, d.look(n))


def _undecided(iv: Interval, what: str, available: int) -> Result:
    d = design()
    if iv.n < 2:
        if d.sequential:
            return Result(UNDECIDED, f"too little data: {available} seed{'s' if available != 1 else ''}, the "
                                     f"first look is at {d.looks[0]}; run more seeds", iv.n)
        return Result(UNDECIDED, f"too little data: {what} from {iv.n} seed, no spread to test against; "
                                 "run more seeds", iv.n)
    return Result(UNDECIDED, f"too little data: {what} — the seeds' uncertainty straddles the margin; "
                             "more seeds decide", iv.n)


def at_least(values: Sequence[float], margin: float, unit: str = "") -> Result:
    """Is the mean over seeds of ``values`` (e.g. paired differences a − b) at least ``margin``?

    pass: lower bound ≥ margin; fail: upper bound < margin; otherwise inconclusive (bounds of the
    active design).
    """
    iv = interval(values)
    what = f"mean {iv.text(unit)} vs margin {margin:+g}{unit}"
    if iv.n >= 2 and iv.lo >= margin:
        return Result(PASS, what, iv.n)
    if iv.n >= 2 and iv.hi < margin:
        return Result(FAIL, what, iv.n)
    return _undecided(iv, what, len(values))


def within(values: Sequence[float], tolerance: float, unit: str = "") -> Result:
    """Is the mean of ``values`` (paired differences) within ±``tolerance``? (two one-sided tests)

    pass: both bounds inside ±tolerance; fail: the whole interval outside; otherwise inconclusive.
    """
    iv = interval(values)
    what = f"mean {iv.text(unit)} vs ±{tolerance:g}{unit}"
    if iv.n >= 2 and -tolerance <= iv.lo and iv.hi <= tolerance:
        return Result(PASS, what, iv.n)
    if iv.n >= 2 and (iv.lo > tolerance or iv.hi < -tolerance):
        return Result(FAIL, what, iv.n)
    return _undecided(iv, what, len(values))


def paired(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-seed differences a − b (the arms share a seed: same initialization and batch order).

    Both lists run from seed 0; where one arm has more seeds (added for another check), the seeds both
    have are paired.
    """
    n = min(len(a), len(b))
    return [float(x) - float(y) for x, y in zip(a[:n], b[:n], strict=True)]


def _binom_tail_ge(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def proportion_bounds(k: int, n: int) -> tuple[float, float]:
    """One-sided 95 % Clopper-Pearson bounds on a proportion from ``k`` successes in ``n`` trials."""
    if n < 1:
        return 0.0, 1.0

    def solve(f, target: float) -> float:  # f increases with p; the p where it reaches target, by bisection
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    # lower: P(X >= k | p) = 0.05; upper: P(X <= k | p) = 0.05, i.e. P(X >= k + 1 | p) = 0.95
    lower = 0.0 if k == 0 else solve(lambda p: _binom_tail_ge(k, n, p), 0.05)
    upper = 1.0 if k == n else solve(lambda p: _binom_tail_ge(k + 1, n, p), 0.95)
    return lower, upper


def every_seed(outcomes: Sequence[bool | None], what: str) -> Result:
    """A per-seed yes/no (None = undecided for that seed, e.g. censored), judged as a proportion.

    Fixed design: pass when the one-sided 95 % Clopper-Pearson lower bound of P(yes) is above 1/2 (with
    5 seeds: yes in all 5), fail when the upper bound (counting undecided seeds as yes) is below 1/2;
    two seeds decide nothing either way. Sequential design: pass with at least a_n yes of the n seeds
    of the look, fail with at least a_n no (exact binomial boundaries, see
    :func:`normkit.lab.sequential.binomial_bounds`). Otherwise inconclusive.
    """
    d = design()
    available = len(outcomes)
    outcomes = _usable(outcomes)
    n = len(outcomes)
    yes = sum(o is True for o in outcomes)
    no = sum(o is False for o in outcomes)
    if d.sequential:
        if n == 0:
            return Result(UNDECIDED, f"too little data: {what}: {available} seed{'s' if available != 1 else ''}, "
                                     f"the first look is at {d.looks[0]}", 0)
        a = d.pass_count(n)
        detail = (f"{what}: yes in {yes}, no in {no}, undecided in {n - yes - no} of {n} seeds ({d.look(n)}); "
                  f"the share of seeds is above 1/2 with {a} or more yes, below with {a} or more no"
                  if a <= n else
                  f"{what}: yes in {yes}, no in {no}, undecided in {n - yes - no} of {n} seeds ({d.look(n)}); "
                  f"no count of {n} seeds decides the share at this look")
        if yes >= a:
            return Result(PASS, detail, n)
        if no >= a:
            return Result(FAIL, detail, n)
        return Result(UNDECIDED, "too little data: " + detail, n)
    lower, _ = proportion_bounds(yes, n)
    _, upper = proportion_bounds(n - no, n)
    detail = (f"{what}: yes in {yes}, no in {no}, undecided in {n - yes - no} of {n} seeds; 95 % bounds on "
              f"the share of seeds where it holds [{lower:.2f}, {upper:.2f}] vs 1/2")
    if lower > 0.5:
        return Result(PASS, detail, n)
    if upper < 0.5:
        return Result(FAIL, detail, n)
    return Result(UNDECIDED, "too little data: " + detail, n)


@dataclass
class Outcome:
    """What an experiment returns: the metrics, notes (e.g. skipped arms) and a plotting function."""

    metrics: Metrics
    plot: Callable[[Any, Metrics], None]  # plot(matplotlib Figure, metrics)
    notes: list[str] = field(default_factory=list)
    size: tuple[float, float] = (10.0, 4.2)  # the figure's size in inches


@dataclass(frozen=True)
class Part:
    """One per-seed run of an experiment: ``fn(*args, seed)`` — a pure, seeded function whose result
    is plain data (it may run in a worker process and gives the same numbers there).

    ``key`` names the run across claims: claims whose parts have the same key share its seeds (claims 7,
    8, 10 and 11 share the batch-size runs). A ``display`` part is read by no check (a figure's extra
    sweep points, the notes): it runs for the first look's seeds only.
    """

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    key: tuple = ()
    cost: Cost = Cost(1.0)
    display: bool = False

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", (self.fn.__module__, self.fn.__qualname__, *self.args))


@dataclass(frozen=True)
class Claim:
    """A claim about Batch Normalization and the experiment that measures it.

    The experiment is ``parts(context)`` — its per-seed runs — and ``collect(context, results)``, which
    turns ``results[part name]`` (the part's per-seed results, from seed 0; parts may have different
    numbers of seeds) into the metrics the criterion's checks read.
    """

    id: int
    title: str
    claim: str
    anchor: str  # the paper and the number the result echoes
    criterion: Criterion
    parts: Callable[[Any], list[Part]]
    collect: Callable[[Any, dict[str, list]], Outcome]
    setup: str = ""  # one paragraph: data, model, training, arms, and how convergence is ensured

    def needs(self, index: int, parts: Sequence[Part]) -> list[Part]:
        """The parts check ``index`` reads (its ``needs``, or every non-display part)."""
        names = self.criterion.checks[index].needs
        if not names:
            return [p for p in parts if not p.display]
        return [p for p in parts if p.name in names]


def evaluate(claim: Claim, outcome: Outcome, checks: list[tuple[str, Result]] | None = None,
             test: str = TEST_NAME) -> dict[str, Any]:
    """The claim's entry of results.json (without the figure path); ``checks`` overrides the criterion's
    results (the sequential runner's final decisions)."""
    if checks is None:
        _, checks = claim.criterion.evaluate(outcome.metrics)
    verdict = verdict_of([r for _, r in checks])
    reason = ""
    if verdict == INCONCLUSIVE:
        reason = "; ".join(f"{d}: {r.detail}" for d, r in checks if r.status == UNDECIDED)
    return {
        "id": claim.id,
        "title": claim.title,
        "claim": claim.claim,
        "anchor": claim.anchor,
        "criterion": claim.criterion.description,
        "test": test,
        "checks": [{"check": d, "passed": r.passed, "status": r.status, "detail": r.detail, "seeds": r.n}
                   for d, r in checks],
        "verdict": verdict,
        "verdict_reason": reason,
        "metrics": outcome.metrics,
        "notes": list(outcome.notes),
        "setup": claim.setup,
    }
