"""What an experiment sees while it runs: seeds, budget (full or quick), device, data, progress bars."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tqdm.auto import tqdm

from . import data as D
from .framework import mean, std

T = TypeVar("T")


@dataclass
class Context:
    seeds: list[int]
    quick: bool = False
    device: str = "cpu"
    user_data: D.ImageData | None = None
    show_progress: bool = True
    position: str = ""  # "[3/11] ": where the running claim is in the run, shown on its progress bar
    _cache: dict[str, D.ImageData] = field(default_factory=dict)
    _memo: dict[tuple, Any] = field(default_factory=dict)

    def memo(self, key: tuple, compute: Callable[[], T]) -> T:
        """``compute()`` once per ``key`` in this run: claims that train the same arm share the result."""
        if key not in self._memo:
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


def record(metrics: dict[str, Any], name: str, per_seed: list[float]) -> None:
    """Store a per-seed list under ``name`` with its ``name_mean`` and ``name_std`` (spread over seeds)."""
    per_seed = [float(v) for v in per_seed]
    metrics[name] = per_seed
    metrics[f"{name}_mean"] = mean(per_seed)
    metrics[f"{name}_std"] = std(per_seed)
