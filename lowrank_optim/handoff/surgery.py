"""The hand-off of one layer: its weight becomes ``LowRankLinear`` factors, its state moves.

For a dense projected layer with weight ``W`` (``m x n``) and a chosen rank ``k``, the truncated
SVD ``W ~ U_k S_k V_k^T`` gives the factors ``up = U_k S_k^1/2`` and ``down = S_k^1/2 V_k^T``
(:class:`~lowrank_optim.factorize.LowRankLinear`, WeLore: Jaiswal et al., 2024). The module is
swapped in the model (:func:`~lowrank_optim.factorize.replace_module`), the weight's optimizer
state is carried onto the factors (:mod:`lowrank_optim.handoff.carry`), and the weight leaves
its projected param group for that group's factor group. Weight, gradient and moment memory,
and the layer's FLOPs, drop from ``mn`` to ``k (m + n)``.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import nn

from lowrank_optim.basis_storage import read_basis
from lowrank_optim.factorize import LowRankLinear, replace_module
from lowrank_optim.handoff.candidates import HandoffCandidate
from lowrank_optim.handoff.carry import LR_MULTIPLIER, factor_states, move_to_factor_group
from lowrank_optim.moment_storage import MomentStorage
from lowrank_optim.projection import LEFT, RIGHT
from lowrank_optim.stability import OVERLAP_HISTORY, STABLE_SINCE, latest

__all__ = ["hand_off_layer", "plan_entry_of", "swap_in_factors"]


def plan_entry_of(candidate: HandoffCandidate, rank: int) -> dict[str, Any]:
    """The checkpointed record of a hand-off: ``{"rank", "shape" (out x in), "group"}``."""
    rows, cols = candidate.dense_weight().shape
    return {"rank": rank, "shape": [rows, cols], "group": candidate.group_index}


def swap_in_factors(
    root: nn.Module,
    candidate: HandoffCandidate,
    factored: LowRankLinear,
    param_groups: Sequence[dict[str, Any]],
) -> None:
    """Put ``factored`` in ``candidate``'s place in the model and in the param groups.

    The bias is the same ``Parameter`` as the dense layer's, so its AdamW state stays valid.
    """
    if candidate.module.bias is not None:
        factored.bias = candidate.module.bias
    replace_module(root, candidate.name, factored)
    move_to_factor_group(param_groups, candidate, candidate.weight, factored)


def hand_off_layer(
    root: nn.Module,
    candidate: HandoffCandidate,
    rank: int,
    *,
    param_groups: Sequence[dict[str, Any]],
    state: MutableMapping[torch.Tensor, Any],
    storage: MomentStorage,
    fresh: bool,
    factor_step: str = "fixed",
) -> dict[str, Any]:
    """Factorize ``candidate`` at ``rank`` inside ``root`` and carry its optimizer state.

    ``state`` is the optimizer's per-parameter state (the weight's entry is removed, the
    factors' entries added), ``storage`` how it keeps moments, ``fresh`` whether the factors
    start from zero moments (``HandoffConfig.moments == "fresh"``) instead of carried ones,
    ``factor_step`` how their lr multipliers are set (``HandoffConfig.factor_step``; see
    :mod:`lowrank_optim.handoff.factor_step`).

    Returns the report fields of this hand-off that the layer alone determines: ``rank``,
    ``full_rank``, ``params_before``/``params_after``, ``relative_error``, the stability
    record (``overlap``, ``stable_since``) at the time it went, and the factors' lr
    multipliers (``lr_multipliers``: ``[up, down]``, 1.0 without one).
    """
    weight = candidate.weight
    dense = candidate.dense_weight()  # out x in, a view of the weight
    weight_state = state.pop(weight, {})
    bits = param_groups[candidate.group_index].get("proj_bits")
    bases = {
        key: basis
        for key in (LEFT, RIGHT)
        if (basis := read_basis(weight_state, key, bits, weight.dtype)) is not None
    }
    factored = LowRankLinear.from_linear(candidate.module, rank)
    error = factored.relative_error(dense.detach())
    source = param_groups[candidate.group_index]
    up_state, down_state = factor_states(
        weight_state,
        bases,
        factored,
        storage,
        fresh,
        transposed=candidate.transposed,
        match=None
        if factor_step == "fixed"
        else {"rule": factor_step, "betas": source["betas"], "eps": source["eps"]},
    )
    swap_in_factors(root, candidate, factored, param_groups)
    state[factored.up] = up_state
    state[factored.down] = down_state
    weight.grad = None  # the dense weight is gone from the model: free its gradient now
    rows, cols = dense.shape
    return {
        "rank": rank,
        "full_rank": min(rows, cols),
        "params_before": rows * cols,
        "params_after": rank * (rows + cols),
        "relative_error": error,
        "overlap": latest(weight_state, OVERLAP_HISTORY),
        "stable_since": int(weight_state.get(STABLE_SINCE, -1)),
        "lr_multipliers": [float(s.get(LR_MULTIPLIER, 1.0)) for s in (up_state, down_state)],
    }
