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

``--suite models`` writes the same envelope with ``"suite": "models"``, a ``"summary"``
(``geomean_everyday``, ``geomean_per_call``) and records shaped like the e2e ones plus a
``"group"`` (``everyday``, ``per call``, ``network``, ``saved_bytes``, ``inplace``, ``first_call``); see
:mod:`.models`. Its impls have no ``GBps`` / ``pct_roofline`` (a model has no roofline here).
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
    import importlib

    import normkit
    from normkit import backends

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "normkit": normkit.__version__, "cpu kernels": backends.available()["cpu"]}
    for optional in ("triton",):  # reported when installed
        try:
            out[optional] = importlib.import_module(optional).__version__
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


def models_table(records: list[dict], summary: dict) -> str:
    """The models suite as fixed-width text: medians in ms and torch ÷ normkit, then the summary."""
    head = f"{'case':<24}{'group':<10}{'mode':<12}{'shape':<18}{'torch':>10}{'normkit':>10}{'x torch':>9}{'diff':>9}"
    lines = [head, "-" * len(head)]
    for r in records:
        shape = "x".join(map(str, r["shape"]))
        if r["group"] == "saved_bytes":
            sb = r["saved_bytes"]
            lines.append(f"{r['op'][:23]:<24}{'memory':<10}{r['mode']:<12}{shape:<18}"
                         f"{sb['torch']['distinct'] / 2**20:>7.1f}MiB{sb['normkit']['distinct'] / 2**20:>7.1f}MiB"
                         f"{r['ratio_normkit_vs_torch']['distinct']:>9.2f}  (normkit/torch, distinct storages)")
            continue
        t, n = r["impls"]["torch"], r["impls"]["normkit"]
        diff = r.get("max_output_diff", r.get("max_loss_diff"))
        lines.append(f"{r['op'][:23]:<24}{r['group'][:9]:<10}{r['mode']:<12}{shape:<18}{t['median_ms']:>10.3f}"
                     f"{n['median_ms']:>10.3f}{n['speedup_vs_torch']:>9.2f}{_fmt(diff, '9.1e'):>9}")
        if r["group"] == "inplace":
            sb, pk = r["saved_bytes"], r.get("peak_step_bytes") or {}
            peak = (f", peak of the step {pk['torch'] / 2**20:.1f} -> {pk['normkit'] / 2**20:.1f} MiB "
                    f"({r['ratio_peak_normkit_vs_torch']:.2f}x)" if pk.get("torch") else "")
            saved = r["ratio_saved_normkit_vs_torch"]["distinct"]
            lines.append(f"    saved for backward {sb['torch']['distinct'] / 2**20:.1f} -> "
                         f"{sb['normkit']['distinct'] / 2**20:.1f} MiB ({saved:.2f}x){peak}; "
                         f"{r['inplace_layers']} InPlaceABN ({r['writing_layers']} writing their input)")
        if r["group"] == "compiled":
            cs = r["compile_s"]
            lines.append(f"    first call (compile): torch {cs['torch']:.1f} s, normkit {cs['normkit']:.1f} s")
        if r["group"] == "first_call":
            parts = ", ".join(f"{k} {n[k]:.2f} s (torch {t[k]:.2f})" for k in
                              ("import_normkit_s", "build_s", "first_step_s", "second_step_s"))
            lines.append(f"    normkit: {parts}")
    lines.append(f"geometric mean x torch: everyday {_fmt(summary['geomean_everyday'], '.2f')} "
                 f"({summary['everyday_cases']} cases), per call {_fmt(summary['geomean_per_call'], '.2f')} "
                 f"({summary['per_call_cases']} cases), compiled {_fmt(summary.get('geomean_compiled'), '.2f')} "
                 f"({summary.get('compiled_cases', 0)} cases)")
    return "\n".join(lines)


def models_plot(path: str, records: list[dict], summary: dict, title: str) -> None:
    """torch ÷ normkit per case (log scale, 1.0 = parity), and bytes saved for backward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in records if "impls" in r]
    mem = [r for r in records if r["group"] in ("saved_bytes", "inplace")]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 0.45 * len(timed) + 5), 6),
                             gridspec_kw={"width_ratios": [max(len(timed), 1), 2]})
    colors = {"everyday": "tab:blue", "per call": "tab:orange", "network": "tab:green", "first_call": "tab:red",
              "compiled": "tab:purple", "inplace": "tab:brown"}
    xs = np.arange(len(timed))
    ys = [r["impls"]["normkit"]["speedup_vs_torch"] for r in timed]
    axes[0].bar(xs, ys, color=[colors.get(r["group"], "gray") for r in timed])
    axes[0].axhline(1.0, color="black", lw=0.8)
    if summary.get("geomean_everyday"):
        axes[0].axhline(summary["geomean_everyday"], color="tab:blue", lw=0.8, ls="--",
                        label=f"geomean everyday {summary['geomean_everyday']:.2f}")
        axes[0].legend()
    axes[0].set_yscale("log")
    axes[0].set_ylabel("torch time / normkit time (median; >1: normkit faster)")
    labels = [f"{r['op']} {r['mode']} {'x'.join(map(str, r['shape']))}" for r in timed]
    axes[0].set_xticks(xs, labels, rotation=75, ha="right", fontsize=7)
    axes[0].set_title(title, fontsize=9)
    for i, r in enumerate(mem):
        sb = r["saved_bytes"]
        axes[1].bar([2 * i - 0.2, 2 * i + 0.2], [sb["torch"]["distinct"] / 2**20, sb["normkit"]["distinct"] / 2**20],
                    0.4, color=["gray", "tab:blue"])
    axes[1].set_xticks([2 * i for i in range(len(mem))], [f"{r['op'][:18]}\ntorch | normkit" for r in mem],
                       fontsize=7, rotation=60, ha="right")
    axes[1].set_ylabel("MiB saved for backward (training step)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
