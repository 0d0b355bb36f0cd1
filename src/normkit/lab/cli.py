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
FULL_BUDGET = 600.0  # seconds of modeled time (normkit.lab.costs): the full run
QUICK_BUDGET = 180.0  # --quick


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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget: expected a number of seconds, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"--budget: expected a positive number of seconds, got {text!r}")
    return value


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
        help=f"the same design with a budget of {QUICK_BUDGET:g} s and without the figures' extra sweep points; "
        "its decisions are the full run's (the same looks), it stops earlier",
    )
    parser.add_argument(
        "--claim",
        type=_claim_id,
        action="append",
        metavar="N",
        help="run only claim N (1-11); repeat for several",
    )
    parser.add_argument(
        "--budget",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"seeds are added in groups to the claims still undecided while the modeled time fits in SECONDS "
        f"(default {FULL_BUDGET:g}, {QUICK_BUDGET:g} with --quick): reference-machine seconds from a cost "
        "model, so the seed plan and the results do not depend on the machine",
    )
    parser.add_argument(
        "--seeds",
        type=_positive("--seeds"),
        default=None,
        metavar="K",
        help="a fixed design instead: K seeds per arm and one look with one-sided 95 %% Student-t bounds "
        "(no budget)",
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
        help="processes (default: 2, or 1 on a 1-core machine): each round's runs are shared between N-1 "
        "worker processes and this one; every run is seeded and the plan comes from a cost model, so the "
        "numbers do not depend on N",
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
    from .sequential import FIXED, SEQUENTIAL

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
    if args.seeds is not None and args.budget is not None:
        return _fail("--seeds K is a fixed design and --budget a sequential one: give one of them")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return _fail(f"--out: expected a folder, got {args.out!r}, which is a file")
    os.makedirs(args.out, exist_ok=True)

    from .train import deterministic

    deterministic(args.threads)
    if args.seeds is not None:
        design, budget = FIXED, None
        plan = f"fixed design, {args.seeds} seeds"
    else:
        design = SEQUENTIAL
        budget = args.budget if args.budget is not None else (QUICK_BUDGET if args.quick else FULL_BUDGET)
        plan = f"sequential design (looks at {', '.join(map(str, design.looks))} seeds), budget {budget:g} s"
    claims = [BY_ID[i] for i in sorted(set(args.claim))] if args.claim else list(ALL)
    executor = None
    if jobs > 1 and device.type == "cpu":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from .runner import worker_init

        # spawn, not fork: a forked child cannot use a thread pool its parent already started
        executor = ProcessPoolExecutor(
            jobs - 1, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init,
            initargs=(args.threads, user_data),
        )
    ctx = Context(
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
        f"normkit lab: {len(claims)} claim(s), {plan}, {'quick' if args.quick else 'full'} run, "
        f"device {device}, {torch.get_num_threads()} thread(s), data: {data_name}"
    )
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # the fallback notice (e.g. C++ kernels not built) is printed once by normkit; repeats need not see it
            warnings.simplefilter("once")
            entries, runner = run_all(claims, ctx, args.out, design=design, budget=budget, seeds=args.seeds)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    results = {
        "normkit_version": normkit.__version__,
        "quick": bool(args.quick),
        "design": design.name,
        "looks": list(design.looks) if design.sequential else [args.seeds],
        "budget_s": budget,
        "modeled_s": round(runner.modeled, 1),
        "rounds": runner.rounds,
        "seeds": list(range(max((e["seeds"] for e in entries), default=0))),
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
