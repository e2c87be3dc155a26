"""Where the training data pipeline caches encoded corpora, and how it writes files safely."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_text", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$LOWRANK_OPTIM_CACHE`` or ``~/.cache/lowrank_optim``."""
    override = os.environ.get("LOWRANK_OPTIM_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "lowrank_optim"



def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename.

    The temporary name is per process: data-parallel ranks may build the same cache at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
