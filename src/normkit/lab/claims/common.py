"""Helpers the experiments share: check builders over per-seed metrics, curve padding."""

from __future__ import annotations

from ..framework import mean, need


def pad(curves: list[list[float]]) -> list[list[float]]:
    """Curves of unequal length (a diverged run stops early) padded with their last value."""
    n = max(len(c) for c in curves)
    return [list(c) + [c[-1]] * (n - len(c)) for c in curves]


def mean_of(metrics, name: str) -> float:
    return mean(need(metrics, name))


def better_by(metrics, a: str, b: str, margin: float) -> bool:
    """mean(a) − mean(b) >= margin (per-seed lists)."""
    return mean_of(metrics, a) - mean_of(metrics, b) >= margin
