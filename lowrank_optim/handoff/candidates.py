"""Which layers can be handed off: candidates, refusals, and stability readiness.

WeLore (Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge
from Low-Rank Gradients", ICML 2025) hands off the linear layers whose gradient subspace has
settled. :func:`find_candidates` finds the linear layers (``nn.Linear`` and transformers'
``Conv1D``, the types :class:`~lowrank_optim.factorize.LowRankLinear` can replace) whose weight
the optimizer projects, and says why each other projected weight can never be handed off
(another module type, an INT8 ``QuantizedLinear``, or a weight tied to another module).
:func:`stable_long_enough` is the per-layer readiness test on the stability state, and
:func:`first_check_step` / :func:`is_check_step` the schedule of the steps at which layers are
looked at.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_optim.config import HandoffConfig
from lowrank_optim.factorize import dense_weight_of
from lowrank_optim.quant.quantized_linear import QuantizedLinear
from lowrank_optim.stability import STABLE_SINCE

__all__ = [
    "HandoffCandidate",
    "IsProjected",
    "Refusal",
    "find_candidates",
    "first_check_step",
    "is_check_step",
    "projected_linears",
    "stable_long_enough",
]

#: ``is_projected(group, param)``: whether the optimizer projects ``param`` (GaLoreAdamW's).
IsProjected = Callable[[dict[str, Any], torch.Tensor], bool]


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
    model: nn.Module, optimizer: torch.optim.Optimizer, is_projected: IsProjected
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
        elif isinstance(module, nn.Linear) and type(module).__name__.startswith("FSDP"):
            reason = (
                "it is its own fully_shard unit; the FSDP2 hand-off replaces layers inside a "
                "unit (fully_shard per block, e.g. per decoder layer), not a unit itself"
            )
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
    model: nn.Module, optimizer: torch.optim.Optimizer, is_projected: IsProjected
) -> list[HandoffCandidate]:
    """The layers of ``model`` that can be handed off (see :func:`find_candidates`)."""
    return find_candidates(model, optimizer, is_projected)[0]


def stable_long_enough(state: Mapping[str, Any] | None, step: int, min_stable_steps: int) -> bool:
    """Whether a parameter's stability state says it has been stable ``min_stable_steps``.

    ``STABLE_SINCE`` is the step at which the stability criterion last started to hold (``-1``
    while it does not): a subspace that has stopped rotating for a while is the paper's sign
    that the weight itself has become low-rank.
    """
    if not state or state[STABLE_SINCE] < 0:
        return False
    return step - state[STABLE_SINCE] >= min_stable_steps


def first_check_step(config: HandoffConfig) -> int:
    """The first check step at or after ``start_step`` (and after step 0)."""
    return -(-max(config.start_step, 1) // config.check_every) * config.check_every


def is_check_step(config: HandoffConfig, step: int) -> bool:
    """Whether layers are looked at at ``step``: every ``check_every`` steps from ``start_step``
    on, or (``trigger="step"``, the one-shot cut) at the first such step only."""
    if config.trigger == "step":
        return step == first_check_step(config)
    return step >= max(config.start_step, 1) and step % config.check_every == 0
