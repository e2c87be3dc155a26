"""WeLore hand-off: pick converged layers, choose their rank, swap in factors, move the state.

The pieces WeLoreAdamW composes (Jaiswal et al., "From GaLore to WeLore", ICML 2025):

1. :func:`find_candidates` finds the linear layers (``nn.Linear`` and transformers' ``Conv1D``,
   the types :class:`~lowrank_optim.factorize.LowRankLinear` can replace) whose weight the
   optimizer projects, and says why each other projected weight can never be handed off
   (another module type, an INT8 ``QuantizedLinear``, or a weight tied to another module).
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
A ``Conv1D`` stores its weight ``in x out`` (``y = x W + b``), so its gradient and moments are
the transposes of the equivalent linear layer's: they are transposed to ``out x in`` after the
projection back and before the formulas above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_optim.factorize import dense_weight_of, normalized_spectrum, solve_threshold
from lowrank_optim.projection import LEFT, RIGHT
from lowrank_optim.quant.quantized_linear import QuantizedLinear

__all__ = [
    "HandoffCandidate",
    "Refusal",
    "choose_ranks",
    "factor_moments",
    "find_candidates",
    "projected_linears",
    "shrink_tail_",
    "top_subspace",
]


@dataclass(frozen=True)
class HandoffCandidate:
    """A dense projected linear layer (``nn.Linear`` or ``Conv1D``) and its optimizer group."""

    name: str
    module: nn.Module
    group_index: int

    @property
    def weight(self) -> nn.Parameter:
        """The parameter the optimizer holds (``in x out`` for a ``Conv1D``)."""
        return self.module.weight

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``in x out`` (transformers' ``Conv1D``)."""
        return type(self.module) is not nn.Linear

    def dense_weight(self) -> torch.Tensor:
        """The ``out x in`` weight ``W`` with ``y = x W^T + b`` (a view, never a copy)."""
        return dense_weight_of(self.module)


@dataclass(frozen=True)
class Refusal:
    """A projected weight that can never be handed off, the module holding it, and why."""

    name: str
    type_name: str
    reason: str

    def message(self) -> str:
        return f"{self.name} ({self.type_name}) is projected but is never handed off: {self.reason}"


_QUANTIZED_REASON = (
    "its weight is INT8 codes. WeLoreAdamW, like GaLoreAdamW, writes its update into the "
    "weight and cannot update INT8 codes (QGaLoreAdamW can, and has no hand-off), and a "
    "hand-off would turn the layer into dense {dtype} factors trained by full-precision AdamW, "
    "giving up the INT8 storage and stochastic rounding the layer was quantized for. Keep it "
    "dense (dequantize_model) to hand it off"
)


def _owners(model: nn.Module, ids: set[int]) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``id(param) -> [(module name, module, attribute)]`` over every place a param is held.

    Modules are listed without removing duplicates, so a module registered under two names (a
    shared module) counts as two owners, exactly like two modules sharing one weight.
    """
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attribute, param in module._parameters.items():
            if param is not None and id(param) in ids:
                owners.setdefault(id(param), []).append((name, module, attribute))
    return owners


def find_candidates(
    model: nn.Module, optimizer: torch.optim.Optimizer, is_projected: Any
) -> tuple[list[HandoffCandidate], list[Refusal]]:
    """The projected layers that can be handed off, and why each other projected weight cannot.

    A projected weight can be handed off when exactly one module holds it, as its ``weight``,
    and that module is an ``nn.Linear`` or a transformers ``Conv1D`` (what
    :meth:`LowRankLinear.from_linear` factorizes). A weight held in two places (tied weights, or
    a module registered twice) is refused: replacing one holder would untie them and leave the
    other holding a weight the optimizer no longer steps. Candidates come in module order.
    """
    where: dict[int, int] = {}
    for group_index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if is_projected(group, param):
                where[id(param)] = group_index
    owners = _owners(model, set(where))
    candidates: list[HandoffCandidate] = []
    refusals: list[Refusal] = []
    for param_id, holders in owners.items():
        name, module, attribute = holders[0]
        type_name = type(module).__name__
        if len(holders) > 1:
            others = ", ".join(f"{n} ({type(m).__name__})" for n, m, _ in holders[1:])
            reason = (
                f"its weight is also held by {others}; handing one holder off would untie them "
                "and leave the other with a weight the optimizer no longer steps"
            )
            refusals.append(Refusal(name, type_name, reason))
        elif isinstance(module, QuantizedLinear):
            reason = _QUANTIZED_REASON.format(dtype=module.weight.dtype)
            refusals.append(Refusal(name, type_name, reason))
        elif attribute != "weight" or dense_weight_of(module) is None:
            reason = (
                f"its parameter {attribute!r} is not the weight of an nn.Linear or a "
                "transformers Conv1D, the layer types LowRankLinear can replace"
            )
            refusals.append(Refusal(name, type_name, reason))
        else:
            candidates.append(HandoffCandidate(name, module, where[param_id]))
    return candidates, refusals


def projected_linears(
    model: nn.Module, optimizer: torch.optim.Optimizer, is_projected: Any
) -> list[HandoffCandidate]:
    """The layers of ``model`` that can be handed off (see :func:`find_candidates`)."""
    return find_candidates(model, optimizer, is_projected)[0]


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
    first = _back(exp_avg.to(compute), wide, squared=False)
    second = _back(exp_avg_sq.to(compute), wide, squared=True)
    if transposed:
        first, second = first.T, second.T
    up_wide, down_wide = up.detach().to(compute), down.detach().to(compute)
    return (
        (first @ down_wide.T, second @ down_wide.square().T),
        (up_wide.T @ first, up_wide.square().T @ second),
    )


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
