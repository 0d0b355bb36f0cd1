"""Fused norm + activation layers against torch's unfused pair (norm module → activation module), layer level.

For each activation × family (BatchNormAct2d, GroupNormAct) × layout (NCHW, channels_last) × shape, the two
contenders run in the same process, paired and interleaved (A B, B A, ...); printed: the medians of both and the
median of the per-round ratios torch ÷ normkit (> 1: normkit faster) with the p25–p75 spread of those ratios.

Modes: ``train`` = training forward + backward (``y.backward(dy)``), ``fwd`` = training forward under no_grad,
``eval`` = eval-mode forward under no_grad.

    PYTHONPATH=src python scripts/bench_fused_acts.py [--acts silu,gelu] [--families bn,gn] [--layouts nchw,cl]
        [--modes train,eval] [--rounds 15] [--threads 2] [--dtype float32] [--shapes bn=8x32x48x48,gn=4x128x32x32]
        [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import normkit
from normkit import activations

BN_SHAPES = [(8, 32, 48, 48), (8, 96, 24, 24), (8, 144, 24, 24), (8, 240, 12, 12), (8, 480, 6, 6),
             (8, 672, 6, 6), (8, 1152, 3, 3), (8, 1280, 3, 3)]
GN_SHAPES = [(4, 128, 32, 32), (4, 320, 16, 16)]


CLOCK = time.perf_counter  # --clock cpu: time.process_time (the process's CPU time: a busy shared machine's
#                            descheduling does not count; meaningful at one thread)


def _timeit(fn, n):
    t0 = CLOCK()
    for _ in range(n):
        fn()
    return (CLOCK() - t0) / n


def _busy(interval=0.5):
    """The fraction of all CPUs busy over ``interval`` seconds (/proc/stat), this process idle meanwhile."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(limit, patience=300.0):
    """Wait (at most ``patience`` s) until other processes use less than ``limit`` of the CPUs; returns the busy
    fraction last seen."""
    t_end = time.time() + patience
    busy = _busy()
    while busy > limit and time.time() < t_end:
        busy = _busy()
    return busy


def paired(f_torch, f_nk, rounds, target=0.02):
    for f in (f_torch, f_nk, f_torch, f_nk):
        f()
    n = max(1, int(target / max(_timeit(f_torch, 2), 1e-7)))
    ta, tb, ratios = [], [], []
    for r in range(rounds):
        if r % 2:
            a, b = _timeit(f_torch, n), _timeit(f_nk, n)
        else:
            b, a = _timeit(f_nk, n), _timeit(f_torch, n)
        ta.append(a)
        tb.append(b)
        ratios.append(a / b)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios), q[0], q[2]


def layers(family, act, c):
    mod = activations.to_module(act)
    if family == "bn":
        return nn.Sequential(nn.BatchNorm2d(c), mod), normkit.BatchNormAct2d(c, act=act)
    return nn.Sequential(nn.GroupNorm(32, c), mod), normkit.GroupNormAct(32, c, act=act)


def case(family, act, shape, layout, mode, rounds, dtype):
    torch.manual_seed(0)
    ref, nk = layers(family, act, shape[1])
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    nk.load_state_dict({k.removeprefix("0."): v for k, v in ref.state_dict().items()})
    ref, nk = ref.to(dtype), nk.to(dtype)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = (0.5 + torch.randn(shape)).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    for m in (ref, nk):
        m.train(mode != "eval")
    if mode == "train":
        x.requires_grad_(True)

        def run(m):
            def f():
                x.grad = None
                for p in m.parameters():
                    p.grad = None
                m(x).backward(dy)
            return f
    else:
        def run(m):
            def f():
                with torch.no_grad():
                    m(x)
            return f
    return paired(run(ref), run(nk), rounds)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--acts", default="silu,gelu")
    p.add_argument("--families", default="bn,gn")
    p.add_argument("--layouts", default="nchw,cl")
    p.add_argument("--modes", default="train,eval")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shapes", default="", help="family=AxBxCxD,... instead of the default shapes")
    p.add_argument("--quiet", type=float, default=0.0,
                   help="before each case, wait (up to 5 min) until other processes keep less than this fraction of "
                        "the CPUs busy (0: do not wait); the fraction seen is printed with the case")
    p.add_argument("--no-malloc-tune", action="store_true",
                   help="keep glibc's default mmap threshold (normkit bench's --no-malloc-tune: by default big "
                        "tensors come from the heap, not fresh page-faulting mmaps, for both contenders alike)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall (default) or cpu: the process's CPU time (use with --threads 1 on a busy machine)")
    a = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    if not a.no_malloc_tune:
        from normkit.bench.cli import _tune_malloc

        _tune_malloc()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    shapes = {"bn": BN_SHAPES, "gn": GN_SHAPES}
    if a.shapes:
        shapes = {"bn": [], "gn": []}
        for item in a.shapes.split(","):
            fam, s = item.split("=")
            shapes[fam].append(tuple(int(v) for v in s.split("x")))
    print(f"threads {torch.get_num_threads()} rounds {a.rounds} dtype {a.dtype} clock {a.clock}; ratio = torch / "
          f"normkit (median of paired rounds, p25-p75); load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    ratios = []
    for act in a.acts.split(","):
        act = activations.check("bench", act)
        for fam in a.families.split(","):
            for layout in a.layouts.split(","):
                for mode in a.modes.split(","):
                    for shape in shapes[fam]:
                        busy = wait_quiet(a.quiet) if a.quiet else None
                        tt, tn, r, lo, hi = case(fam, act, shape, layout, mode, a.rounds, dtype)
                        ratios.append(r)
                        name = f"{act:>16s} {fam} {layout:4s} {mode:5s} {'x'.join(map(str, shape)):>13s}"
                        seen = f"  busy before {busy:.2f}" if busy is not None else ""
                        print(f"{name} torch {tt * 1e6:8.1f} us  normkit {tn * 1e6:8.1f} us  ratio {r:5.2f} "
                              f"({lo:.2f}-{hi:.2f}){seen}", flush=True)
    print(f"min ratio {min(ratios):.2f}, geomean "
          f"{statistics.geometric_mean(ratios):.2f}, load {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
