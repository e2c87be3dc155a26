"""What rank each handed-off layer keeps: WeLore's data-free selection over the candidates.

WeLore (Jaiswal et al., ICML 2025) pools the min/max-normalized singular values of all
matrices and removes the ``target_reduction`` share of the total rank below one global
threshold ``t``; a matrix keeps ``k = #{normalized values >= t}``. During training the
hand-offs come one check step at a time, so :func:`choose_ranks` counts the rank already
removed by earlier hand-offs (and layers being tapered) and solves the threshold on the dense
candidates for what is left, which keeps the overall target however many steps it takes.

The size test (:func:`~lowrank_optim.factorize.worth_factorizing`) is WeLore's LRC rule: a
layer is handed off only if its own rank reduction exceeds ``min_ratio`` and its factors are
smaller than it, ``k (m + n) < m n``.

Under FSDP2 the spectra of ``Shard(0)`` weights come from the row shards
(:mod:`lowrank_optim.distributed.factorize`): every rank computes the same values, so every rank
chooses the same ranks with no further communication.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lowrank_optim.factorize import normalized_spectrum, solve_threshold
from lowrank_optim.handoff.candidates import HandoffCandidate
from lowrank_optim.handoff.wrappers import dtensor_type

__all__ = ["choose_ranks", "welore_ranks"]


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
    # Removing every value of the dense matrices is never asked for: keep at least half a value
    # on average, so solve_threshold gets a share strictly below one.
    share = min(still_to_remove / dense_rank, 1.0 - 0.5 / dense_rank)
    threshold = solve_threshold(spectra, share)
    return {
        name: max(int((normalized_spectrum(values) >= threshold).sum()), 1)
        for name, values in spectra.items()
    }


def _spectrum(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a candidate's weight; an FSDP2 ``Shard(0)`` DTensor's come from
    :func:`lowrank_optim.distributed.factorize.sharded_spectrum` (identical on every rank, never
    gathering the weight). ``Conv1D`` weights are stored transposed: same singular values."""
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(weight, dtensor):
        from lowrank_optim.distributed.factorize import sharded_spectrum

        return sharded_spectrum(weight).values.float()
    return torch.linalg.svdvals(weight.detach().float())


def welore_ranks(
    candidates: Sequence[HandoffCandidate],
    committed: Iterable[Mapping[str, Any]],
    target_reduction: float,
) -> dict[str, int]:
    """WeLore's ranks for the dense ``candidates``, given the ``committed`` hand-offs.

    ``committed``: plan entries (``{"rank": k, "shape": [m, n], ...}``) of the layers already
    handed off or being tapered; their removed rank counts toward the target.
    """
    spectra = {c.name: _spectrum(c.module.weight) for c in candidates}
    committed = list(committed)
    planned_full = sum(min(entry["shape"]) for entry in committed)
    removed = sum(min(entry["shape"]) - entry["rank"] for entry in committed)
    total = planned_full + sum(min(c.module.weight.shape) for c in candidates)
    return choose_ranks(spectra, removed, total, target_reduction)
