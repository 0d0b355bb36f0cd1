"""Under torch.compile, per op: normkit's custom op kept opaque against torch's composite form (Inductor).

For each case the same normkit layer is compiled twice with ``torch.compile``: once with
``route.COMPILE_KEEPS_OP = {op}`` (Inductor sees normkit's custom op, opaque) and once with it empty (the route
sends the norm to torch's own operators, which Inductor decomposes and fuses). Each is warmed up (two calls), then
the two run in 12 paired, interleaved rounds (A B, B A, ...; one round = the mean of 3 calls), one thread. A call is
a compiled training forward + ``y.sum().backward()`` (``*_train_*`` cases) or an eval-mode forward under no_grad
(``*_eval_*``). Printed per case: the median of the per-round ratios composite ÷ op (> 1: the opaque op faster) with
its q1 and q3 (4th and 9th of the 12 sorted ratios), the ratio of the two minima, and the composite's minimum in ms.

    PYTHONPATH=src .venv/bin/python scripts/compile_opaque_vs_composite.py            # every case
    PYTHONPATH=src .venv/bin/python scripts/compile_opaque_vs_composite.py ln_train rms_train

Its results are quoted in docs/benchmarks.md, section "One front door, torch.compile and per-call cost (issue 21,
5 Dec)" (the table "Keep an op opaque where it wins?").
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import normkit
from normkit import route

ROUNDS = 12
IMAGE = (8, 64, 56, 56)

# name: (the route's op name, the layer's factory, input shape, channels_last, train)
CASES = {
    "bn_relu_train_nchw": ("batch_norm_train", lambda: normkit.BatchNormAct2d(64, act="relu"), IMAGE, False, True),
    "bn_silu_train_nchw": ("batch_norm_train", lambda: normkit.BatchNormAct2d(64, act="silu"), IMAGE, False, True),
    "bn_train_cl": ("batch_norm_train", lambda: normkit.BatchNorm2d(64), IMAGE, True, True),
    "gn_train_cl": ("group_norm", lambda: normkit.GroupNorm(32, 64), IMAGE, True, True),
    "gn_silu_train_nchw": ("group_norm", lambda: normkit.GroupNormAct(32, 64, act="silu"), IMAGE, False, True),
    "rms_train": ("rms_norm", lambda: normkit.RMSNorm(1024), (4096, 1024), False, True),
    "ln_train": ("layer_norm", lambda: normkit.LayerNorm(1024), (4096, 1024), False, True),
    "ln2d_train_nchw": ("layer_norm_2d", lambda: normkit.LayerNorm2d(64), IMAGE, False, True),
    "rms_small_train": ("rms_norm", lambda: normkit.RMSNorm(256), (64, 256), False, True),
    "bn_relu_eval_nchw": ("batch_norm_infer", lambda: normkit.BatchNormAct2d(64, act="relu").eval(), IMAGE, False,
                          False),
}


def compiled_call(op, make, shape, cl, train, keep):
    """One call of the layer compiled with ``op`` kept opaque (``keep``) or composite, warmed up (two calls)."""
    route.COMPILE_KEEPS_OP = frozenset({op} if keep else ())
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = make()
    x = 1 + torch.randn(shape)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(train)
    cm = torch.compile(m)
    if train:
        def f():
            y = cm(x)
            y.sum().backward()
    else:
        def f():
            with torch.no_grad():
                cm(x)
    f()
    f()
    return f


def clock(f, n=3):
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", metavar="CASE", help=f"cases to run (default: all): {', '.join(CASES)}")
    args = p.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for name, (op, make, shape, cl, train) in CASES.items():
        if args.cases and name not in args.cases:
            continue
        fns = {keep: compiled_call(op, make, shape, cl, train, keep) for keep in (False, True)}
        route.COMPILE_KEEPS_OP = frozenset()
        r, ta, tb = [], [], []
        for i in range(ROUNDS):  # ABBA
            if i % 2:
                b = clock(fns[True])
                a = clock(fns[False])
            else:
                a = clock(fns[False])
                b = clock(fns[True])
            r.append(a / b)
            ta.append(a)
            tb.append(b)
        print(f"{name:22s} op faster by (composite/op): paired median {statistics.median(r):.2f} "
              f"(q1 {sorted(r)[3]:.2f} q3 {sorted(r)[8]:.2f}), ratio of minima {min(ta) / min(tb):.2f}; "
              f"composite min {min(ta) * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
