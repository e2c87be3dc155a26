"""The factors' own lr multipliers (``HandoffConfig.factor_step``), set once at a hand-off.

Matched step (``HandoffConfig.factor_step = "matched"``). Adam moves each entry of a parameter
by about its lr, so the factors' lr fixes the step of ``U`` and ``D``, not of ``W = U D``: to
first order ``dW = dU D + U dD``, whose size depends on the layer's singular values and on
``k``. Each layer's factors therefore get their own lr multiplier

    mu = ||back(N)||_F / ||N_U D + U N_D||_F,   N = m_hat / (sqrt(v_hat) + eps),

where ``N`` is the layer's last projected Adam direction and ``N_U``, ``N_D`` are the factors'
first Adam directions from the carried moments (same step count, so the same bias
corrections). With the factor group at ``lr * scale`` (the default), the factors' first step
then moves ``W`` by the same Frobenius norm as the layer's last GaLore step, ``lr * scale *
||P N||_F``, whatever the layer's spectrum, rank and shape. ``"matched-each"`` matches each
factor's own term instead: ``mu_U = ||back(N)|| / ||N_U D||`` and ``mu_D = ||back(N)|| /
||U N_D||``, so ``U`` alone and ``D`` alone would each move ``W`` as far as GaLore did (together
between ``sqrt(2)`` and 2 times as far, as their terms are orthogonal or aligned).
``"capped"`` takes ``matched-each``'s multipliers but never above 1: a factor's lr is lowered
where its own term would move ``W`` further than GaLore's last step, and never raised above the
group's ``lr * scale``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lowrank_optim.projection import LEFT, RIGHT

__all__ = ["adam_direction", "back_project", "squared_step_norms", "step_multipliers"]


def back_project(
    low: torch.Tensor, bases: dict[str, torch.Tensor], squared: bool = False
) -> torch.Tensor:
    """``P low Q^T`` with whichever of the bases ``{LEFT: P, RIGHT: Q}`` exist: a projected
    tensor's full-space image; ``squared``: ``(P o P) low (Q o Q)^T``, the image of a second
    moment under the independence assumption of a basis refresh."""
    left, right = bases.get(LEFT), bases.get(RIGHT)
    full = low
    if left is not None:
        full = (left.square() if squared else left) @ full
    if right is not None:
        full = full @ (right.square() if squared else right).T
    return full


def adam_direction(
    first: torch.Tensor, second: torch.Tensor, step: int, betas: Sequence[float], eps: float
) -> torch.Tensor:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` at step count ``step`` (as
    :mod:`lowrank_optim.moments` computes it)."""
    beta1, beta2 = betas
    denominator = second.clamp(min=0).sqrt() / math.sqrt(1.0 - beta2**step) + eps
    return first / (1.0 - beta1**step) / denominator


def squared_step_norms(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    bases: dict[str, torch.Tensor],
    carried: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    step: int,
    betas: Sequence[float],
    eps: float,
) -> torch.Tensor:
    """fp64 ``[||back(N)||^2, ||N_U D||^2, ||U N_D||^2, ||N_U D + U N_D||^2]`` (see the module
    docstring); ``carried`` is :func:`factor_moments`' result for these moments, bases and
    factors. Sums of squares, so that row shards can add theirs up."""
    compute = torch.promote_types(up.dtype, torch.float32)
    wide = {key: basis.to(compute) for key, basis in bases.items()}
    galore = back_project(
        adam_direction(exp_avg.to(compute), exp_avg_sq.to(compute), step, betas, eps), wide
    )
    (up_first, up_second), (down_first, down_second) = carried
    up_wide, down_wide = up.detach().to(compute), down.detach().to(compute)
    up_term = adam_direction(up_first, up_second, step, betas, eps) @ down_wide
    down_term = up_wide @ adam_direction(down_first, down_second, step, betas, eps)
    terms = (galore, up_term, down_term, up_term + down_term)
    return torch.stack([term.double().square().sum() for term in terms])


def step_multipliers(squared_norms: torch.Tensor, rule: str) -> tuple[float, float]:
    """The ``(up, down)`` lr multipliers of ``rule`` from :func:`squared_step_norms`' values.

    ``matched``: both ``||back(N)|| / ||N_U D + U N_D||``, so ``W``'s first step matches the
    layer's last GaLore step. ``matched-each``: ``||back(N)|| / ||N_U D||`` for ``U`` and
    ``||back(N)|| / ||U N_D||`` for ``D``, so each factor's own term moves ``W`` that far.
    ``capped``: ``matched-each``'s, each at most 1. A multiplier whose norms are zero or not
    finite is ``1.0`` (nothing to match).
    """
    galore, up_term, down_term, joint = (float(value) ** 0.5 for value in squared_norms)

    def ratio(denominator: float) -> float:
        value = galore / denominator if denominator > 0 else math.nan
        return value if math.isfinite(value) and value > 0 else 1.0

    if rule == "matched":
        return ratio(joint), ratio(joint)
    if rule == "matched-each":
        return ratio(up_term), ratio(down_term)
    if rule == "capped":
        return min(1.0, ratio(up_term)), min(1.0, ratio(down_term))
    raise ValueError(
        f"Invalid factor step rule: {rule!r}; allowed: matched, matched-each, capped"
    )
