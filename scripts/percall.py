"""Per-call cost of small layers: normkit against torch.nn, eager, in µs per call.

Inputs are small enough that the call's overhead (Python, dispatch, the route's decisions), not the arithmetic,
is what is timed. For each case the torch.nn layer and its normkit twin run interleaved in the same process, one
thread: 7 rounds, each timing torch then normkit (one timing = 200 warm-up calls, then the mean of 2,000 calls,
``time.perf_counter_ns``). A call is the layer's forward, or forward + ``.sum().backward()`` in the ``grad`` cases.
Printed per case: the median of the 7 timings of each and the ratio of the medians torch ÷ normkit (> 1: normkit
cheaper).

    PYTHONPATH=src .venv/bin/python scripts/percall.py                     # every case
    PYTHONPATH=src .venv/bin/python scripts/percall.py ln rms "bn2d train"  # names with spaces quoted

Its results are quoted in docs/benchmarks.md, section "One front door, torch.compile and per-call cost (issue 21,
5 Dec)" (the table "Per-call cost of the front door").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import normkit

ROUNDS = 7


def make_cases():
    """name: (sets the layer's mode, torch.nn layer, normkit layer, input shape, grad)."""
    return {
        "bn2d eval": (lambda m: m.eval(), torch.nn.BatchNorm2d(8), normkit.BatchNorm2d(8), (2, 8, 4, 4), False),
        "bn2d train": (lambda m: m.train(), torch.nn.BatchNorm2d(8), normkit.BatchNorm2d(8), (2, 8, 4, 4), False),
        "bn2d train grad": (lambda m: m.train(), torch.nn.BatchNorm2d(8), normkit.BatchNorm2d(8), (2, 8, 4, 4),
                            True),
        "bn1d train": (lambda m: m.train(), torch.nn.BatchNorm1d(64), normkit.BatchNorm1d(64), (16, 64), False),
        "ln": (lambda m: m, torch.nn.LayerNorm(64), normkit.LayerNorm(64), (4, 8, 64), False),
        "ln grad": (lambda m: m, torch.nn.LayerNorm(64), normkit.LayerNorm(64), (4, 8, 64), True),
        "gn": (lambda m: m, torch.nn.GroupNorm(4, 16), normkit.GroupNorm(4, 16), (2, 16, 4, 4), False),
        "rms": (lambda m: m, torch.nn.RMSNorm(64), normkit.RMSNorm(64), (4, 8, 64), False),
    }


def bench(f, n=2000):
    """µs per call of ``f``: the mean of ``n`` calls after 200 warm-up calls."""
    for _ in range(200):
        f()
    t = time.perf_counter_ns()
    for _ in range(n):
        f()
    return (time.perf_counter_ns() - t) / n / 1e3


def run_case(mode, t, n, shape, grad):
    """The medians (µs) of torch's layer ``t`` and normkit's ``n`` over ``ROUNDS`` interleaved rounds."""
    mode(t)
    mode(n)
    x = torch.randn(shape, requires_grad=grad)
    if grad:
        def ft():
            t(x).sum().backward()

        def fn():
            n(x).sum().backward()
    else:
        def ft():
            t(x)

        def fn():
            n(x)
    rt, rn = [], []
    for _ in range(ROUNDS):
        rt.append(bench(ft))
        rn.append(bench(fn))
    return statistics.median(rt), statistics.median(rn)


def main():
    torch.set_num_threads(1)
    cases = make_cases()
    names = ", ".join(map(repr, cases))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", metavar="CASE", help=f"cases to run (default: all): {names}")
    args = p.parse_args()
    unknown = [c for c in args.cases if c not in cases]
    if unknown:
        p.error(f"unknown case(s) {', '.join(map(repr, unknown))}; known: {names}")

    for name, (mode, t, n, shape, grad) in cases.items():
        if args.cases and name not in args.cases:
            continue
        mt, mn = run_case(mode, t, n, shape, grad)
        print(f"{name:18s} torch {mt:7.2f} us  normkit {mn:7.2f} us  ratio {mt / mn:5.2f}")


if __name__ == "__main__":
    main()
