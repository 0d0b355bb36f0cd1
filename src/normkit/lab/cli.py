"""``normkit lab``: run the claims, write report.html, one PNG per claim and results.json."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings

HELP = "measure the claims about Batch Normalization on real data and write a report"

DEFAULT_OUT = "normkit-report"
FULL_SEEDS = 5
QUICK_SEEDS = 2


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {value}")
        return value

    return parse


def _claim_id(text: str) -> int:
    from .claims import BY_ID

    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in BY_ID:
        raise argparse.ArgumentTypeError(f"--claim: expected a claim number in {sorted(BY_ID)}, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the same arms, each still trained to convergence, with fewer seeds (2) and sweep points "
        "(under 2 minutes on 2 quiet cores); a check the fewer seeds cannot decide says 'too little data'",
    )
    parser.add_argument(
        "--claim",
        type=_claim_id,
        action="append",
        metavar="N",
        help="run only claim N (1-11); repeat for several",
    )
    parser.add_argument(
        "--seeds",
        type=_positive("--seeds"),
        default=None,
        metavar="K",
        help="seeds per arm (default 5, 2 with --quick); verdicts come from a test over the seeds",
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default ./{DEFAULT_OUT})"
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="FILE.npz",
        help="run the image claims on your data: a .npz with arrays x (N, D | N, H, W | N, C, H, W) "
        "and integer labels y (N,)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; cuda when a GPU exists)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch intra-op threads (default 1: the models are tiny and extra threads mostly "
        "wait on each other; 0 = torch's own choice)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="processes (default: 2, or 1 on a 1-core machine): the expensive shared runs of claims 7, 8, 10 "
        "and 11 go to N-1 worker processes while this one runs the other claims; every run is seeded, so "
        "the numbers do not depend on N",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fail(message: str) -> int:
    print(f"normkit lab: error: {message}", file=sys.stderr)
    return 2


# the lab extra (pyproject's [project.optional-dependencies] lab): import name -> package name
LAB_PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "mlxtend": "mlxtend"}
INSTALL_HINT = "pip install 'normkit[lab]'"


def missing_packages() -> list[str]:
    """The lab extra's packages that are not installed (checked without importing them)."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):  # a broken or blocked installation counts as missing
            return True

    return [pkg for module, pkg in LAB_PACKAGES.items() if absent(module)]


def main(args: argparse.Namespace) -> int:
    missing = missing_packages()
    if missing:
        return _fail(
            f"the lab needs the packages of normkit's 'lab' extra; missing here: {', '.join(missing)}. "
            f"Install them with: {INSTALL_HINT}"
        )
    import torch

    import normkit

    from . import data as D
    from .claims import ALL, BY_ID
    from .context import Context
    from .report import summary_table, write_html, write_json
    from .runner import run_all

    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        return _fail(f"--device: expected a torch device such as cpu or cuda, got {args.device!r} ({err})")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(
            f"--device: {args.device!r} requested but torch.cuda.is_available() is False on this machine"
        )
    if args.threads < 0:
        return _fail(f"--threads: expected 0 (torch's choice) or a positive integer, got {args.threads}")
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        return _fail(f"--jobs: expected a positive integer, got {jobs}")
    user_data = None
    if args.data is not None:
        try:
            user_data = D.load_npz(args.data)
        except D.DataError as err:
            return _fail(str(err))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return _fail(f"--out: expected a folder, got {args.out!r}, which is a file")
    os.makedirs(args.out, exist_ok=True)

    from .train import deterministic

    deterministic(args.threads)
    seeds = list(range(args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else FULL_SEEDS)))
    claims = [BY_ID[i] for i in sorted(set(args.claim))] if args.claim else list(ALL)
    executor = None
    if jobs > 1 and device.type == "cpu":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from .runner import worker_init

        # spawn, not fork: a forked child cannot use a thread pool its parent already started
        executor = ProcessPoolExecutor(
            jobs - 1, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init,
            initargs=(args.threads,),
        )
    ctx = Context(
        seeds=seeds,
        quick=args.quick,
        device=str(device),
        user_data=user_data,
        show_progress=not args.no_progress,
        executor=executor,
    )

    data_name = (
        user_data.name if user_data is not None else "embedded (digits, MNIST-5000, generated sequences)"
    )
    print(
        f"normkit lab: {len(claims)} claim(s), seeds {seeds}, {'quick' if args.quick else 'full'} run, "
        f"device {device}, {torch.get_num_threads()} thread(s), data: {data_name}"
    )
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # the fallback notice (e.g. C++ kernels not built) is printed once by normkit; repeats need not see it
            warnings.simplefilter("once")
            entries = run_all(claims, ctx, args.out)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    results = {
        "normkit_version": normkit.__version__,
        "quick": bool(args.quick),
        "seeds": seeds,
        "jobs": jobs if executor is not None else 1,
        "elapsed_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 2),  # this process and its workers
        "device": str(device),
        "threads": torch.get_num_threads(),
        "data": data_name,
        "claims": entries,
    }
    write_json(results, args.out)
    page = write_html(results, args.out)
    print()
    print(summary_table(results))
    print(f"report: {page}")
    failed = [e["id"] for e in entries if e.get("traceback")]
    if failed:
        print(
            f"normkit lab: the experiment of claim(s) {failed} failed; see the notes in the report",
            file=sys.stderr,
        )
        return 1
    return 0
