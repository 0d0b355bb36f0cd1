"""Helpers the experiments share."""

from __future__ import annotations


def pad(curves: list[list[float]]) -> list[list[float]]:
    """Curves of unequal length (a diverged run stops early) padded with their last value."""
    n = max(len(c) for c in curves)
    return [list(c) + [c[-1]] * (n - len(c)) for c in curves]
