"""The shared optimizer test matrix: every optimizer in the package registers one case here.

A case builds the optimizer from param groups in two degenerate configurations that must match
``torch.optim.AdamW`` step by step (see ``test_optimizer_matrix.py``):

* ``dense``: no group is projected, so the optimizer is plain AdamW;
* ``identity``: matrices are projected at full rank onto a basis fixed to the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lowrank_optim import GaLoreAdamW, register_refresh_method

__all__ = ["CASES", "OptimizerCase", "identity_basis"]


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
    name: str
    build: Callable[..., torch.optim.Optimizer]
    #: extra group keys that make a projected group degenerate to AdamW
    identity_group: dict[str, Any] = field(default_factory=dict)
    #: proj_types the optimizer supports
    proj_types: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")


CASES: list[OptimizerCase] = [
    OptimizerCase(
        name="GaLoreAdamW",
        build=GaLoreAdamW,
        identity_group={"refresh": "identity", "scale": 1.0},
    ),
]

from lowrank_optim.optim import GaLoreAdamW8bit, QGaLoreAdamW, WeLoreAdamW  # noqa: E402

CASES.append(
    OptimizerCase(
        name="WeLoreAdamW",
        build=WeLoreAdamW,
        identity_group={"refresh": "identity", "scale": 1.0},
    )
)

# TinyNet's tensors are all under 4096 elements, so its 8-bit moments stay in full precision:
# the degenerate cases then hold exactly. test_quantized_optim.py covers the 8-bit path.
CASES.append(
    OptimizerCase(
        name="GaLoreAdamW8bit",
        build=GaLoreAdamW8bit,
        identity_group={"refresh": "identity", "scale": 1.0},
    )
)
# The same holds for 4-bit moments; test_moments_4bit.py covers the 4-bit path itself.
CASES.append(
    OptimizerCase(
        name="GaLoreAdamW8bit(moment_bits=4)",
        build=partial(GaLoreAdamW8bit, moment_bits=4),
        identity_group={"refresh": "identity", "scale": 1.0},
    )
)

# QGaLoreAdamW stores bases in 4 bits: the identity's entries (0 and 1) are exactly
# representable, so the identity degenerate case still holds exactly.
CASES.append(
    OptimizerCase(
        name="QGaLoreAdamW",
        build=QGaLoreAdamW,
        identity_group={"refresh": "identity", "scale": 1.0},
    )
)
