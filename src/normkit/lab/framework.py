"""Claims, criteria and verdicts.

A :class:`Claim` is declared before it runs: its statement, the paper anchor (with the number
the paper reports), and a :class:`Criterion` — a list of :class:`Check` functions over the
metrics the experiment will produce. The verdict is then computed, never written by hand:

* ``supported``      every check that could be evaluated passed;
* ``not supported``  every check that could be evaluated failed;
* ``mixed``          some passed, some failed;
* ``not evaluated``  no check could be evaluated (e.g. the arm needs a layer this build lacks).

A check returns ``True``/``False``, or ``None`` when its inputs are missing (an arm was skipped,
which the claim records in its notes) — a skipped check never counts as a pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
MIXED = "mixed"
NOT_EVALUATED = "not evaluated"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, MIXED, NOT_EVALUATED)

Metrics = dict[str, Any]  # name -> number | list of numbers (None = not measured)


@dataclass(frozen=True)
class Check:
    """One part of a criterion: ``test(metrics)`` is True (passes), False (fails) or None (not evaluable)."""

    description: str
    test: Callable[[Metrics], bool | None]

    def __call__(self, metrics: Metrics) -> bool | None:
        try:
            result = self.test(metrics)
        except MissingMetric:
            return None
        return None if result is None else bool(result)


@dataclass(frozen=True)
class Criterion:
    """What the data must show for the claim to be supported; every check is declared up front."""

    description: str
    checks: tuple[Check, ...]

    def __post_init__(self):
        if not self.checks:
            raise ValueError("a Criterion needs at least one Check")

    def evaluate(self, metrics: Metrics) -> tuple[str, list[tuple[str, bool | None]]]:
        results = [(c.description, c(metrics)) for c in self.checks]
        return verdict_of([r for _, r in results]), results


def verdict_of(results: Sequence[bool | None]) -> str:
    """The verdict from the check results (None = not evaluated, ignored)."""
    evaluated = [r for r in results if r is not None]
    if not evaluated:
        return NOT_EVALUATED
    if all(evaluated):
        return SUPPORTED
    if not any(evaluated):
        return NOT_SUPPORTED
    return MIXED


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


@dataclass
class Outcome:
    """What an experiment returns: the metrics, notes (e.g. skipped arms) and a plotting function."""

    metrics: Metrics
    plot: Callable[[Any, Metrics], None]  # plot(matplotlib Figure, metrics)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Claim:
    """A claim about Batch Normalization and the experiment that measures it."""

    id: int
    title: str
    claim: str
    anchor: str  # the paper and the number the result echoes
    criterion: Criterion
    run: Callable[[Any], Outcome]  # run(context) -> Outcome
    setup: str = ""  # one paragraph: data, model, training, arms


def evaluate(claim: Claim, outcome: Outcome) -> dict[str, Any]:
    """The claim's entry of results.json (without the figure path)."""
    verdict, checks = claim.criterion.evaluate(outcome.metrics)
    return {
        "id": claim.id,
        "title": claim.title,
        "claim": claim.claim,
        "anchor": claim.anchor,
        "criterion": claim.criterion.description,
        "checks": [{"check": d, "passed": r} for d, r in checks],
        "verdict": verdict,
        "metrics": outcome.metrics,
        "notes": list(outcome.notes),
        "setup": claim.setup,
    }
