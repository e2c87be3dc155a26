"""Per-layer subspace reports and the JSONL metrics log they are written to.

``subspace_report(optimizer)`` reads nothing but the optimizer state (see
:mod:`lowrank_optim.stability` for what the metrics mean), so it works on a freshly loaded
checkpoint as well as during training.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from lowrank_optim import state_keys as keys
from lowrank_optim.projection import effective_rank
from lowrank_optim.stability import ENERGY_HISTORY, OVERLAP_HISTORY, STABLE_SINCE, latest

__all__ = ["MODULE_TYPES", "MetricsWriter", "SubspaceRow", "module_type", "subspace_report"]

#: Module types of a LLaMA-style block, in the order reports and plots use.
MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down")
_TYPE_PATTERN = re.compile(r"(?:^|\.)(q|k|v|o|gate|up|down)(?:_proj)?(?:\.weight)?$")


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q``; unknown names -> ``other``."""
    match = _TYPE_PATTERN.search(name)
    return match.group(1) if match else "other"


@dataclass(frozen=True)
class SubspaceRow:
    """One projected layer's subspace state. ``nan`` where a metric has no value yet."""

    name: str
    module_type: str
    shape: tuple[int, int]
    rank: int
    step: int
    gap: int
    base_gap: int
    last_overlap: float
    energy_captured: float
    stable: bool
    stable_since: int
    refreshes: int
    refreshes_skipped: int
    refreshes_failed: int

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["shape"] = list(self.shape)
        # JSON has no NaN: write null so that any JSON reader can load the log.
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def subspace_report(optimizer: torch.optim.Optimizer) -> list[SubspaceRow]:
    """One row per projected parameter that has stepped at least once, in param-group order."""
    rows = []
    for group_index, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        for index, param in enumerate(group["params"]):
            state = optimizer.state.get(param, {})
            if group.get("rank") is None or param.dim() != 2 or OVERLAP_HISTORY not in state:
                continue
            name = str(names[index]) if names else f"param_groups[{group_index}].params[{index}]"
            rows.append(
                SubspaceRow(
                    name=name,
                    module_type=module_type(name),
                    shape=(int(param.shape[0]), int(param.shape[1])),
                    rank=effective_rank(group["rank"], param.shape),
                    step=int(state[keys.STEP]),
                    gap=int(state[keys.REFRESH_GAP]),
                    base_gap=int(group["update_proj_gap"]),
                    last_overlap=latest(state, OVERLAP_HISTORY),
                    energy_captured=latest(state, ENERGY_HISTORY),
                    stable=state[STABLE_SINCE] >= 0,
                    stable_since=int(state[STABLE_SINCE]),
                    refreshes=int(state[keys.REFRESHES]),
                    refreshes_skipped=int(state[keys.REFRESHES_SKIPPED]),
                    refreshes_failed=int(state[keys.REFRESHES_FAILED]),
                )
            )
    return rows


class MetricsWriter:
    """Appends JSON records, one per line, to a metrics file; flushed after every record.

    Each record carries a ``kind`` (``subspace``, ``train``, ``eval``, ``handoff``, ...) and a
    ``step``. Opening in append mode means a resumed run continues the same log.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def log_subspace(self, optimizer: torch.optim.Optimizer, step: int) -> list[SubspaceRow]:
        """Write one ``subspace`` record per projected layer; returns the rows."""
        rows = subspace_report(optimizer)
        for row in rows:
            self.write({"kind": "subspace", **row.to_dict(), "step": step})
        return rows

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
