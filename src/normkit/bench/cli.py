"""``normkit bench``: normkit's norms against torch eager and torch.compile, with a roofline.

For each op (reference shapes below, or ``--shape``), layout, dtype and mode it times the
contenders in paired rounds (:mod:`.timing`), reports medians and spread, the speed-up over
torch eager, GB/s and % of the copy roofline measured in the same run (:mod:`.roofline`), then
one training step of a small ResNet (:mod:`.e2e`).

``--suite models`` (:mod:`.models`) measures everyday models instead: training steps of an MLP,
small CNNs and a small Transformer, batch-1 inference, single tiny layers, the ResNet step,
bytes saved for backward and the first training step in a fresh process — torch.nn vs the same
model after ``normkit.convert(model, fuse=True)``. ``--suite route`` (:mod:`.route`) times aten's
kernel against normkit's for each op, mode and size class and checks the route rule's choices.
``--suite zoo`` (:mod:`.zoo`) runs the timm and transformers models it finds installed (built from
configs, no weights): norm-layer coverage of ``normkit.convert``, equality with the unconverted
twin, and train-step / eval timings, torch vs converted.

    normkit bench                      # full run (several minutes on 2 cores)
    normkit bench --suite models --json models.json --plot models.png
    normkit bench --suite route --json route.json
    normkit bench --suite zoo --json zoo.json --plot zoo.png   # timm / transformers models
    normkit bench --quick              # about a minute: smaller shapes, fewer rounds, no compile
    normkit bench --ops bn2d,bn_relu --modes fwd+bwd --json out.json --plot out.png
    normkit bench --shape bn2d=32x128x28x28 --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import math
import sys

import torch

_COPY = "_copy"
HELP = "benchmark normkit's norms vs torch eager / torch.compile (roofline), or everyday models"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cases import DTYPES, MODES, OPS

    p.add_argument("--suite", choices=("ops", "models", "route", "zoo"), default="ops",
                   help="ops (default): each norm op vs torch eager/compile with a roofline; models: "
                        "training steps and inference of everyday models, tiny layers per call, the ResNet "
                        "step, bytes saved for backward, first call in a fresh process (torch.nn vs "
                        "normkit.convert(fuse=True)); route: aten's kernel vs normkit's per op, mode and size, "
                        "against the route rule's choice; zoo: the timm / transformers models installed here, "
                        "as shipped vs normkit.convert(model) (and fuse=True): coverage, equality, train "
                        "step and eval timings")
    p.add_argument("--quick", action="store_true",
                   help="ops: about one minute: smaller shapes, 5 rounds, no compile; models: 5 rounds, "
                        "one fresh process each; zoo: five models, 3 rounds")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, bwd, fwd+bwd, eval")
    p.add_argument("--dtypes", default="float32", help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--layouts", default="auto",
                   help="auto (BN ops, GroupNorm and LayerNorm2d in both, others NCHW), nchw, channels_last, or both")
    p.add_argument("--shape", action="append", default=[], metavar="OP=AxBxC...",
                   help="an extra shape for an op (repeatable), e.g. bn2d=32x128x28x28")
    p.add_argument("--only-shapes", action="store_true", help="run only the --shape cases")
    p.add_argument("--rounds", type=int, default=None,
                   help="paired rounds per case (default 15, quick 5; zoo 7, quick 3)")
    p.add_argument("--no-compile", action="store_true", help="ops suite: skip the torch.compile column")
    p.add_argument("--no-e2e", action="store_true", help="skip the ResNet training step")
    p.add_argument("--e2e-batch", type=int, default=None,
                   help="ResNet batch (ops: default 128, quick 32; models: 32); zoo: the models' batch "
                        "(default 8 images / 4 sequences, quick 4)")
    p.add_argument("--e2e-rounds", type=int, default=None,
                   help="paired ResNet steps (ops: default 7, quick 3; models: 21, quick 3)")
    p.add_argument("--sizes", choices=("full", "tiny"), default="full",
                   help="models, route and zoo suites: tiny shrinks every case (a smoke test, not a benchmark)")
    p.add_argument("--models", default=None, metavar="KEY,KEY",
                   help="zoo suite: only these models (keys as in normkit.bench.zoo.ZOO, e.g. resnet18,llama)")
    p.add_argument("--compile", action="store_true",
                   help="models and zoo suites: also time both models under torch.compile (minutes of compile "
                        "on a small machine)")
    p.add_argument("--route-margin", type=float, default=0.10,
                   help="route suite: mark a choice MISS when it costs more than this over the faster route")
    p.add_argument("--no-cold", action="store_true",
                   help="models suite: skip the first-call measurement in fresh processes")
    p.add_argument("--copy-mb", type=int, default=256, help="size of the copy that measures bandwidth")
    p.add_argument("--threads", type=int, default=None, help="torch (and normkit) threads; default torch's")
    p.add_argument("--no-malloc-tune", action="store_true",
                   help="keep glibc's default mmap threshold (see docs/benchmarks.md)")
    p.add_argument("--json", metavar="FILE", help="write every record to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="speed-up and roofline chart")


def _tune_malloc() -> bool:
    """Serve big tensors from the heap instead of fresh mmaps (both contenders alike).

    By default glibc maps every allocation above 32 MB afresh and unmaps it on free, so each
    new 51 MB activation costs ~12 000 page faults — on this kind of VM more than the kernel
    itself. Raising the threshold lets freed blocks be reused, as a caching allocator would.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_trim_threshold = -3, -1
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except OSError:
        return False


def _parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    from .cases import OPS

    try:
        op, dims = text.split("=")
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise SystemExit(f"normkit bench: --shape: expected OP=AxBx..., got {text!r}") from None
    if op not in OPS:
        raise SystemExit(f"normkit bench: --shape: op must be one of {list(OPS)}, got {op!r}")
    return op, shape


