"""The ``normkit`` command line.

Subcommands live in their own modules, each exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``main(args) -> int``; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module implementing it (imported only when that subcommand runs or --help lists it)
SUBCOMMANDS = {
    "info": "normkit.info",
    "demo": "normkit.demo",
    "bench": "normkit.bench.cli",
    "lab": "normkit.lab.cli",
}


def _available():
    for name, module_name in SUBCOMMANDS.items():
        try:
            yield name, importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                continue  # that part of normkit is not in this build
            raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normkit",
        description="Normalization layers for PyTorch: information, demo, benchmark and lab.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in _available():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
