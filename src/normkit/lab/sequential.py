"""How strict a look at the seeds is: the fixed design (one look) and the group-sequential design.

A check compares arms over seeds. The lab can look at a check once, after a fixed number of seeds
(:class:`FixedDesign`, ``--seeds K``: one-sided 95 % Student-t bounds), or several times, adding seeds
between the looks while the check is undecided (:class:`SequentialDesign`, the default). Looking
repeatedly at the same test with the fixed-sample bounds would decide wrongly far more often than
5 % of the time (at these 8 looks 18 % of the time); the sequential design widens the bounds at every
look so that, over all its looks together, the chance of a wrong decision stays 5 % per direction:

* **Looks** after 3, 5, 8, 12, 17, 24, 32 and 40 seeds — at most 8; a check is only ever judged on the
  first n seeds for n in that list (seeds are added in groups that end on those numbers).
* **Alpha spending** (Lan & DeMets 1983) with the power family of Kim & DeMets (1987),
  α(τ) = 0.05 · τ^½ with information fraction τ = n / 40: by the look at n seeds at most α(τ) of the
  5 % may have been spent on wrong decisions. The exponent ½ spends more at the early looks than
  Pocock's type (≈ τ¹) — a large effect is decided at 3 seeds — and keeps the last look's bound near
  the fixed-sample one.
* **Mean tests** (pass when the lower bound clears the margin, fail when the upper bound misses it):
  the t statistic t_n = (d̄_n − margin) / (s_n / √n) is compared with a critical value c_n per look
  (:data:`T_BOUNDS`). Under the null and normally distributed per-seed values, the joint law of
  (t_3, t_5, …, t_40) does not depend on the mean or the spread, so the c_n are exact: c_3 is the
  Student-t quantile of α(3/40), and each later c_n is set so that the simulated probability of
  crossing first at that look equals the spending increment (:func:`calibrate_t_bounds`, 20,000,000
  simulated sequences: the error rate of the stored values is 0.0500 to within about ±0.0001).
* **Share-of-seeds tests** (a per-seed yes/no, "more than half of the runs"): exact binomial
  boundaries under p = 1/2 from the same spending function (:func:`binomial_bounds`, computed at
  import); passing needs at least a_n yes of n, failing at most n − a_n.

A decision, once made, is final: seeds added later for other checks do not reopen it (the error
guarantee is for the first crossing). Stopping before the last look — the run's budget is spent, or
the claim's verdict no longer depends on the check — can only lower the error rate, since the
bounds do not depend on when the lab stops.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

ALPHA = 0.05
LOOKS = (3, 5, 8, 12, 17, 24, 32, 40)
RHO = 0.5  # the spending function's exponent: alpha * (n / LOOKS[-1]) ** RHO

# critical t per look, from calibrate_t_bounds(LOOKS, ALPHA, RHO, paths=20_000_000, seed=20261205)
T_BOUNDS = {3: 5.9179, 5: 4.3918, 8: 3.309, 12: 2.8635, 17: 2.6348, 24: 2.4538, 32: 2.3539, 40: 2.2983}

# one-sided 95 % quantiles of Student's t, by degrees of freedom (n seeds - 1): the fixed design
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833,
        10: 1.812, 12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697}


def t95(df: int) -> float:
    """The one-sided 95 % quantile of Student's t with ``df`` degrees of freedom; between the table's
    entries the smaller df's (larger, so conservative) value."""
    if df < 1:
        raise ValueError(f"t95: expected df >= 1, got {df}")
    return _T95[max(k for k in _T95 if k <= df)]


def spent(n: int, looks: Sequence[int] = LOOKS, alpha: float = ALPHA, rho: float = RHO) -> float:
    """α(τ): the error probability the design may have spent by the look at ``n`` seeds."""
    return alpha * min(1.0, n / looks[-1]) ** rho


def _binom_pmf(n: int) -> list[float]:
    return [math.comb(n, k) / 2.0**n for k in range(n + 1)]


