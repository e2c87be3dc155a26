"""WeLore hand-off: pick converged layers, choose their rank, swap in factors, move the state.

The pieces WeLoreAdamW composes (Jaiswal et al., "From GaLore to WeLore", ICML 2025):

1. :func:`projected_linears` finds the ``nn.Linear`` modules whose weight the optimizer projects.
2. :func:`choose_ranks` runs WeLore's data-free rank selection over all projected weights with
   one global threshold, counting the rank already removed by earlier hand-offs, so the overall
   target holds however many hand-offs it takes.
3. :func:`factor_moments` carries the layer's low-rank Adam moments onto the two factors.

Moment carry. With ``W ~ U D`` (``U = U_k S^1/2``, ``D = S^1/2 V_k^T``) the factor gradients
are ``G_U = G D^T`` and ``G_D = U^T G``. GaLore's first moment ``M`` lives in projected
coordinates; ``back(M)`` (e.g. ``P M``) is its full-space estimate, so
``m_U = back(M) D^T`` and ``m_D = U^T back(M)`` are exact images of it. The second moment is
carried under the same independence assumption used at a basis refresh: ``back_sq(V)``
(``(P o P) V``) estimates ``E[G^2]`` elementwise, and ``v_U = back_sq(V) (D o D)^T``,
``v_D = (U o U)^T back_sq(V)``. The step count is kept, so bias correction stays consistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_optim.factorize import normalized_spectrum, solve_threshold
from lowrank_optim.projection import LEFT, RIGHT

__all__ = ["HandoffCandidate", "choose_ranks", "factor_moments", "projected_linears"]


@dataclass(frozen=True)
class HandoffCandidate:
    """A dense projected linear layer, where its weight sits in the optimizer, and its spectrum."""

    name: str
    module: nn.Linear
    group_index: int


def projected_linears(
    model: nn.Module, optimizer: torch.optim.Optimizer, is_projected: Any
) -> list[HandoffCandidate]:
    """Every ``nn.Linear`` of ``model`` whose weight ``optimizer`` steps in a low-rank subspace."""
    where = {}
    for group_index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if is_projected(group, param):
                where[id(param)] = group_index
    return [
        HandoffCandidate(name, module, where[id(module.weight)])
        for name, module in model.named_modules()
        if type(module) is nn.Linear and id(module.weight) in where
    ]


def choose_ranks(
    spectra: dict[str, torch.Tensor],
    removed_before: int,
    total_rank: int,
    target_reduction: float,
) -> dict[str, int]:
    """Ranks to keep for the dense matrices in ``spectra`` under WeLore's global threshold.

    ``total_rank`` is ``sum(min(m, n))`` over all projected matrices, factorized ones included,
    and ``removed_before`` the rank their hand-offs already removed. The threshold is solved on
    the dense matrices for whatever is left of ``target_reduction * total_rank``; a matrix keeps
    the count of its normalized singular values at or above it.
    """
    dense_rank = sum(values.numel() for values in spectra.values())
    still_to_remove = target_reduction * total_rank - removed_before
    if still_to_remove <= 0 or dense_rank == 0:
        return {name: values.numel() for name, values in spectra.items()}
    share = min(still_to_remove / dense_rank, 1.0 - 0.5 / dense_rank)
    threshold = solve_threshold(spectra, share)
    return {
        name: max(int((normalized_spectrum(values) >= threshold).sum()), 1)
        for name, values in spectra.items()
    }


def _back(low: torch.Tensor, bases: dict[str, torch.Tensor], squared: bool) -> torch.Tensor:
    left, right = bases.get(LEFT), bases.get(RIGHT)
    full = low
    if left is not None:
        full = (left.square() if squared else left) @ full
    if right is not None:
        full = full @ (right.square() if squared else right).T
    return full


def factor_moments(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    bases: dict[str, torch.Tensor],
    up: torch.Tensor,
    down: torch.Tensor,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((m_U, v_U), (m_D, v_D))`` for the factors ``up`` (``m x k``) and ``down`` (``k x n``)
    from a layer's low-rank moments (see the module docstring for the math)."""
    compute = torch.promote_types(up.dtype, torch.float32)  # fp32 at least, fp64 kept
    wide = {key: basis.to(compute) for key, basis in bases.items()}
    first = _back(exp_avg.to(compute), wide, squared=False)
    second = _back(exp_avg_sq.to(compute), wide, squared=True)
    up_wide, down_wide = up.detach().to(compute), down.detach().to(compute)
    return (
        (first @ down_wide.T, second @ down_wide.square().T),
        (up_wide.T @ first, up_wide.square().T @ second),
    )
