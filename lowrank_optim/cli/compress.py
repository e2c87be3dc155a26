"""``lowrank-optim compress``: the command line of :mod:`lowrank_optim.factorize.compress`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lowrank_optim.cli.plots import plot_spectra
from lowrank_optim.factorize.compress import (
    MEASURES,
    SPECTRA_PLOT,
    CompressionError,
    compress_pretrained,
    summary_rows,
)

__all__ = ["add_arguments", "format_table", "run"]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-module-type rows of :func:`summary_rows` as an aligned text table."""
    headers = [
        "module type",
        "LRC/matrices",
        "rank kept/full",
        "params before",
        "params after",
        "rel. error",
    ]
    cells = [
        [
            row["module_type"],
            f"{row['lrc']}/{row['matrices']}",
            f"{row['rank_kept']}/{row['full_rank']}",
            f"{row['params_before']:,}",
            f"{row['params_after']:,}",
            f"{row['relative_error']:.3f}",
        ]
        for row in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model folder, the output folder and the target."""
    parser.add_argument("model_dir", help="local Hugging Face model directory (config + weights)")
    parser.add_argument("-o", "--output", required=True, help="directory for the compressed model")
    parser.add_argument("--target", type=float, default=0.5, help="reduction in (0, 1)")
    parser.add_argument(
        "--measure",
        choices=MEASURES,
        default="rank",
        help="rank: fraction of the pooled rank (WeLore); params: of linear-layer parameters",
    )
    parser.add_argument("--min-ratio", type=float, default=0.5, help="LRC rule: rank reduction")
    parser.add_argument("--allow-untested", action="store_true", help="try other model types")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="allow an output directory that is the input or already holds a model "
        "(its model files are replaced)",
    )


def run(args: argparse.Namespace) -> int:
    """Compress, save, plot the spectra and print the table; refusals exit with code 2."""
    try:
        result = compress_pretrained(
            args.model_dir,
            args.output,
            args.target,
            measure=args.measure,
            min_ratio=args.min_ratio,
            allow_untested=args.allow_untested,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except CompressionError as error:
        print(f"lowrank-optim compress: refused: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a bad option value (target, min_ratio): name it, no traceback
        print(f"lowrank-optim compress: error: {error}", file=sys.stderr)
        return 2
    plot_spectra(result.spectra, result.plan.threshold, Path(args.output) / SPECTRA_PLOT)
    print(format_table(summary_rows(result)))
    saved = 1 - result.parameters_after / result.parameters_before
    print(
        f"parameters {result.parameters_before:,} -> {result.parameters_after:,} "
        f"({saved:.1%} fewer); threshold {result.plan.threshold:.4f}; "
        f"{len(result.plan.lrc_names)} of {len(result.plan.layers)} matrices factorized"
    )
    print(
        f"saved {args.output} (reload: lowrank_optim.factorize.compress.load_compressed); "
        f"spectra plot {Path(args.output) / SPECTRA_PLOT}"
    )
    return 0
