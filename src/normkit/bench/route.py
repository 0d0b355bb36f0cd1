"""``normkit bench --suite route``: the data behind :func:`normkit.route.prefer_aten`, and a check of it.

On the ``auto`` backend a plain eager CPU call goes either to aten's own kernel (the *aten*
route: torch's operator, normkit's checks and state rules around it) or to normkit's kernels
(the *kernel* route: the C++ ops). For each op × mode × size class this suite times both routes
through :mod:`normkit.functional` in paired, interleaved rounds — the aten route as
``normkit.backend("auto")`` would take it, the kernel route forced with ``normkit.backend("cpu")``
— and prints which is faster, by how much, and what the rule chose. aten is *admissible* only
where it gives the same bits for any thread count and with or without grad
(:func:`normkit.route.aten_admissible`); where it is, a row where the rule picked the slower
route by more than ``--route-margin`` (default 10%) is marked ``MISS``: the data says the
threshold should move. Rows where aten is not admissible show what that guarantee costs. The
ratios depend on the machine and its load; the rule in :mod:`normkit.route` cites the run behind
it (docs/benchmarks.md).

Ops and modes (NCHW; sizes are total elements, split as the shapes below show):

=============  ===============================  =======================================
op             call                             mode
=============  ===============================  =======================================
bn_train       BatchNorm2d, training            forward + backward (+ running update)
bn_infer       BatchNorm2d, eval                forward
gn             GroupNorm(8)                     forward + backward
ln_train       LayerNorm(256)                   forward + backward
ln_infer       LayerNorm(256)                   forward (no grad)
rms_train      RMSNorm(256)                     forward + backward
=============  ===============================  =======================================
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import normkit

from .. import route

_OPS = ("bn_train", "bn_infer", "gn", "ln_train", "ln_infer", "rms_train")
_ROUTE_OP = {"bn_train": "batch_norm_train", "bn_infer": "batch_norm_infer", "gn": "group_norm",
             "ln_train": "layer_norm", "ln_infer": "layer_norm", "rms_train": "rms_norm"}


def _shape(op: str, elements: int) -> tuple[int, ...]:
    if op.startswith(("ln", "rms")):
        return (max(1, elements // 256), 256)
    c, hw = 32, 8 * 8
    return (max(2, elements // (c * hw)), c, 8, 8)


def _layer(op: str) -> nn.Module:
    if op.startswith("bn"):
        layer = normkit.BatchNorm2d(32)
        return layer.eval() if op == "bn_infer" else layer
    if op == "gn":
        return normkit.GroupNorm(8, 32)
    if op.startswith("ln"):
        return normkit.LayerNorm(256)
    return normkit.RMSNorm(256)


def _step(op: str, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, backend: str,
          calls: int) -> Callable[[], float]:
    grad = not op.endswith("infer")

    def run() -> float:
        with normkit.backend(backend):
            t0 = time.perf_counter()
            for _ in range(calls):
                if grad:
                    layer(x).backward(dy)
                else:
                    with torch.no_grad():
                        layer(x)
            return (time.perf_counter() - t0) / calls
    return run


def measure(op: str, elements: int, rounds: int, calls: int) -> dict:
    """One row: per-call medians of both routes and the rule's choice for this call."""
    from .timing import paired

    torch.manual_seed(0)
    shape = _shape(op, elements)
    grad = not op.endswith("infer")
    x = (3 + torch.randn(shape)).requires_grad_(grad)
    dy = torch.randn(shape)
    layer = _layer(op)
    times = paired({"aten": _forced_aten(op, layer, x, dy, calls), "kernel": _step(op, layer, x, dy, "cpu", calls)},
                   rounds)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    chosen = "aten" if _aten_chosen(op, x) else "kernel"
    faster = min(med, key=med.get)
    slower = max(med, key=med.get)
    admissible = route.aten_admissible(_ROUTE_OP[op], x, needs_grad=grad)
    return {"op": op, "shape": list(shape), "elements": x.numel(), "aten_us": med["aten"], "kernel_us": med["kernel"],
            "faster": faster, "ratio": med[slower] / med[faster], "chosen": chosen,
            "chosen_cost": med[chosen] / med[faster], "aten_admissible": admissible}


def _aten_chosen(op: str, x: torch.Tensor) -> bool:
    with normkit.backend("auto"):
        return route.prefer_aten(_ROUTE_OP[op], x, needs_grad=not op.endswith("infer"))


def _forced_aten(op: str, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, calls: int) -> Callable[[], float]:
    """The aten route: the ``auto`` call with the rule answering "aten" (everything else of the call,
    normkit's checks and running-statistics policy included, unchanged)."""
    inner = _step(op, layer, x, dy, "auto", calls)

    def run() -> float:
        rule = route.prefer_aten
        route.prefer_aten = lambda *args, **kwargs: True
        try:
            return inner()
        finally:
            route.prefer_aten = rule
    return run


def main(args) -> int:
    """Run the suite, print the table, write JSON."""
    import datetime
    import sys

    from tqdm import tqdm

    from . import report

    if args.device != "cpu":
        print("normkit bench --suite route: the route rule is for CPU calls (--device cpu)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from .. import ops

    if ops.native_ops() is None:
        print("normkit bench --suite route: the C++ extension is not built: there is no kernel route to time",
              file=sys.stderr)
        return 2
    tiny = args.sizes == "tiny"
    sizes = (2 ** 10, 2 ** 14) if tiny else (2 ** 10, 2 ** 13, 2 ** 15, 2 ** 17, 2 ** 19)
    rounds = args.rounds or (3 if args.quick or tiny else 7)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    jobs = [(op, n) for op in _OPS for n in sizes]
    for op, n in tqdm(jobs, desc="normkit bench route", unit="case", file=sys.stderr):
        calls = 2 if tiny else max(3, min(200, 2 ** 17 // n))
        rows.append(measure(op, n, rounds, calls))
    margin = 1 + args.route_margin
    print(f"{torch.get_num_threads()} threads; per-call µs, medians of {rounds} paired rounds"
          + (" (tiny sizes: not a benchmark)" if tiny else ""))
    print(f"{'op':10s} {'shape':>16s} {'aten':>10s} {'kernel':>10s}  {'faster':>7s} {'by':>6s}  {'rule':>7s}")
    misses = 0
    for r in rows:
        r["miss"] = r["aten_admissible"] and r["chosen_cost"] > margin
        misses += r["miss"]
        note = "MISS" if r["miss"] else "" if r["aten_admissible"] else "(aten not admissible)"
        print(f"{r['op']:10s} {'x'.join(map(str, r['shape'])):>16s} {r['aten_us']:10.1f} {r['kernel_us']:10.1f}  "
              f"{r['faster']:>7s} {r['ratio']:5.2f}x  {r['chosen']:>7s}  {note}")
    print(f"{misses} of {len(rows)} choices cost more than {args.route_margin:.0%} over the faster admissible route")
    doc = {"schema": report.SCHEMA, "suite": "route", "command": "normkit " + " ".join(sys.argv[1:]),
           "started_utc": started, "machine": report.machine("cpu"), "versions": report.versions(),
           "settings": {"rounds": rounds, "sizes": args.sizes, "aten_below": route.ATEN_BELOW,
                        "margin": args.route_margin},
           "summary": {"choices": len(rows), "misses": misses}, "records": rows}
    if args.json:
        report.write_json(args.json, doc)
    return 0
