"""Shared plumbing of the benchmarks: result files, markdown tables, timing, child processes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "IMPORT_ROOT",
    "RESULTS",
    "child_env",
    "environment",
    "interleaved_medians",
    "markdown_table",
    "module_command",
    "pyplot",
    "refresh_results_md",
    "write_json",
]

RESULTS = Path(__file__).resolve().parent / "results"
#: The folder that holds the ``benchmarks`` package (the repository root of a checkout).
IMPORT_ROOT = Path(__file__).resolve().parent.parent


def module_command(module: str, *args: str) -> list[str]:
    """``python -m <module> args...`` with this interpreter (``module``: ``benchmarks.<name>``)."""
    return [sys.executable, "-m", module, *args]


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with :data:`IMPORT_ROOT` first on ``PYTHONPATH``.

    A child started with :func:`module_command` then imports this checkout's ``benchmarks``
    whatever its working directory, which stays the caller's so relative paths keep meaning
    what they meant to the user.
    """
    env = {**os.environ, **extra}
    paths = [str(IMPORT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = "cpu"
    return info


def write_json(name: str, payload: dict[str, Any], folder: Path = RESULTS) -> Path:
    """``folder/<name>.json``: ``payload`` plus the environment it was measured in.

    Paths in ``payload`` (e.g. parsed ``--out`` arguments) are written as strings.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    record = {"environment": environment(), **payload}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def interleaved_medians(
    actions: dict[str, Callable[[], None]], rounds: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each action, the actions timed in turn within every round.

    Each round runs ``repeats`` calls of every action back to back; interleaving the actions
    cancels the drift of machine load between them that sequential timing suffers, and the
    median over rounds drops rounds disturbed by other processes.
    """
    samples: dict[str, list[float]] = {label: [] for label in actions}
    for _ in range(rounds):
        for label, action in actions.items():
            tick = time.perf_counter()
            for _ in range(repeats):
                action()
            samples[label].append((time.perf_counter() - tick) / repeats)
    return {label: statistics.median(values) for label, values in samples.items()}


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend: benchmarks write figures to files, and a
    display backend would fail on a headless machine. Imported on first use (matplotlib is slow
    to import and only the plotting steps need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def refresh_results_md(out: Path) -> None:
    """Regenerate ``RESULTS.md`` when ``out`` is the committed results folder (a run written
    elsewhere, such as a ``--quick`` one, leaves it alone)."""
    if out.resolve() == RESULTS.resolve():
        from benchmarks.results_md import write_results_md

        print(f"wrote {write_results_md()}")