def _cases(args) -> list:
    from .cases import DTYPES, OPS, QUICK_SHAPES, Case, default_layouts

    ops = [o for o in args.ops.split(",") if o]
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"normkit bench: --ops: expected names from {list(OPS)}, got {o!r}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"normkit bench: --dtypes: expected names from {list(DTYPES)}, got {d!r}")
    shapes = [] if args.only_shapes else [(o, QUICK_SHAPES[o] if args.quick else OPS[o][2]) for o in ops]
    shapes += [_parse_shape(s) for s in args.shape]
    cases = []
    for op, shape in shapes:
        if args.layouts == "auto":
            layouts = default_layouts(op, shape)
        elif args.layouts == "both":
            layouts = ["nchw", "channels_last"] if len(shape) == 4 else ["nchw"]
        else:
            layouts = [args.layouts] if len(shape) == 4 or args.layouts == "nchw" else ["nchw"]
        for layout in layouts:
            for d in dtypes:
                cases.append(Case(op, shape, layout, d, args.device))
    return cases


def main(args: argparse.Namespace) -> int:
    if args.suite == "models":
        from . import models

        return models.main(args)
    if args.suite == "route":
        from . import route

        return route.main(args)
    if args.suite == "zoo":
        from . import zoo  # imports timm / transformers only now

        return zoo.main(args)
    from tqdm import tqdm

    from . import e2e, report, roofline
    from .cases import MODES, build_steps
    from .timing import Clock, summary

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("normkit bench: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    tuned = args.device == "cpu" and not args.no_malloc_tune and _tune_malloc()
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"normkit bench: --modes: expected names from {list(MODES)}, got {m!r}")
    rounds = args.rounds or (5 if args.quick else 15)
    want_compile = not (args.quick or args.no_compile)
    cases = _cases(args)
    clock = Clock(args.device)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    bw = roofline.copy_bandwidth(args.device, nbytes=args.copy_mb << 20)
    records, problems = [], []
    jobs = [(c, m) for c in cases for m in modes]
    for case, mode in tqdm(jobs, desc="normkit bench", unit="case", file=sys.stderr):
        try:
            steps = build_steps(case, mode, clock, want_compile)
            # the roofline copy runs inside the same paired rounds: load drifts hit it alike
            steps[_COPY] = roofline.copy_step(case.shape, case.dtype, args.device, clock)
            times = _run(steps, rounds)
        except Exception as err:  # one broken contender must not sink the whole run
            problems.append(f"{case.label} {case.layout} {case.dtype} {mode}: {type(err).__name__}: {err}")
            continue
        copy_ms = summary(times.pop(_COPY))["median_ms"]
        case_bw = 2 * case.tensor_bytes / (copy_ms / 1e3)
        channel_runs = case.layout == "nchw" and len(case.shape) > 2 and math.prod(case.shape[2:]) > 1
        nbytes = roofline.tensor_units(case.family, mode, case.residual, channel_runs) * case.tensor_bytes
        base = summary(times["torch"])["median_ms"]
        impls = {}
        for name, ts in times.items():
            s = summary(ts)
            gbps = nbytes / (s["median_ms"] / 1e3) / 1e9
            impls[name] = {**s, "times_ms": [t * 1e3 for t in ts], "speedup_vs_torch": base / s["median_ms"],
                           "GBps": gbps, "pct_roofline": 100 * gbps / (case_bw / 1e9)}
        records.append({**case.key(), "mode": mode, "bytes": nbytes, "copy_GBps": case_bw / 1e9,
                        "normkit_backend": _backend_name(case), "impls": impls})
    e2e_records = []
    if not args.no_e2e:
        try:
            e2e_records = e2e.run(args.device, args.e2e_batch or (32 if args.quick else 128),
                                  rounds=args.e2e_rounds or (3 if args.quick else 7))
        except Exception as err:
            problems.append(f"ResNet step: {type(err).__name__}: {err}")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s, {torch.get_num_threads()} threads, device {args.device}")
    print(report.table(records, e2e_records))
    for r in e2e_records:
        extra = {k: v for k, v in r.items() if k.startswith("max_")}
        print(f"{r['op']}: {extra}")
    for p in problems:
        print(f"skipped: {p}", file=sys.stderr)
    doc = {"schema": report.SCHEMA, "command": "normkit " + " ".join(sys.argv[1:]) if sys.argv else "",
           "started_utc": started, "machine": report.machine(args.device), "versions": report.versions(),
           "copy_bandwidth_GBps": bw / 1e9,
           "settings": {"rounds": rounds, "quick": args.quick, "torch_compile": want_compile,
                        "malloc_tuned": tuned, "modes": modes},
           "records": records, "e2e": e2e_records, "skipped": problems}
    if args.json:
        report.write_json(args.json, doc)
    if args.plot:
        report.plot(args.plot, records, e2e_records,
                    f"normkit bench — {doc['machine']['processor']}, {torch.get_num_threads()} threads")
    return 0


def _backend_name(case) -> str:
    """The backend normkit's ``auto`` choice ran this case on (cpu, triton or reference)."""
    from .. import backends
    from .cases import DTYPES

    probe = torch.empty((2, case.shape[1] if len(case.shape) > 1 else 1), device=case.device,
                        dtype=DTYPES[case.dtype])
    try:
        return backends.resolve("row_forward" if case.op in ("ln", "rms") else "channel_stats", probe).name
    except backends.BackendUnavailableError as err:
        return f"none: {err}"


def _run(steps, rounds):
    from .timing import paired

    return paired(steps, rounds=rounds, warmup=2)
