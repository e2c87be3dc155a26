"""Carrying a handed-off layer's optimizer state onto its factors, and the factors' groups.

Moment carry. With ``W ~ U D`` (``U = U_k S^1/2``, ``D = S^1/2 V_k^T``) the factor gradients
are ``G_U = G D^T`` and ``G_D = U^T G``. GaLore's first moment ``M`` lives in projected
coordinates; ``back(M)`` (e.g. ``P M``) is its full-space estimate, so
``m_U = back(M) D^T`` and ``m_D = U^T back(M)`` are exact images of it. The second moment is
carried under the same independence assumption used at a basis refresh: ``back_sq(V)``
(``(P o P) V``) estimates ``E[G^2]`` elementwise, and ``v_U = back_sq(V) (D o D)^T``,
``v_D = (U o U)^T back_sq(V)``. The step count is kept, so bias correction stays consistent.
A ``Conv1D`` stores its weight ``in x out`` (``y = x W + b``), so its gradient and moments are
the transposes of the equivalent linear layer's: they are transposed to ``out x in`` after the
projection back and before the formulas above.

Factor groups. Each projected param group ``i`` gets one plain-AdamW group (marked
``FACTORS_OF: i``) that receives the factors of its layers; it exists from construction on, so
learning-rate schedulers created afterwards drive the factors too. Its ``lr`` is the projected
group's; the factors' ratio to it (``LR_SCALE``) is a group key of its own, applied in the
step. A factor that has taken ``j`` steps since its hand-off steps with
``lr * ratio * min(1, j / (rewarmup_steps + 1))``
(:func:`factor_lr_stages`), so carried moments meet a small step first.
Each factor may also carry its own lr multiplier (:mod:`lowrank_optim.handoff.factor_step`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lowrank_optim import state_keys as keys
from lowrank_optim.factorize import LowRankLinear
from lowrank_optim.handoff.candidates import HandoffCandidate
from lowrank_optim.handoff.factor_step import (
    back_project,
    squared_step_norms,
    step_multipliers,
)
from lowrank_optim.moment_storage import MomentStorage

__all__ = [
    "FACTORS_OF",
    "HANDOFF_STEP",
    "LR_MULTIPLIER",
    "LR_SCALE",
    "factor_group",
    "factor_group_of",
    "factor_lr_stages",
    "factor_moments",
    "factor_states",
    "move_to_factor_group",
]

#: Group key marking the plain-AdamW group that receives the factors of projected group ``i``.
FACTORS_OF = "welore_factors_of"
#: Factor-group key: the factors' lr as a multiple of the group's ``lr`` (the projection's
#: ``scale``, or ``HandoffConfig.factor_lr_scale``). It is kept apart from ``lr`` and applied
#: in the step, so a scheduler or a loop that *sets* every group's ``lr`` (``OneCycleLR``,
#: ``CyclicLR``, ``for g in opt.param_groups: g["lr"] = lr``) cannot drop it.
LR_SCALE = "welore_lr_scale"
#: Factor-state key: the factor's step count at its hand-off (for the re-warm-up ramp).
HANDOFF_STEP = keys.HANDOFF_STEP  # declared once, in state_keys
#: Factor-state key: the factor's own multiplier on its group's lr (``HandoffConfig.factor_step``).
LR_MULTIPLIER = keys.LR_MULTIPLIER


def factor_moments(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    bases: dict[str, torch.Tensor],
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    transposed: bool = False,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((m_U, v_U), (m_D, v_D))`` for the factors ``up`` (``m x k``) and ``down`` (``k x n``)
    from a layer's low-rank moments (see the module docstring for the math).

    ``transposed``: the moments and bases belong to a weight stored ``n x m`` (a ``Conv1D``);
    the full-space moments are transposed to ``m x n`` before they meet the factors.
    """
    compute = torch.promote_types(up.dtype, torch.float32)  # fp32 at least, fp64 kept
    wide = {key: basis.to(compute) for key, basis in bases.items()}
    first = back_project(exp_avg.to(compute), wide)
    second = back_project(exp_avg_sq.to(compute), wide, squared=True)
    if transposed:
        first, second = first.T, second.T
    up_wide, down_wide = up.detach().to(compute), down.detach().to(compute)
    return (
        (first @ down_wide.T, second @ down_wide.square().T),
        (up_wide.T @ first, up_wide.square().T @ second),
    )


