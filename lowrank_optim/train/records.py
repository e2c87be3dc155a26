"""The run's JSONL metrics file: read it, cut it back to a checkpoint, make values JSON-safe."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = [
    "has_records",
    "json_safe",
    "last_logged",
    "read_jsonl_records",
    "read_records",
    "truncate_metrics",
]


def read_records(path: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
    """All records of a JSONL log, optionally only those of one ``kind``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file and
    line) for anything that is not JSON Lines of objects, e.g. a binary file or a PNG.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such file: {str(path)!r}; give a JSONL metrics log")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file; give a JSONL metrics log")
    records = []
    with path.open(encoding="utf-8") as handle:
        number = 0
        try:
            for number, line in enumerate(handle, start=1):  # noqa: B007 (used after the loop)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}:{number} is not valid JSON ({error.msg}); give a JSONL metrics log"
                    ) from None
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{path}:{number} holds a JSON {type(record).__name__}, not an object; "
                        "give a JSONL metrics log"
                    )
                if kind is None or record.get("kind") == kind:
                    records.append(record)
        except UnicodeDecodeError:
            raise ValueError(
                f"{path}:{number + 1} is not UTF-8 text; give a JSONL metrics log"
            ) from None
    return records


def read_jsonl_records(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """``(line, record)`` pairs; ``record`` is None for a line that is not a JSON object."""
    pairs: list[tuple[str, dict[str, Any] | None]] = []
    if not path.is_file():
        return pairs
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        pairs.append((line, record if isinstance(record, dict) else None))
    return pairs


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (the checkpoint's); drop later ones and torn lines.

    A run killed after logging step ``s > step`` but before checkpointing ``s`` would otherwise
    log ``s`` twice once resumed. The file is replaced atomically.
    """
    pairs = read_jsonl_records(path)
    kept = [
        line
        for line, record in pairs
        if record is not None and int(record.get("step", 0) or 0) <= step
    ]
    if len(kept) == len(pairs):
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temporary, path)


def last_logged(path: Path, kind: str, step: int) -> float:
    losses = [
        float(record["loss"])
        for _, record in read_jsonl_records(path)
        if record is not None
        and record.get("kind") == kind
        and int(record.get("step", 0)) <= step
        and isinstance(record.get("loss"), int | float)
    ]
    return losses[-1] if losses else math.nan


def has_records(path: Path, kind: str) -> bool:
    return any(record and record.get("kind") == kind for _, record in read_jsonl_records(path))



def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy: NaN/inf become None."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return {key: clean(value) for key, value in values.items()}

