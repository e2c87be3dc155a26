"""The ``lowrank-optim`` console script. Sub-commands register themselves in ``COMMANDS``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

__all__ = ["COMMANDS", "UsageError", "build_parser", "main", "silence_import_noise"]


class UsageError(Exception):
    """A bad option value or input file: :func:`main` prints it as one line and exits with 2.

    Sub-commands raise it only for what they check before the real work starts; any other
    exception keeps its traceback, so a genuine bug is never reduced to one line.
    """


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message contains any of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_import_noise() -> None:
    """Silence the exact start-up warnings that torchao's import prints, nothing else.

    transformers imports torchao (its quantizer registry) whenever a model is built. torchao
    then logs ``Failed to load .../torchao/_C_*.so`` for the CUDA-only kernels it cannot load on
    this machine (its pure-PyTorch optimizers, used here, do not need them), and calls torch's
    deprecated ``register_constant`` on two Enum classes, which torch logs as a warning. Both
    are harmless; every other message of these loggers still gets through.
    """
    loaders = logging.getLogger("torchao")
    if not any(isinstance(f, _DropMessages) for f in loaders.filters):
        loaders.addFilter(_DropMessages("torchao/_C"))
    pytree = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _DropMessages) for f in pytree.filters):
        pytree.addFilter(_DropMessages("Calling register_constant() on Enum subclasses"))


#: name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {}


def _add_plot_stability(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", help="JSONL metrics file written during training")
    parser.add_argument("-o", "--output", default="stability.png", help="PNG to write")
    parser.add_argument("--title", default=None)


def _run_plot_stability(args: argparse.Namespace) -> int:
    from lowrank_optim.plots import check_stability_log, plot_stability

    try:
        check_stability_log(args.log)
    except (OSError, ValueError) as error:  # missing, unreadable, not JSONL, no subspace rows
        raise UsageError(str(error)) from None
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
    parser.add_argument("name", help="a module of the checkout's benchmarks package, e.g. memory")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark")


def _run_bench(args: argparse.Namespace) -> int:
    # Benchmarks live beside the package in a source checkout, not inside the installed wheel.
    try:
        import benchmarks
    except ModuleNotFoundError as error:
        if error.name != "benchmarks":
            raise
        raise UsageError(
            f"Invalid benchmark: {args.name!r}; the benchmarks package is not importable "
            "(run from the root of a source checkout)"
        ) from None
    try:
        benchmarks.resolve(args.name)
    except benchmarks.UnknownBenchmark as error:
        raise UsageError(str(error)) from None
    return benchmarks.run(args.name, args.args)


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
    """Run one sub-command; a :class:`UsageError` becomes one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    silence_import_noise()
    try:
        return COMMANDS[args.command][2](args)
    except UsageError as error:
        print(f"lowrank-optim {args.command}: error: {error}", file=sys.stderr)
        return 2
