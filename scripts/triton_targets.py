"""Time the issue's GPU targets for the Triton backend against torch, in one short run.

    python scripts/triton_targets.py --json docs/benchmarks/gpu-<device>-targets.json
    TRITON_INTERPRET=1 python scripts/triton_targets.py --smoke     # tiny shapes on the CPU: logic only

Targets (issue 4): BatchNorm2d fwd+bwd, bf16, channels_last at ResNet-50 shapes >= 1.2x torch;
LayerNorm / RMSNorm 16384x4096 bf16 forward >= 85 % and backward >= 70 % of the copy bandwidth
measured in the same run; GroupNorm(32) fwd+bwd >= 2x torch.

Method: each case runs normkit (backend "triton") and torch (cuDNN / ATen) alternately,
A B A B ..., ``--rounds`` times after a warm-up; the figure is the ratio of medians. Bandwidth is
bytes the op must move (read x [+ dy], write y [or dx]) / median time, against a device copy of
the same size timed in the same run. The complete `normkit bench` is the reference benchmark;
this script exists so that a GPU session always yields the target numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import normkit


def _timer(device):
    def elapsed(fn):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return elapsed


def paired(fns, rounds, elapsed):
    """Median seconds of each fn, timed alternately (A B A B ...) after one warm-up each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(elapsed(fn))
    return [statistics.median(t) for t in times]


def fwd_bwd(layer, x, dy):
    def run():
        x.grad = None
        layer(x).backward(dy)
    return run


def fwd(layer, x):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def bwd(layer, x, dy):
    y = layer(x)

    def run():
        x.grad = None
        y.backward(dy, retain_graph=True)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the records here")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script, not the speed)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16
    elapsed = _timer(device)
    rounds = 2 if args.smoke else args.rounds
    bn_shapes = [(2, 3, 5, 7)] if args.smoke else [(256, 64, 112, 112), (256, 256, 56, 56)]
    row_shape = (8, 33) if args.smoke else (16384, 4096)
    gn_shape = (2, 64, 3, 3) if args.smoke else (32, 256, 56, 56)
    records = []

    def record(**r):
        r.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", dtype=str(dt))
        records.append(r)
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))

    def make(shape, cl):
        x = torch.randn(shape, device=device, dtype=dt)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(), torch.randn_like(x)

    for shape in bn_shapes:  # BatchNorm2d fwd+bwd, channels_last
        x, dy = make(shape, True)
        ours = normkit.BatchNorm2d(shape[1], device=device)
        ref = torch.nn.BatchNorm2d(shape[1], device=device)
        with normkit.backend("triton"):
            t_ours, t_ref = paired([fwd_bwd(ours, x, dy), fwd_bwd(ref, x, dy)], rounds, elapsed)
        record(op="batch_norm2d", mode="fwd+bwd", layout="channels_last", shape=list(shape),
               ms=t_ours * 1e3, torch_ms=t_ref * 1e3, speedup=t_ref / t_ours, target=1.2)

    x, dy = make(gn_shape, False)  # GroupNorm(32) fwd+bwd, NCHW and channels_last
    for cl in (False, True):
        xc = x.detach().contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        xc.requires_grad_()
        dyc = dy.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        ours = normkit.GroupNorm(32, gn_shape[1], device=device)
        ref = torch.nn.GroupNorm(32, gn_shape[1], device=device)
        with normkit.backend("triton"):
            t_ours, t_ref = paired([fwd_bwd(ours, xc, dyc), fwd_bwd(ref, xc, dyc)], rounds, elapsed)
        record(op="group_norm32", mode="fwd+bwd", layout="channels_last" if cl else "contiguous",
               shape=list(gn_shape), ms=t_ours * 1e3, torch_ms=t_ref * 1e3, speedup=t_ref / t_ours,
               target=2.0)

    x, dy = make(row_shape, False)  # LayerNorm / RMSNorm vs copy bandwidth
    src = torch.empty(x.numel() * 2, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    (t_copy,) = paired([lambda: dst.copy_(src)], rounds, elapsed)
    copy_gbs = 2 * src.numel() / t_copy / 1e9  # read + write of one tensor of x's size
    nbytes = x.numel() * x.element_size()
    for name, ours, ref in (
        ("layer_norm", normkit.LayerNorm(row_shape[1], device=device, dtype=dt),
         torch.nn.LayerNorm(row_shape[1], device=device, dtype=dt)),
        ("rms_norm", normkit.RMSNorm(row_shape[1], device=device, dtype=dt),
         torch.nn.RMSNorm(row_shape[1], device=device, dtype=dt)),
    ):
        with normkit.backend("triton"):
            tf_ours, tf_ref = paired([fwd(ours, x), fwd(ref, x)], rounds, elapsed)
            tb_ours, tb_ref = paired([bwd(ours, x, dy), bwd(ref, x, dy)], rounds, elapsed)
        # forward moves x in and y out; backward moves x and dy in, dx out
        for mode, t_ours, t_ref, moved, target in (("fwd", tf_ours, tf_ref, 2 * nbytes, 85.0),
                                                  ("bwd", tb_ours, tb_ref, 3 * nbytes, 70.0)):
            gbs = moved / t_ours / 1e9
            record(op=name, mode=mode, shape=list(row_shape), ms=t_ours * 1e3, torch_ms=t_ref * 1e3, gbs=gbs,
                   copy_gbs=copy_gbs, pct_copy=100 * gbs / copy_gbs, target_pct=target)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": records, "torch": torch.__version__, "smoke": args.smoke}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
