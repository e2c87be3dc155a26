"""Atomic checkpoint files that load with ``torch.load(weights_only=True)``.

A checkpoint is written to a temporary file in the target directory, flushed to disk, and then
renamed over the target with ``os.replace``, which is atomic on POSIX: an interrupted write
leaves the previous checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "load_checkpoint", "remove_stale_temporaries"]


def atomic_save(payload: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(payload)`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.<name>.*`` temporaries that interrupted :func:`atomic_save` calls left.

    A process killed between ``mkstemp`` and ``os.replace`` (SIGKILL, power loss) cannot run
    its cleanup, so the half-written file stays next to ``path``. Call this when a run starts,
    while no other process writes ``path``. Returns the files removed.
    """
    path = Path(path)
    removed = []
    for stale in path.parent.glob(f".{path.name}.*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | None = "cpu", missing: str | None = None
) -> Any:
    """Load a checkpoint written by :func:`atomic_save`, refusing anything but tensors/data.

    A missing file raises ``FileNotFoundError`` with ``missing`` as its message, if given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing or f"No checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
