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
    try:
        facts["triton"] = __import__("triton").__version__
    except ImportError:
        facts["triton"] = "not installed"
    try:
        from normkit import _C

        facts["C++ kernels"] = f"built ({_C.__file__})"
    except ImportError as err:
        facts["C++ kernels"] = f"not built ({err}): reinstall with a C++ compiler"
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
