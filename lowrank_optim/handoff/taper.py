"""The taper: a selected layer's tail beyond rank ``k`` fades out before it is factorized.

A hand-off replaces ``W`` by its rank-``k`` truncation at once, which changes the layer's
function by the truncation error. With ``HandoffConfig.taper_steps > 0`` the layer instead
keeps training densely while the part of ``W`` outside its top-``k`` singular subspace (fixed
when the taper starts) is scaled linearly down to zero over ``taper_steps`` steps; the
factorization at the end is then exact, and training has had time to adapt to the shrinking
tail.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank_optim.factorize import dense_weight_of
from lowrank_optim.handoff.candidates import HandoffCandidate

__all__ = ["advance_taper_", "shrink_tail_", "taper_entry", "top_subspace"]


def top_subspace(dense: torch.Tensor, rank: int) -> tuple[torch.Tensor, bool]:
    """Orthonormal basis of the top-``rank`` singular subspace of ``dense`` (``m x n``), on its
    smaller side: ``(U_k, True)`` (``m x k``) if ``m <= n``, else ``(V_k, False)`` (``n x k``)."""
    left = dense.shape[0] <= dense.shape[1]
    u, _, vh = torch.linalg.svd(dense.detach().float(), full_matrices=False)
    return (u[:, :rank].contiguous(), True) if left else (vh[:rank].T.contiguous(), False)


@torch.no_grad()
def shrink_tail_(dense: torch.Tensor, basis: torch.Tensor, left: bool, keep: float) -> None:
    """Scale the part of ``dense`` outside ``basis``'s subspace by ``keep``, in place.

    With ``U`` the basis (left side), ``W = U U^T W + T`` and ``W <- U U^T W + keep * T``; on the
    right side ``W = W V V^T + T``. ``keep = 0`` leaves ``W`` of rank at most ``k``, so a rank-``k``
    factorization of it is exact. This is the hand-off's taper: the tail is removed over several
    steps while the layer still trains, instead of all at once by the truncation.
    """
    work = dense.float()
    basis = basis.to(work.device)
    inside = basis @ (basis.T @ work) if left else (work @ basis) @ basis.T
    dense.copy_(inside + keep * (work - inside))


def taper_entry(candidate: HandoffCandidate, rank: int, step: int) -> dict[str, Any]:
    """The record of a layer whose taper starts at ``step``: its plan entry (``rank``,
    ``shape``, ``group``) plus ``start``, ``last`` (the last step it was shrunk) and the
    subspace that is kept (``basis``, ``left``). Checkpointed as it is (tensors and numbers)."""
    dense = candidate.dense_weight()
    basis, left = top_subspace(dense, rank)
    return {
        "rank": rank,
        "shape": list(dense.shape),
        "group": candidate.group_index,
        "start": step,
        "last": step,
        "basis": basis,
        "left": left,
    }


def advance_taper_(layer: nn.Module, entry: dict[str, Any], step: int, taper_steps: int) -> bool:
    """Shrink ``layer``'s tail for ``step``; True once its taper has ended (hand it off now).

    The tail is scaled so that it falls linearly from its size at the start to zero at
    ``start + taper_steps``, however often this runs: from the last shrink at ``last`` the tail
    is multiplied by ``(end - step) / (end - last)``. A frozen layer's taper pauses (its weight
    must not change), and a step already applied is not applied twice.
    """
    if not layer.weight.requires_grad or step <= entry["last"]:
        return False
    end = entry["start"] + taper_steps
    keep = max(end - step, 0) / max(end - entry["last"], 1)
    shrink_tail_(dense_weight_of(layer), entry["basis"], entry["left"], keep)
    entry["last"] = step
    return step >= end
