"""Output of ``normkit bench``: the terminal table, the JSON file and the plot.

JSON schema (``"schema": "normkit-bench/1"``)::

    {"schema", "command", "started_utc", "machine": {...}, "versions": {...},
     "copy_bandwidth_GBps", "settings": {...},
     "records": [{"op", "op_key", "mode", "shape", "layout", "dtype", "device", "bytes", "copy_GBps",
                  "normkit_backend",
                  "impls": {"torch" | "torch.compile" | "normkit" | "liger":
                            {"median_ms", "min_ms", "p25_ms", "p75_ms", "max_ms", "times_ms",
                             "speedup_vs_torch", "GBps", "pct_roofline"}}}, ...],
     "e2e": [{"op", "mode": "step", ..., "impls": {...}, "max_loss_diff" | "max_output_diff"}]}
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np
import torch

SCHEMA = "normkit-bench/1"


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    import numba

    import normkit

    out = {"python": platform.python_version(), "torch": torch.__version__, "numba": numba.__version__,
           "numpy": np.__version__, "normkit": normkit.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(records: list[dict], e2e: list[dict]) -> str:
    """A fixed-width table: times (median ms), speed-ups vs torch eager, GB/s and % roofline."""
    head = (f"{'op':<14}{'layout':<14}{'dtype':<9}{'mode':<8}{'torch':>9}{'compile':>9}{'normkit':>9}"
            f"{'x torch':>8}{'x comp':>8}{'GB/s':>7}{'%roof':>7}")
    lines = [head, "-" * len(head)]
    for r in records + e2e:
        im = r["impls"]
        t, c, n = (im.get(k, {}).get("median_ms") for k in ("torch", "torch.compile", "normkit"))
        nk = im.get("normkit", {})
        xc = (c / n) if (c and n) else None
        lines.append(f"{r['op']:<14.14}{r['layout']:<14}{r['dtype']:<9}{r['mode']:<8}{_fmt(t, '9.2f')}"
                     f"{_fmt(c, '9.2f')}{_fmt(n, '9.2f')}{_fmt(nk.get('speedup_vs_torch'), '8.2f')}"
                     f"{_fmt(xc, '8.2f')}{_fmt(nk.get('GBps'), '7.1f')}"
                     f"{_fmt(nk.get('pct_roofline'), '7.0f')}")
    return "\n".join(lines)


def plot(path: str, records: list[dict], e2e: list[dict], title: str) -> None:
    """Speed-up over torch eager (log scale) and % of roofline, one bar group per record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = records + e2e
    labels = [f"{r['op']} {r['layout'][:2]} {r['dtype'][:4]} {r['mode']}" for r in rows]
    names = sorted({k for r in rows for k in r["impls"] if k != "torch"})
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(rows) + 3), 9), sharex=True)
    xs = np.arange(len(rows))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        ys = [r["impls"].get(name, {}).get("speedup_vs_torch", np.nan) for r in rows]
        axes[0].bar(xs + i * width, ys, width, label=name)
    axes[0].axhline(1.0, color="black", lw=0.8)
    axes[0].axhline(3.0, color="red", lw=0.8, ls="--", label="target 3x")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("speed-up vs torch eager (median)")
    axes[0].legend()
    axes[0].set_title(title)
    roof = [r["impls"].get("normkit", {}).get("pct_roofline", np.nan) for r in rows]
    torch_roof = [r["impls"].get("torch", {}).get("pct_roofline", np.nan) for r in rows]
    axes[1].bar(xs - 0.2, torch_roof, 0.4, label="torch eager")
    axes[1].bar(xs + 0.2, roof, 0.4, label="normkit")
    axes[1].axhline(70, color="red", lw=0.8, ls="--", label="target 70%")
    axes[1].set_ylabel("% of copy roofline")
    axes[1].set_xticks(xs, labels, rotation=75, ha="right", fontsize=7)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(records: list[dict], e2e: list[dict]) -> str:
    """The table as Markdown (for docs/benchmarks.md): medians in ms, spread as p25–p75."""
    out = ["| op | layout | mode | torch eager ms | torch.compile ms | normkit ms (p25–p75) | × eager | "
           "× compile | normkit GB/s | % roofline (normkit / eager) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records + e2e:
        im = r["impls"]
        t, c, n = (im.get(k, {}) for k in ("torch", "torch.compile", "normkit"))
        xc = c["median_ms"] / n["median_ms"] if c and n else None
        roof = (f"{n['pct_roofline']:.0f} / {t['pct_roofline']:.0f}" if "pct_roofline" in n else "-")
        spread = f"{n['p25_ms']:.1f}–{n['p75_ms']:.1f}"
        out.append(f"| {r['op']} | {r['layout']} | {r['mode']} | {t['median_ms']:.1f} | "
                   f"{_fmt(c.get('median_ms'), '.1f')} | {n['median_ms']:.1f} ({spread}) | "
                   f"{n['speedup_vs_torch']:.2f} | {_fmt(xc, '.2f')} | {_fmt(n.get('GBps'), '.1f')} | "
                   f"{roof} |")
    return "\n".join(out)
