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

Under FSDP2 the spectra of ``Shard(0)`` weights come from the row shards without gathering any
weight on every rank (:mod:`lowrank_optim.distributed.spectra`): each matrix's spectrum is
computed by one owner rank, and one all-gather of the singular values gives every rank every
spectrum, bit for bit, so every rank chooses the same ranks. For the layers that may be handed
off at this check step (``keep``), the owner keeps the top singular vectors, and the hand-off
takes its factors from that same decomposition (``decompositions``).

No spectrum is taken when there is nothing left to remove (the earlier hand-offs already met
the target): every candidate keeps its full rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

import torch

from lowrank_optim.factorize import normalized_spectrum, solve_threshold, worth_factorizing
from lowrank_optim.handoff.candidates import HandoffCandidate
from lowrank_optim.handoff.wrappers import dtensor_type

__all__ = ["candidate_spectra", "choose_ranks", "largest_handoff_rank", "welore_ranks"]


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


def largest_handoff_rank(rows: int, cols: int, min_ratio: float) -> int:
    """The largest ``k`` that :func:`~lowrank_optim.factorize.worth_factorizing` accepts for an
    ``rows x cols`` matrix (``k < (1 - min_ratio) min(m, n)`` and ``k (m + n) < m n``); 0 if
    none. No WeLore rank of a layer that is handed off exceeds it."""
    full = min(rows, cols)
    rank = min(full, int((1.0 - min_ratio) * full) + 1, (rows * cols) // (rows + cols) + 1)
    while rank >= 1 and not worth_factorizing(rank, rows, cols, min_ratio):
        rank -= 1
    return max(rank, 0)


def _is_sharded(weight: torch.Tensor) -> bool:
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(weight, dtensor)


def candidate_spectra(
    candidates: Sequence[HandoffCandidate], keep: Mapping[str, int] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(spectra, decompositions)``: every candidate's singular values (fp32, descending), and
    for the FSDP2-sharded candidates in ``keep`` the decomposition their hand-off can take its
    factors from (name -> :class:`~lowrank_optim.distributed.spectra.OwnedSpectra`).

    A dense weight's values come from ``torch.linalg.svdvals`` (``Conv1D`` weights are stored
    transposed: same values). ``Shard(0)`` DTensors come from
    :func:`~lowrank_optim.distributed.spectra.owner_spectra`, one call per process group over
    all of its candidates, in order (every rank makes the same calls). ``keep``: name -> how many
    top singular vectors to keep (:func:`largest_handoff_rank` of the layers that may go now).
    """
    keep = keep or {}
    spectra: dict[str, torch.Tensor] = {}
    batches: dict[int, list[HandoffCandidate]] = {}
    for candidate in candidates:
        weight = candidate.module.weight
        if _is_sharded(weight):
            batches.setdefault(id(weight.device_mesh.get_group()), []).append(candidate)
        else:
            spectra[candidate.name] = torch.linalg.svdvals(weight.detach().float())
    decompositions: dict[str, Any] = {}
    if batches:
        from lowrank_optim.distributed.spectra import owner_spectra

        for batch in batches.values():
            kept = {c.name: keep[c.name] for c in batch if keep.get(c.name, 0) > 0}
            owned = owner_spectra({c.name: c.module.weight for c in batch}, keep=kept)
            for c in batch:
                spectra[c.name] = owned.values[c.name].float()
            decompositions.update(dict.fromkeys(kept, owned))
    return {c.name: spectra[c.name] for c in candidates}, decompositions


def welore_ranks(
    candidates: Sequence[HandoffCandidate],
    committed: Iterable[Mapping[str, Any]],
    target_reduction: float,
    *,
    keep: Mapping[str, int] | None = None,
    decompositions: MutableMapping[str, Any] | None = None,
) -> dict[str, int]:
    """WeLore's ranks for the dense ``candidates``, given the ``committed`` hand-offs.

    ``committed``: plan entries (``{"rank": k, "shape": [m, n], ...}``) of the layers already
    handed off or being tapered; their removed rank counts toward the target. ``keep`` and
    ``decompositions``: see :func:`candidate_spectra` (the decompositions of the sharded layers
    in ``keep`` are put in ``decompositions``, for
    :func:`lowrank_optim.distributed.handoff.hand_off_sharded_layer`).
    """
    committed = list(committed)
    planned_full = sum(min(entry["shape"]) for entry in committed)
    removed = sum(min(entry["shape"]) - entry["rank"] for entry in committed)
    total = planned_full + sum(min(c.module.weight.shape) for c in candidates)
    if target_reduction * total - removed <= 0:  # nothing left to remove: no spectra needed
        return {c.name: min(c.module.weight.shape) for c in candidates}
    spectra, found = candidate_spectra(candidates, keep)
    if decompositions is not None:
        decompositions.update(found)
    return choose_ranks(spectra, removed, total, target_reduction)
