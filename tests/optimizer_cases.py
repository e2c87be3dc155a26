"""The shared optimizer test matrix: every optimizer and moment storage registers one case here.

The matrix has three axes (``test_optimizer_matrix.py``, ``test_matrix_placements.py``):

* optimizer: ``GaLoreAdamW``, ``WeLoreAdamW``, ``GaLoreAdamW8bit``, ``QGaLoreAdamW``;
* storage of the Adam moments: full precision, blockwise 8-bit, blockwise 4-bit (torchao's
  format). Each optimizer offers some of them (``GaLoreAdamW`` keeps full-precision moments
  only; the quantized classes take ``moment_bits``), so a case is one (optimizer, storage) pair;
* placement: one process, FSDP2 (``fully_shard``) on 2 processes, layer-wise
  (``LayerwiseOptimizer``).

Two degenerate configurations must match ``torch.optim.AdamW`` step by step on a model small
enough that every moment stays in full precision (quantized storages keep tensors under
``MIN_QUANTIZED_NUMEL`` elements unquantized):

* ``dense``: no group is projected, so the optimizer is plain AdamW;
* ``identity``: matrices are projected at full rank onto a basis fixed to the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lowrank_optim import (
    GaLoreAdamW,
    GaLoreAdamW8bit,
    ProjectionConfig,
    QGaLoreAdamW,
    WeLoreAdamW,
    register_refresh_method,
)

__all__ = [
    "CASES",
    "FULL",
    "INT4",
    "INT8",
    "MIN_QUANTIZED_NUMEL",
    "QUANTIZED_CASES",
    "QUANTIZED_KEYS",
    "STORAGES",
    "OptimizerCase",
    "find_case",
    "identity_basis",
    "is_quantized",
]

#: The storage axis: how a case keeps its Adam moments between steps.
FULL, INT8, INT4 = "full", "8bit", "4bit"
STORAGES = (FULL, INT8, INT4)

#: Moments of fewer elements stay in full precision under a quantized storage (the README's
#: rule; their absmax overhead and rounding error are not worth the bytes saved).
MIN_QUANTIZED_NUMEL = 4096

#: State keys of quantized moments (checkpoint format: codes and one fp32 absmax per block).
QUANTIZED_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


def identity_basis(
    matrix: torch.Tensor,
    rank: int,
    previous: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor:
    """A refresh method that always returns the first ``rank`` standard basis vectors."""
    return torch.eye(matrix.shape[0], rank, dtype=matrix.dtype, device=matrix.device)


register_refresh_method("identity", identity_basis, overwrite=True)


@dataclass(frozen=True)
class OptimizerCase:
    """One (optimizer, storage) pair of the matrix; ``build`` takes torch's arguments."""

    optimizer: str
    storage: str
    build: Callable[..., torch.optim.Optimizer]
    #: extra group keys that make a projected group degenerate to AdamW
    identity_group: dict[str, Any] = field(
        default_factory=lambda: {"refresh": "identity", "scale": 1.0}
    )
    #: proj_types the optimizer supports
    proj_types: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")
    #: the same optimizer with full-precision moments (bases, refresh and update unchanged): the
    #: reference that isolates what the storage changes
    full_precision: Callable[..., torch.optim.Optimizer] | None = None

    @property
    def id(self) -> str:
        return f"{self.optimizer}-{self.storage}"

    @property
    def quantized(self) -> bool:
        return self.storage != FULL

    @property
    def moment_bits(self) -> int | None:
        return {FULL: None, INT8: 8, INT4: 4}[self.storage]

    def __str__(self) -> str:  # the pytest id
        return self.id


#: GaLoreAdamW with QGaLoreAdamW's INT4 bases: QGaLoreAdamW (without INT8 weights) with
#: full-precision moments.
_INT4_BASES = partial(GaLoreAdamW, projection=ProjectionConfig(proj_bits=4))

CASES: list[OptimizerCase] = [
    OptimizerCase("GaLoreAdamW", FULL, GaLoreAdamW),
    OptimizerCase("WeLoreAdamW", FULL, WeLoreAdamW),
    OptimizerCase("GaLoreAdamW8bit", INT8, GaLoreAdamW8bit, full_precision=GaLoreAdamW),
    OptimizerCase(
        "GaLoreAdamW8bit",
        INT4,
        partial(GaLoreAdamW8bit, moment_bits=4),
        full_precision=GaLoreAdamW,
    ),
    # QGaLoreAdamW stores bases in 4 bits: the identity's entries (0 and 1) are exactly
    # representable, so the identity degenerate case still holds exactly. Without model= its
    # weights stay in full precision (INT8 weights are tested in test_quantized_optim.py).
    OptimizerCase("QGaLoreAdamW", INT8, QGaLoreAdamW, full_precision=_INT4_BASES),
    OptimizerCase(
        "QGaLoreAdamW", INT4, partial(QGaLoreAdamW, moment_bits=4), full_precision=_INT4_BASES
    ),
]
QUANTIZED_CASES = [c for c in CASES if c.quantized]


def find_case(optimizer: str, storage: str) -> OptimizerCase:
    """The registered case of ``optimizer`` with ``storage`` moments."""
    for candidate in CASES:
        if (candidate.optimizer, candidate.storage) == (optimizer, storage):
            return candidate
    raise KeyError(f"no case {optimizer}-{storage}")


def is_quantized(entry: dict[str, Any]) -> bool:
    """Whether one parameter's state (or state_dict entry) holds quantized moments.

    Checks the whole layout, so a half-quantized entry fails loudly instead of reading as
    either kind.
    """
    present = [key in entry for key in QUANTIZED_KEYS]
    if any(present):
        assert all(present), sorted(entry)
        assert "exp_avg" not in entry and "exp_avg_sq" not in entry, sorted(entry)
        assert entry["exp_avg_codes"].dtype == torch.uint8
        assert entry["exp_avg_absmax"].dtype == torch.float32
        return True
    assert "exp_avg" in entry and "exp_avg_sq" in entry, sorted(entry)
    return False
