"""What an experiment sees while it runs: seeds, budget (full or quick), device, data, progress bars."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tqdm.auto import tqdm

from . import data as D
from .framework import bounds_of, censored, is_censored, mean, std

T = TypeVar("T")


@dataclass
class Context:
    seeds: list[int]
    quick: bool = False
    device: str = "cpu"
    user_data: D.ImageData | None = None
    show_progress: bool = True
    position: str = ""  # "[3/11] ": where the running claim is in the run, shown on its progress bar
    executor: Any = None  # a concurrent.futures executor of worker processes (``--jobs``), or None
    _cache: dict[str, D.ImageData] = field(default_factory=dict)
    _memo: dict[tuple, Any] = field(default_factory=dict)
    _pending: dict[tuple, tuple] = field(default_factory=dict)  # key -> (future, fn, args), in order

    def submit(self, key: tuple, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` (a pure, seeded function) in a worker; :meth:`memo` of ``key`` collects it."""
        if self.executor is None or key in self._memo or key in self._pending:
            return
        self._pending[key] = (self.executor.submit(fn, *args), fn, args)

    def memo(self, key: tuple, compute: Callable[[], T]) -> T:
        """``compute()`` once per ``key`` in this run: claims that train the same arm share the result.

        A run handed to a worker is collected from it. While it is still running, this process computes
        the runs that no worker has started yet (the latest submitted, the cheapest, first) instead of
        waiting; every run is seeded, so where it runs does not change its numbers.
        """
        if key in self._memo:
            return self._memo[key]
        if key in self._pending:
            future = self._pending[key][0]
            if future.cancel():
                del self._pending[key]
            else:
                for other in reversed(list(self._pending)):
                    if future.done():
                        break
                    f, fn, args = self._pending[other]
                    if other != key and f.cancel():
                        del self._pending[other]
                        self._memo[other] = fn(*args)
                self._memo[key] = future.result()
                del self._pending[key]
                return self._memo[key]
        self._memo[key] = compute()
        return self._memo[key]

    def pick(self, full: T, quick: T) -> T:
        """The full-run setting or the ``--quick`` one."""
        return quick if self.quick else full

    def images(self, which: str = "digits") -> D.ImageData:
        """An image set on the run's device: ``digits`` or ``mnist``; the user's ``--data`` replaces both."""
        key = "user" if self.user_data is not None else which
        if key not in self._cache:
            if self.user_data is not None:
                base = self.user_data
            elif which == "digits":
                base = D.digits()
            elif which == "mnist":
                base = D.mnist5000()
            else:
                raise ValueError(f"images: expected 'digits' or 'mnist', got {which!r}")
            self._cache[key] = base.to(self.device)
        return self._cache[key]

    def bar(self, total: int, desc: str) -> Any:
        return tqdm(
            total=total,
            desc=self.position + desc,
            unit="run",
            leave=False,
            file=sys.stderr,
            disable=not self.show_progress,
            dynamic_ncols=True,
        )


def record(metrics: dict[str, Any], name: str, per_seed: list) -> None:
    """Store a per-seed list under ``name`` with its ``name_mean`` and ``name_std`` (spread over seeds).

    Censored values (``"> cap"``) stay as they are; the mean is then only known from below
    (``"> x"``, x the mean of the lower bounds) and the spread is not given.
    """
    if any(is_censored(v) for v in per_seed):
        metrics[name] = list(per_seed)
        metrics[f"{name}_mean"] = censored(round(mean([bounds_of(v)[0] for v in per_seed]), 3))
        metrics[f"{name}_std"] = None
        return
    per_seed = [float(v) for v in per_seed]
    metrics[name] = per_seed
    metrics[f"{name}_mean"] = mean(per_seed)
    metrics[f"{name}_std"] = std(per_seed)
