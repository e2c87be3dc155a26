"""The ``lowrank-optim`` console script: one module per command, registered in ``COMMANDS``.

Each command module has ``add_arguments(parser)`` and ``run(args) -> int`` and is imported
only when the parser is built, so ``import lowrank_optim`` never loads the command line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from lowrank_optim.cli.common import UsageError, silence_import_noise

__all__ = ["COMMANDS", "UsageError", "build_parser", "main", "silence_import_noise"]

#: name -> (help, module under ``lowrank_optim.cli`` with ``add_arguments`` and ``run``)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": (
        "Pretrain a small LLaMA on the built-in corpus (defaults: 9M, WeLoreAdamW, a few minutes)",
        "pretrain",
    ),
    "plot-stability": (
        "Heat map of per-layer subspace overlap and a per-module-type summary from a JSONL log",
        "plot",
    ),
    "compress": (
        "WeLore data-free compression of a local Hugging Face model (table, spectra plot, save)",
        "compress",
    ),
    "bench": (
        "Run a benchmark from benchmarks/ (e.g. `bench memory --quick --out /tmp/memory`)",
        "bench",
    ),
}


def _command(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{COMMANDS[name][1]}")


def build_parser() -> argparse.ArgumentParser:
    """The ``lowrank-optim`` parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="lowrank-optim",
        description="Memory-efficient GaLore-family optimizers: pretraining, reports, benchmarks.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _command(name).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; a :class:`UsageError` becomes one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    silence_import_noise()
    try:
        return _command(args.command).run(args)
    except UsageError as error:
        print(f"lowrank-optim {args.command}: error: {error}", file=sys.stderr)
        return 2