def factor_states(
    state: Mapping[str, Any],
    bases: dict[str, torch.Tensor],
    factored: LowRankLinear,
    storage: MomentStorage,
    fresh: bool,
    *,
    transposed: bool = False,
    match: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """AdamW states of the new factors: carried moments (same step count) or zeros.

    ``state`` is the handed-off weight's optimizer state and ``bases`` its projection bases;
    ``storage`` keeps the factors' moments as the optimizer keeps all its moments (full
    precision, 8- or 4-bit). ``fresh`` (or a layer that never stepped, so has no bases) starts
    the factors from zero moments at step 0. ``transposed``: the state belongs to a weight
    stored ``in x out`` (a ``Conv1D``). ``match``: ``{"rule", "betas", "eps"}`` (the rule of
    ``HandoffConfig.factor_step`` and the source group's Adam constants) to give the factors
    their lr multipliers (:func:`step_multipliers`, from the moments that would be carried
    even when ``fresh``); ``None``: no multipliers.
    """
    states: list[dict[str, Any]] = []
    carried = multipliers = None
    if bases and not (fresh and match is None):
        exp_avg, exp_avg_sq = storage.read(state)
        carried = factor_moments(
            exp_avg, exp_avg_sq, bases, factored.up, factored.down, transposed=transposed
        )
        step = int(state[keys.STEP])
        if match is not None and step > 0:
            norms = squared_step_norms(
                exp_avg,
                exp_avg_sq,
                bases,
                carried,
                factored.up,
                factored.down,
                step=step,
                betas=match["betas"],
                eps=match["eps"],
            )
            multipliers = step_multipliers(norms, match["rule"])
        if fresh:
            carried = None
    for index, factor in enumerate((factored.up, factored.down)):
        factor_state: dict[str, Any] = {}
        storage.init(factor_state, tuple(factor.shape), factor)
        if carried is None:
            factor_state[keys.STEP] = 0
        else:
            factor_state[keys.STEP] = int(state[keys.STEP])
            storage.write(factor_state, *carried[index])
        factor_state[HANDOFF_STEP] = factor_state[keys.STEP]
        if multipliers is not None:
            factor_state[LR_MULTIPLIER] = multipliers[index]
        states.append(factor_state)
    return states[0], states[1]


def factor_group(source: Mapping[str, Any], index: int, lr_ratio: float | None) -> dict[str, Any]:
    """The empty plain-AdamW group that will hold the factors of projected group ``index``.

    It copies ``source``'s Adam hyper-parameters, ``lr`` included. The factors step with
    ``lr * group[LR_SCALE]``: ``lr_ratio`` (``HandoffConfig.factor_lr_scale``) ``None`` keeps
    the step size the projected weight was trained with, ``lr * scale``.
    """
    hyper = ("betas", "eps", "weight_decay", "on_bad_gradient")
    group: dict[str, Any] = {"params": [], FACTORS_OF: index}
    group.update({key: source[key] for key in hyper})
    group["lr"] = source["lr"]
    group[LR_SCALE] = float(source["scale"] if lr_ratio is None else lr_ratio)
    if "param_names" in source:
        group["param_names"] = []
    return group


def factor_group_of(param_groups: Sequence[dict[str, Any]], source_index: int) -> dict[str, Any]:
    """The factor group of projected group ``source_index``."""
    for group in param_groups:
        if group.get(FACTORS_OF) == source_index:
            return group
    raise RuntimeError(
        f"Param group {source_index} is projected but has no factor group to receive its "
        "layers' factors: it was put into param_groups without add_param_group. Add projected "
        "groups with optimizer.add_param_group(...), which creates their factor group"
    )


def move_to_factor_group(
    param_groups: Sequence[dict[str, Any]],
    candidate: HandoffCandidate,
    weight: torch.Tensor,
    factored: LowRankLinear,
) -> None:
    """Take ``weight`` out of its projected group and put ``factored``'s factors in the factor
    group of that group (with their names, where the groups carry ``param_names``)."""
    source = param_groups[candidate.group_index]
    position = next((i for i, p in enumerate(source["params"]) if p is weight), None)
    if position is None:  # find_candidates and the checkpoint checks rule this out
        raise RuntimeError(
            f"{candidate.name}: its weight is not in param group {candidate.group_index}"
        )
    del source["params"][position]
    if "param_names" in source:
        del source["param_names"][position]
    target = factor_group_of(param_groups, candidate.group_index)
    target["params"].extend([factored.up, factored.down])
    if "param_names" in target:
        target["param_names"].extend([f"{candidate.name}.up", f"{candidate.name}.down"])


def factor_lr_stages(
    group: Mapping[str, Any],
    indices: Sequence[int],
    state: Mapping[torch.Tensor, Mapping[str, Any]],
    ramp: int,
    relax: int = 0,
) -> dict[float, list[int]]:
    """``lr`` factor -> the factor indices of ``group`` that step with ``lr * factor`` now.

    A factor that has taken ``j`` steps since its hand-off (this one included) gets
    ``min(1, j / (ramp + 1))`` times its own matched-step multiplier ``mu`` (1 without one),
    which with ``relax > 0`` returns to 1 as ``mu + (1 - mu) min(1, (j - 1) / relax)``; factors
    that share a factor share one call (and one fused kernel).
    """
    stages: dict[float, list[int]] = {}
    for index in indices:
        param_state = state.get(group["params"][index], {})
        start = param_state.get(HANDOFF_STEP)  # absent in checkpoints older than the ramp
        taken = ramp + 1 if start is None else int(param_state[keys.STEP]) + 1 - int(start)
        multiplier = float(param_state.get(LR_MULTIPLIER, 1.0))
        if relax > 0:
            multiplier += (1.0 - multiplier) * min(1.0, max(taken - 1, 0) / relax)
        factor = min(1.0, taken / (ramp + 1)) * multiplier
        stages.setdefault(factor, []).append(index)
    return stages
