"""``lowrank-optim plot-stability``: a heat map of per-layer subspace overlap from a JSONL log."""

from __future__ import annotations

import argparse

from lowrank_optim.cli.common import UsageError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The log to read, the PNG to write and its title."""
    parser.add_argument("log", help="JSONL metrics file written during training")
    parser.add_argument("-o", "--output", default="stability.png", help="PNG to write")
    parser.add_argument("--title", default=None)


def run(args: argparse.Namespace) -> int:
    """Check the log first (a bad file is one line, exit code 2), then draw and print the path."""
    from lowrank_optim.cli.plots import check_stability_log, plot_stability

    try:
        check_stability_log(args.log)
    except (OSError, ValueError) as error:  # missing, unreadable, not JSONL, no subspace rows
        raise UsageError(str(error)) from None
    print(plot_stability(args.log, args.output, title=args.title))
    return 0
