"""Figure helpers (matplotlib, Agg backend): mean ± spread over seeds."""

from __future__ import annotations

import numpy as np

COLORS = {
    "none": "#7f7f7f",
    "bn": "#1f77b4",
    "noisy_bn": "#9467bd",
    "ln": "#2ca02c",
    "gn": "#ff7f0e",
    "in": "#8c564b",
    "brn": "#d62728",
    "gbn": "#17becf",
    "bn_step": "#1f77b4",
    "bn_shared": "#aec7e8",
    "before": "#1f77b4",
    "after": "#ff7f0e",
}
LABELS = {
    "none": "no norm",
    "bn": "BatchNorm",
    "noisy_bn": "noisy BN",
    "ln": "LayerNorm",
    "gn": "GroupNorm",
    "in": "InstanceNorm",
    "brn": "Batch Renorm",
    "gbn": "Ghost BN",
    "bn_step": "BN, per-step stats",
    "bn_shared": "BN, shared stats",
}


def color(arm: str) -> str:
    return COLORS.get(arm, None)


def label(arm: str) -> str:
    return LABELS.get(arm, arm)


def band(ax, x, runs, arm: str, *, marker: str = "o", name: str | None = None) -> None:
    """Plot the mean over seeds of ``runs`` (seeds × len(x)) with a ±1 std band."""
    a = np.asarray(runs, dtype=float)
    if a.ndim == 1:
        a = a[None]
    m, s = np.nanmean(a, axis=0), (np.nanstd(a, axis=0, ddof=1) if a.shape[0] > 1 else np.zeros(a.shape[1]))
    ax.plot(x, m, marker=marker, ms=3, color=color(arm), label=name or label(arm))
    ax.fill_between(x, m - s, m + s, color=color(arm), alpha=0.2, linewidth=0)


def band_lists(ax, x, lists, arm: str, *, marker: str = "o") -> None:
    """Like :func:`band` when each x has its own per-seed list (parts with different numbers of seeds)."""
    m = [float(np.mean(v)) if len(v) else np.nan for v in lists]
    s = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in lists]
    m, s = np.asarray(m), np.asarray(s)
    ax.plot(x, m, marker=marker, ms=3, color=color(arm), label=label(arm))
    ax.fill_between(x, m - s, m + s, color=color(arm), alpha=0.2, linewidth=0)


def bars(ax, groups: list[str], arms: list[str], values: dict[str, list[list[float]]], ylabel: str,
         names: dict[str, tuple[str, str]] | None = None) -> None:
    """Grouped bars: ``values[arm][g]`` is the per-seed list for group ``g``; error bars = std over seeds.

    ``names`` maps an arm to (label, color) when it is not one of the norms known here.
    """
    names = names or {}
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        per_group = values.get(arm)
        if per_group is None:
            continue
        xs = np.arange(len(groups)) + (i - (len(arms) - 1) / 2) * width
        m = [np.mean(v) if v else np.nan for v in per_group]
        s = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per_group]
        name, col = names.get(arm, (label(arm), color(arm)))
        ax.bar(xs, m, width, yerr=s, color=col, label=name, capsize=2)
        for x, v in zip(xs, per_group, strict=False):
            ax.plot([x] * len(v), v, ".", color="black", ms=3)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)


def finish(ax, title: str, xlabel: str = "", ylabel: str = "", legend: bool = True) -> None:
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
