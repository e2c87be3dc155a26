"""WeLore's data-free rank selection: one global threshold on normalized singular values.

Jaiswal et al., "From GaLore to WeLore", ICML 2025. For each matrix ``W_i`` with singular
values ``s_i``, normalize them to ``[0, 1]`` by min/max: ``n_i = (s_i - min s_i) /
(max s_i - min s_i)``. One global threshold ``t`` is chosen so that the values under it, over all
matrices, make up the target fraction of the total rank ``sum_i min(m_i, n_i)``; matrix ``i``
keeps ``k_i = #{n_i >= t}``. Heavy-tailed spectra (layers that became low-rank) lose many
values; flat ones lose few, so the reduction is non-uniform across layers, as the paper finds.
A matrix becomes a low-rank component (LRC) only if its own reduction exceeds ``min_ratio``
and its factors are smaller than it: ``k (m + n) < m n``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LayerRank",
    "RankPlan",
    "default_include",
    "dense_weight_of",
    "normalized_spectrum",
    "plan_from_model",
    "plan_ranks",
    "solve_threshold",
    "spectra_of",
    "worth_factorizing",
]


def normalized_spectrum(singular_values: torch.Tensor) -> torch.Tensor:
    """Min/max-normalized singular values in ``[0, 1]``; a flat spectrum maps to all ones."""
    values = singular_values.detach().float().flatten()
    low, high = values.min(), values.max()
    if float(high - low) <= 1e-12 * max(float(high), 1e-30):
        return torch.ones_like(values)
    return (values - low) / (high - low)


def _check_target(target_reduction: float) -> None:
    if not isinstance(target_reduction, float | int) or not 0.0 < target_reduction < 1.0:
        raise ValueError(f"Invalid target_reduction: {target_reduction!r}; must be in (0, 1)")


def solve_threshold(spectra: Mapping[str, torch.Tensor], target_reduction: float) -> float:
    """The global threshold removing ``target_reduction`` of the total rank.

    All normalized values are pooled and sorted; with ``c = round(target * total)`` the
    threshold is the ``c``-th smallest value, so exactly ``c`` values lie strictly below it
    (barring ties).
    """
    _check_target(target_reduction)
    if not spectra:
        raise ValueError("solve_threshold needs at least one spectrum")
    pooled = torch.sort(torch.cat([normalized_spectrum(s) for s in spectra.values()])).values
    count = round(target_reduction * pooled.numel())
    if count >= pooled.numel():
        return float(pooled[-1]) + 1e-6
    return float(pooled[count])


@dataclass(frozen=True)
class LayerRank:
    """One matrix of a plan: its shape, the rank kept, and whether it is factorized (LRC)."""

    rank: int
    shape: tuple[int, int]
    lrc: bool

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    @property
    def parameters_before(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def parameters_after(self) -> int:
        return self.rank * (self.shape[0] + self.shape[1]) if self.lrc else self.parameters_before


@dataclass(frozen=True)
class RankPlan:
    """Layer name -> :class:`LayerRank`; plain data, saved as JSON."""

    layers: dict[str, LayerRank] = field(default_factory=dict)
    threshold: float | None = None

    @property
    def lrc_names(self) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.lrc]

    def rank_of(self, name: str) -> int:
        return self.layers[name].rank

    def parameters_before(self) -> int:
        return sum(layer.parameters_before for layer in self.layers.values())

    def parameters_after(self) -> int:
        return sum(layer.parameters_after for layer in self.layers.values())

    def rank_reduction(self) -> float:
        """Fraction of the total rank removed by the factorized layers."""
        total = sum(layer.full_rank for layer in self.layers.values())
        kept = sum(layer.rank if layer.lrc else layer.full_rank for layer in self.layers.values())
        return 1.0 - kept / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "layers": {
                name: {"rank": layer.rank, "shape": list(layer.shape), "lrc": layer.lrc}
                for name, layer in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankPlan:
        try:
            layers = {
                str(name): LayerRank(int(entry["rank"]), tuple(entry["shape"]), bool(entry["lrc"]))
                for name, entry in data["layers"].items()
            }
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"Not a rank plan: {error!r}") from None
        return cls(layers, data.get("threshold"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(temporary, path)  # atomic: a reader sees the old plan or the new one
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RankPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def plan_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    target_reduction: float,
    min_ratio: float = 0.5,
) -> RankPlan:
    """Per-matrix ranks under the global threshold, with WeLore's LRC rule applied."""
    if not isinstance(min_ratio, float | int) or not 0.0 <= min_ratio < 1.0:
        raise ValueError(f"Invalid min_ratio: {min_ratio!r}; must be in [0, 1)")
    missing = set(spectra) - set(shapes)
    if missing:
        raise ValueError(f"No shape given for {sorted(missing)}")
    threshold = solve_threshold(spectra, target_reduction)
    layers = {}
    for name, values in spectra.items():
        rows, cols = (int(d) for d in shapes[name])
        normalized = normalized_spectrum(values)
        kept = max(int((normalized >= threshold).sum()), 1)
        lrc = worth_factorizing(kept, rows, cols, min_ratio)
        layers[name] = LayerRank(kept if lrc else min(rows, cols), (rows, cols), lrc)
    return RankPlan(layers, threshold)


def worth_factorizing(rank: int, rows: int, cols: int, min_ratio: float) -> bool:
    """WeLore's LRC rule: factorize an ``rows x cols`` matrix at ``rank`` only if its rank
    reduction ``1 - rank / min(rows, cols)`` exceeds ``min_ratio`` and the factors are smaller
    than the matrix, ``rank (rows + cols) < rows cols``."""
    reduction = 1.0 - rank / min(rows, cols)
    return reduction > min_ratio and rank * (rows + cols) < rows * cols


def default_include(name: str, module: nn.Module) -> bool:
    """Every linear layer except output heads and embeddings."""
    return not any(part in name for part in ("lm_head", "embed", "wte", "wpe"))


def dense_weight_of(module: nn.Module) -> torch.Tensor | None:
    """The ``out x in`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (kept in x out)."""
    if type(module) is nn.Linear:
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.T
    return None


def spectra_of(
    model: nn.Module, include: Callable[[str, nn.Module], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Singular values (fp32) and ``out x in`` shapes of the model's linear weights."""
    include = include or default_include
    spectra, shapes = {}, {}
    for name, module in model.named_modules():
        weight = dense_weight_of(module)
        if weight is None or not include(name, module):
            continue
        spectra[name] = torch.linalg.svdvals(weight.detach().float())
        shapes[name] = (int(weight.shape[0]), int(weight.shape[1]))
    return spectra, shapes


def plan_from_model(
    model: nn.Module,
    target_reduction: float,
    min_ratio: float = 0.5,
    include: Callable[[str, nn.Module], bool] | None = None,
) -> RankPlan:
    """WeLore's plan for ``model``'s linear layers, from their weights alone (data-free)."""
    spectra, shapes = spectra_of(model, include)
    if not spectra:
        raise ValueError(f"{type(model).__name__} has no linear layer that `include` accepts")
    return plan_ranks(spectra, shapes, target_reduction, min_ratio)
