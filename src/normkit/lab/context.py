"""What an experiment sees: full or quick run, device, data, progress bars — and how its runs execute."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm.auto import tqdm

from . import data as D
from .framework import bounds_of, censored, is_censored, mean, std

T = TypeVar("T")

Job = tuple[tuple, Callable[..., Any], tuple]  # (key, fn, args): fn(*args) is one seed of one part


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, str | None]:
    """``fn(*args)`` with the CPU seconds it took in this process; an exception becomes its traceback
    (one broken run must not lose the others)."""
    start = time.process_time()
    try:
        result, error = fn(*args), None
    except Exception:
        result, error = None, traceback.format_exc()
    return result, time.process_time() - start, error


@dataclass
class Context:
    quick: bool = False
    device: str = "cpu"
    user_data: D.ImageData | None = None
    show_progress: bool = True
    executor: Any = None  # a concurrent.futures executor of worker processes (``--jobs``), or None

    def __post_init__(self):
        D.use(self.user_data)

    def pick(self, full: T, quick: T) -> T:
        """The full-run setting or the ``--quick`` one."""
        return quick if self.quick else full

    def data_ref(self, which: str = "digits") -> str:
        """The name a run loads its images by: ``digits`` or ``mnist``; the user's ``--data`` replaces both."""
        if which not in ("digits", "mnist"):
            raise ValueError(f"images: expected 'digits' or 'mnist', got {which!r}")
        return "user" if self.user_data is not None else which

    def images(self, which: str = "digits") -> D.ImageData:
        """An image set on the run's device (see :meth:`data_ref`)."""
        return D.resolve(self.data_ref(which), self.device)

    def bar(self, total: int, desc: str) -> Any:
        return tqdm(total=total, desc=desc, unit="run", leave=False, file=sys.stderr,
                    disable=not self.show_progress, dynamic_ncols=True)

    def execute(self, jobs: Sequence[Job], desc: str = "") -> dict[tuple, tuple[Any, float, str | None]]:
        """Run ``jobs`` (the longest first) and return ``{key: (result, cpu seconds, error)}``.

        With worker processes, the workers take jobs from the front of the list while this process takes
        the ones no worker has started yet from the back (the cheapest); every run is seeded, so where it
        runs does not change its numbers.
        """
        out: dict[tuple, tuple[Any, float, str | None]] = {}
        with self.bar(len(jobs), desc) as bar:
            if self.executor is None:
                for key, fn, args in jobs:
                    out[key] = timed(fn, *args)
                    bar.update()
                return out
            futures = [(key, self.executor.submit(timed, fn, *args), fn, args) for key, fn, args in jobs]
            for key, future, fn, args in reversed(futures):
                if future.cancel():
                    out[key] = timed(fn, *args)
                    bar.update()
            for key, future, _, _ in futures:
                if key not in out:
                    out[key] = future.result()
                    bar.update()
        return out


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
