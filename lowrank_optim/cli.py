"""The ``lowrank-optim`` console script. Sub-commands register themselves in ``COMMANDS``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

#: name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {}


def _add_plot_stability(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", help="JSONL metrics file written during training")
    parser.add_argument("-o", "--output", default="stability.png", help="PNG to write")
    parser.add_argument("--title", default=None)


def _run_plot_stability(args: argparse.Namespace) -> int:
    from lowrank_optim.plots import plot_stability

    print(plot_stability(args.log, args.output, title=args.title))
    return 0


def _add_pretrain(parser: argparse.ArgumentParser) -> None:
    from lowrank_optim.pretrain import add_arguments

    add_arguments(parser)


def _run_pretrain(args: argparse.Namespace) -> int:
    from lowrank_optim.pretrain import run

    return run(args)


COMMANDS["pretrain"] = (
    "Pretrain a small LLaMA on the built-in corpus (defaults: 9M, WeLoreAdamW, a few minutes)",
    _add_pretrain,
    _run_pretrain,
)
COMMANDS["plot-stability"] = (
    "Heat map of per-layer subspace overlap and a per-module-type summary from a JSONL log",
    _add_plot_stability,
    _run_plot_stability,
)


def _add_compress(parser: argparse.ArgumentParser) -> None:
    from lowrank_optim.compress import add_arguments

    add_arguments(parser)


def _run_compress(args: argparse.Namespace) -> int:
    from lowrank_optim.compress import run

    return run(args)


COMMANDS["compress"] = (
    "WeLore data-free compression of a local Hugging Face model (table, spectra plot, save)",
    _add_compress,
    _run_compress,
)


def _add_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a script of the checkout's benchmarks/ folder, e.g. memory")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the script")


def _run_bench(args: argparse.Namespace) -> int:
    # Benchmarks live beside the package in a source checkout, not inside the installed wheel.
    import runpy
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    script = folder / f"{args.name}.py"
    if not script.is_file():
        found = sorted(p.stem for p in folder.glob("*.py")) if folder.is_dir() else []
        raise SystemExit(
            f"Invalid benchmark: {args.name!r}; allowed: {', '.join(found) or 'none'} "
            f"(scripts of {folder}, present in a source checkout)"
        )
    saved_argv, sys.argv = sys.argv, [str(script), *args.args]
    sys.path.insert(0, str(folder))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as finished:  # scripts end with `raise SystemExit(main())`
        code = finished.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


COMMANDS["bench"] = (
    "Run a benchmark from benchmarks/ (e.g. `bench memory --quick --out /tmp/memory`)",
    _add_bench,
    _run_bench,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowrank-optim",
        description="Memory-efficient GaLore-family optimizers: pretraining, reports, benchmarks.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command][2](args)
