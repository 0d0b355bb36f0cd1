"""``normkit info``: versions, backends and threads of this installation."""

from __future__ import annotations

import platform

import torch

HELP = "print versions, available backends and the thread count"


def add_arguments(parser) -> None:
    del parser  # no options


def collect() -> dict[str, str]:
    import normkit
    from normkit import backends

    facts = {
        "normkit": normkit.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "threads": str(torch.get_num_threads()),
        "requested backend": backends.current(),
    }
    for name in ("numba", "triton"):
        try:
            facts[name] = __import__(name).__version__
        except ImportError:
            facts[name] = "not installed"
    for name, state in backends.available().items():
        if name == "triton" and state == "available" and not torch.cuda.is_available():
            state += " (no CUDA device here: CPU tensors only under TRITON_INTERPRET=1)"
        facts[f"backend {name}"] = state
    return facts


def main(args) -> int:
    facts = collect()
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
    return 0
