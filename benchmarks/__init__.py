"""The benchmarks of lowrank_optim: one module per question, run from the repository root.

    python -m benchmarks.memory --quick         # or: lowrank-optim bench memory --quick
    python -m benchmarks.handoff_study --quick  # or: lowrank-optim bench handoff --quick

Every runnable module has ``main(argv: list[str] | None = None) -> int``; :func:`run` resolves a
short name (a module name, or an alias of :data:`ALIASES`) and calls it. Shared plumbing lives
in :mod:`.common` (result files, tables, timing) and :mod:`.results_md` (``RESULTS.md``); the
peer optimizers the comparisons build (galore-torch, APOLLO, bitsandbytes, torchao) live in
:mod:`.peers`, outside the library.

The benchmarks are not part of the installed optimizers: they import the application side of
the package (pretraining loop, data, models) and optional peers, and they are CPU-heavy.
"""

from __future__ import annotations

import importlib

__all__ = ["ALIASES", "BENCHMARKS", "UnknownBenchmark", "resolve", "run"]

#: Modules with a ``main``, each answering one question (``results_md`` regenerates RESULTS.md).
BENCHMARKS = (
    "compress_minilm",
    "fsdp_comm",
    "galore_core",
    "handoff_regime",
    "handoff_study",
    "handoff_trials",
    "layerwise_memory",
    "main_job_factor_lr",
    "memory",
    "pretrain_suite",
    "quality",
    "results_md",
    "throughput",
)
#: Short names: ``bench handoff`` runs :mod:`benchmarks.handoff_study`, ``bench regime``
#: :mod:`benchmarks.handoff_regime`, ``bench trials`` :mod:`benchmarks.handoff_trials`.
ALIASES = {"handoff": "handoff_study", "regime": "handoff_regime", "trials": "handoff_trials"}


class UnknownBenchmark(ValueError):
    """A name that is neither a benchmark module nor an alias (raised before anything runs)."""


def resolve(name: str) -> str:
    """The module name (under ``benchmarks``) that the short name ``name`` runs."""
    module = ALIASES.get(name, name)
    if module not in BENCHMARKS:
        allowed = ", ".join(sorted({*BENCHMARKS, *ALIASES}))
        raise UnknownBenchmark(f"Invalid benchmark: {name!r}; allowed: {allowed}")
    return module


def run(name: str, argv: list[str]) -> int:
    """Run benchmark ``name`` (a module of :data:`BENCHMARKS` or an alias) with ``argv``.

    Returns its exit code; a ``SystemExit`` inside it (``--help``, an argparse error) becomes
    that code, as when the module runs as a script. Raises :class:`UnknownBenchmark` (a
    ``ValueError``) for an unknown name; other errors inside the benchmark propagate unchanged.
    """
    module = importlib.import_module(f"{__name__}.{resolve(name)}")
    try:
        return module.main(list(argv))
    except SystemExit as finished:
        code = finished.code
        return code if isinstance(code, int) else (0 if code is None else 1)
