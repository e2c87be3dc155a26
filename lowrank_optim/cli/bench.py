"""``lowrank-optim bench NAME [ARGS]``: run one question of the ``benchmarks`` package.

The benchmarks live beside the library in a source checkout (the editable install makes the
``benchmarks`` package importable); :func:`benchmarks.run` resolves short names such as
``handoff`` and refuses unknown ones with the list of allowed names.
"""

from __future__ import annotations

import argparse

from lowrank_optim.cli.common import UsageError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's name and everything after it, passed on untouched."""
    parser.add_argument("name", help="a module of the checkout's benchmarks package, e.g. memory")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark")


def run(args: argparse.Namespace) -> int:
    """The benchmark's exit code; an unknown name is a UsageError (one line, exit code 2)."""
    try:
        import benchmarks
    except ImportError:  # an installed wheel without the source checkout's benchmarks/
        raise UsageError(
            "the benchmarks package is not importable: run from a source checkout installed "
            "with `pip install -e .`"
        ) from None
    try:
        return benchmarks.run(args.name, list(args.args))
    except benchmarks.UnknownBenchmark as error:  # raised before anything runs
        raise UsageError(str(error)) from None
