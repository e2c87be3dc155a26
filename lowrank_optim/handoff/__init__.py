"""The WeLore hand-off: which layers, what rank, the surgery, the state carry, the re-wrap.

Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank
Gradients" (2024): the layers whose gradient subspace stabilizes are the ones whose weights
become low-rank. Once such a layer's weight ``W`` (``m x n``) has settled, it is replaced by
``LowRankLinear`` factors ``U`` (``m x k``) and ``D`` (``k x n``) with ``k`` from WeLore's
data-free rank selection, and the factors train with plain AdamW; weight, gradient and
optimizer-state memory drop from ``mn`` to ``k (m + n)``.

:class:`~lowrank_optim.WeLoreAdamW` decides *when*; this package does the rest, one idea per
module:

* :mod:`.candidates`: which layers can go, why others never can, stability readiness and the
  check-step schedule.
* :mod:`.ranks`: WeLore's global-threshold ranks over the candidates.
* :mod:`.surgery`: factorize one layer, swap it in, carry its state (:mod:`.carry`: the moment
  math, the factor param groups and their re-warm-up).
* :mod:`.taper`: fade a layer's tail out before it is factorized.
* :mod:`.resume`: re-apply a checkpoint's hand-offs before loading its state.
* :mod:`.wrappers`: DDP unwrap/re-wrap, and what is refused on FSDP2-sharded parameters (the
  FSDP2 hand-off itself is :mod:`lowrank_optim.distributed.handoff`).

The factorization itself (rank selection, ``LowRankLinear``, model surgery) is the library in
:mod:`lowrank_optim.factorize`.
"""

from lowrank_optim.handoff.candidates import (
    HandoffCandidate,
    IsProjected,
    Refusal,
    find_candidates,
    first_check_step,
    is_check_step,
    projected_linears,
    stable_long_enough,
)
from lowrank_optim.handoff.carry import (
    FACTORS_OF,
    HANDOFF_STEP,
    LR_MULTIPLIER,
    LR_SCALE,
    factor_group,
    factor_group_of,
    factor_lr_stages,
    factor_moments,
    factor_states,
    move_to_factor_group,
)
from lowrank_optim.handoff.factor_step import squared_step_norms, step_multipliers
from lowrank_optim.handoff.ranks import (
    candidate_spectra,
    choose_ranks,
    largest_handoff_rank,
    welore_ranks,
)
from lowrank_optim.handoff.resume import check_own_handoffs, parse_plan_entry, reapply_plan
from lowrank_optim.handoff.surgery import hand_off_layer, plan_entry_of, swap_in_factors
from lowrank_optim.handoff.taper import advance_taper_, shrink_tail_, taper_entry, top_subspace
from lowrank_optim.handoff.wrappers import (
    RETIRED_AT,
    HandoffOptimizer,
    is_sharded_weight,
    refuse_sharded_handoff,
    retire,
    retired_wrapper_error,
    rewrap,
    unwrap,
)

__all__ = [
    "FACTORS_OF",
    "HANDOFF_STEP",
    "HandoffCandidate",
    "HandoffOptimizer",
    "IsProjected",
    "LR_MULTIPLIER",
    "LR_SCALE",
    "RETIRED_AT",
    "Refusal",
    "advance_taper_",
    "candidate_spectra",
    "check_own_handoffs",
    "choose_ranks",
    "factor_group",
    "factor_group_of",
    "factor_lr_stages",
    "factor_moments",
    "factor_states",
    "find_candidates",
    "first_check_step",
    "hand_off_layer",
    "is_check_step",
    "is_sharded_weight",
    "largest_handoff_rank",
    "move_to_factor_group",
    "parse_plan_entry",
    "plan_entry_of",
    "projected_linears",
    "reapply_plan",
    "refuse_sharded_handoff",
    "retire",
    "retired_wrapper_error",
    "rewrap",
    "shrink_tail_",
    "squared_step_norms",
    "stable_long_enough",
    "step_multipliers",
    "swap_in_factors",
    "taper_entry",
    "top_subspace",
    "unwrap",
    "welore_ranks",
]