def binomial_bounds(looks: Sequence[int] = LOOKS, alpha: float = ALPHA, rho: float = RHO) -> dict[int, int]:
    """Per look n, the least number of 'yes' of n seeds that passes a share-of-seeds check (> 1/2).

    Exact, by dynamic programming over the count of 'yes' under p = 1/2: at each look the smallest
    boundary a_n whose first-crossing probability keeps the cumulative total within α(n / N). A look
    where no count is small enough gets n + 1 (cannot pass there). By symmetry a check fails at
    n − a_n yes or fewer (counting seeds that could not tell as yes).
    """
    bounds: dict[int, int] = {}
    alive = [1.0]  # probability of each count so far among paths that have not crossed
    prev, total = 0, 0.0
    for n in looks:
        step = _binom_pmf(n - prev)
        new = [0.0] * (n + 1)
        for k, p in enumerate(alive):
            if p:
                for j, q in enumerate(step):
                    new[k + j] += p * q
        budget = spent(n, looks, alpha, rho) - total
        a, tail = n + 1, 0.0
        while a > 0 and tail + new[a - 1] <= budget + 1e-15:
            a -= 1
            tail += new[a]
        bounds[n] = a
        total += tail
        alive = [p if k < a else 0.0 for k, p in enumerate(new)]
        prev = n
    return bounds


B_BOUNDS = binomial_bounds()


def calibrate_t_bounds(looks: Sequence[int] = LOOKS, alpha: float = ALPHA, rho: float = RHO,
                       paths: int = 20_000_000, seed: int = 20261205) -> dict[int, float]:
    """The critical t per look (how :data:`T_BOUNDS` was computed; numpy and scipy, minutes for 2e7 paths).

    Simulates ``paths`` sequences of standard normal per-seed values; at the first look c is the exact
    Student-t quantile of α(n₁/N); at each later look, c is chosen so that the share of simulated
    sequences whose t statistic crosses c there for the first time equals the spending increment.
    """
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(seed)
    s1 = np.zeros(paths)
    s2 = np.zeros(paths)
    alive = np.ones(paths, dtype=bool)
    crossed, prev, out = 0, 0, {}
    for k, n in enumerate(looks):
        for _ in range(n - prev):  # one seed at a time keeps the memory at a few vectors
            x = rng.standard_normal(paths)
            s1 += x
            s2 += x * x
        prev = n
        mean = s1 / n
        t = mean / np.sqrt(np.maximum(s2 - n * mean * mean, 1e-300) / (n - 1) / n)
        if k == 0:
            c = float(stats.t.ppf(1.0 - spent(n, looks, alpha, rho), n - 1))
        else:
            allowed = int(round(spent(n, looks, alpha, rho) * paths)) - crossed
            top = np.sort(t[alive])[::-1]
            c = float((top[allowed - 1] + top[allowed]) / 2) if allowed >= 1 else float(top[0]) + 1.0
        hit = alive & (t >= c)
        crossed += int(hit.sum())
        alive &= ~hit
        out[n] = round(c, 4)
    return out


# ----------------------------------------------------------------------------- the designs
@dataclass(frozen=True)
class FixedDesign:
    """One look after all the seeds: one-sided 95 % Student-t bounds; Clopper-Pearson for shares."""

    sequential = False

    def usable(self, n: int) -> int:
        return n

    def t_critical(self, n: int) -> float:
        return t95(n - 1)

    def look(self, n: int) -> str:
        return f"over {n} seeds"

    @property
    def name(self) -> str:
        return "one-sided 95 % Student-t bounds on the mean over seeds"


@dataclass(frozen=True)
class SequentialDesign:
    """Looks after ``LOOKS`` seeds with group-sequential bounds (see the module's text)."""

    looks: tuple[int, ...] = LOOKS
    t_bounds: tuple[tuple[int, float], ...] = tuple(T_BOUNDS.items())
    b_bounds: tuple[tuple[int, int], ...] = tuple(B_BOUNDS.items())
    sequential = True

    def usable(self, n: int) -> int:
        """The largest look at or below ``n`` seeds (0 before the first): a check uses only those seeds."""
        return max((k for k in self.looks if k <= n), default=0)

    def next_look(self, n: int) -> int | None:
        return next((k for k in self.looks if k > n), None)

    def t_critical(self, n: int) -> float:
        return dict(self.t_bounds)[n]

    def pass_count(self, n: int) -> int:
        return dict(self.b_bounds)[n]

    def look(self, n: int) -> str:
        return f"over {n} seeds, look {self.looks.index(n) + 1} of {len(self.looks)}"

    @property
    def name(self) -> str:
        return (f"group-sequential one-sided bounds, alpha {ALPHA:g} per direction spent as "
                f"{ALPHA:g}·(n/{self.looks[-1]})^{RHO:g} over looks at {', '.join(map(str, self.looks))} seeds")


FIXED = FixedDesign()
SEQUENTIAL = SequentialDesign()
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("normkit_lab_design", default=FIXED)


def design() -> FixedDesign | SequentialDesign:
    """The design the checks are judged with now (the fixed one unless :func:`active` says otherwise)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def active(d: FixedDesign | SequentialDesign) -> Iterator[None]:
    token = _ACTIVE.set(d)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
