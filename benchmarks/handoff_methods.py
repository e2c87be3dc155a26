"""The hand-off study's methods that are not a plain ``lowrank-optim pretrain`` run.

* :class:`CuttlefishAdamW`: Cuttlefish's switch (Wang et al., MLSys 2023) on the hand-off
  machinery. Its signal is each layer's weight stable rank ``||W||_F^2 / ||W||_2^2``, taken at
  every check step; a layer counts as settled when the mean relative change of its stable rank
  over the last ``window`` checks is at most ``tolerance``, and, as in Cuttlefish, all layers
  switch together once every layer has settled. Cuttlefish's rank for a layer is
  ``stable_rank x full_rank / stable_rank_at_init``; here those ranks are scaled by one common
  factor so that the same share of the total rank is removed as WeLore's target, which puts
  the method at the same parameter budget as the others.
* :func:`factorized_from_scratch`: the projected linears replaced by randomly initialised
  ``LowRankLinear`` factors at given ranks, trained with AdamW from step 0.
* :func:`post_hoc`: a dense model compressed by WeLore's data-free rank selection to a given
  parameter count, evaluated as is and after fine-tuning only its factors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lowrank_optim.factorize import LowRankLinear, factorize_model, plan_ranks, replace_module
from lowrank_optim.handoff import HandoffCandidate
from lowrank_optim.optim.welore_adamw import WeLoreAdamW

__all__ = [
    "CuttlefishAdamW",
    "factorized_from_scratch",
    "match_parameters",
    "post_hoc",
    "projected_linear_names",
    "stable_rank",
]


def stable_rank(weight: torch.Tensor) -> float:
    """``||W||_F^2 / ||W||_2^2``: how many directions carry the weight's energy."""
    values = torch.linalg.svdvals(weight.detach().float())
    return float(values.square().sum() / values[0].square())


class CuttlefishAdamW(WeLoreAdamW):
    """WeLoreAdamW whose hand-off timing and ranks follow Cuttlefish (see the module docstring).

    ``earliest`` is the first step at which the switch may happen and ``latest`` the step by
    which it happens even if some stable rank still moves (the other methods' window: without
    a deadline Cuttlefish may never switch in a short run, and would not be at the budget). The
    stable-rank history is recorded from the first check step on, so the ``handoff`` config's
    ``start_step`` must be at most ``check_every``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        earliest: int,
        latest: int,
        window: int = 3,
        tolerance: float = 0.02,
        **options: Any,
    ) -> None:
        super().__init__(params, **options)
        self.earliest, self.latest = earliest, latest
        self.window, self.tolerance = window, tolerance
        self.history: dict[str, list[float]] = {}
        self.switched_at: int | None = None
        names = projected_linear_names(self.model, self)
        modules = dict(self.model.named_modules())
        self.initial = {name: stable_rank(modules[name].weight) for name in names}

    def _settled(self, name: str) -> bool:
        values = self.history[name][-(self.window + 1) :]
        if len(values) <= self.window:
            return False
        changes = [abs(b - a) / a for a, b in zip(values, values[1:], strict=False)]
        return sum(changes) / len(changes) <= self.tolerance

    def ready_layers(self, candidates: list[HandoffCandidate], step: int) -> list[HandoffCandidate]:
        # WeLoreAdamW also asks about frozen layers (an empty list here): no switch on those.
        if self.switched_at is not None or not candidates:
            return []
        for candidate in candidates:
            value = stable_rank(candidate.module.weight)
            self.history.setdefault(candidate.name, []).append(value)
        settled = all(self._settled(c.name) for c in candidates)
        if step < self.earliest or not (settled or step >= self.latest):
            return []
        self.switched_at = step
        return list(candidates)

    def layer_ranks(self, candidates: list[HandoffCandidate]) -> dict[str, int]:
        full = {c.name: min(c.module.weight.shape) for c in candidates}
        # Cuttlefish's rank: the stable rank, rescaled by full rank / stable rank at init.
        raw = {
            name: min(full[name], self.history[name][-1] * full[name] / self.initial[name])
            for name in full
        }
        budget = (1.0 - self.handoff_config.target_reduction) * sum(full.values())
        low, high = 0.0, max(full.values()) / min(raw.values())
        for _ in range(60):  # bisect the common factor that meets the rank budget
            middle = (low + high) / 2
            kept = sum(min(full[name], middle * value) for name, value in raw.items())
            low, high = (middle, high) if kept < budget else (low, middle)
        return {
            name: max(1, min(full[name], round(low * value))) for name, value in raw.items()
        }


def projected_linear_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the ``nn.Linear`` modules whose weight sits in a projected (``rank``) group."""
    projected = {
        id(param)
        for group in optimizer.param_groups
        if group.get("rank") is not None
        for param in group["params"]
    }
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module.weight) in projected
    ]


def factorized_from_scratch(
    model: nn.Module, ranks: dict[str, int], spectral: bool = False
) -> None:
    """Replace the named linears by factors of the given ranks, in place.

    ``spectral=False``: both factors randomly initialised (Kaiming uniform). ``spectral=True``:
    spectral, balanced initialisation (Khodak et al., ICLR 2021): the factors are the rank-``k``
    truncated SVD of the dense layer's own random initial weight, ``U_k S_k^(1/2)`` and
    ``S_k^(1/2) V_k^T``, so the factorized network starts as close to the dense one as rank
    ``k`` allows and both factors carry the same scale.
    """
    for name, rank in ranks.items():
        linear = model.get_submodule(name)
        if spectral:
            factored = LowRankLinear.from_weight(linear.weight, linear.bias, rank)
        else:
            factored = LowRankLinear(
                linear.in_features,
                linear.out_features,
                rank,
                linear.bias is not None,
                linear.weight.device,
                linear.weight.dtype,
            )
        replace_module(model, name, factored)


def match_parameters(
    spectra: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    parameters: int,
    min_ratio: float,
) -> Any:
    """WeLore's plan whose factorized model has the parameter count closest to ``parameters``."""
    low, high, best = 0.01, 0.99, None
    for _ in range(40):
        middle = (low + high) / 2
        plan = plan_ranks(spectra, shapes, middle, min_ratio)
        if best is None or abs(plan.parameters_after() - parameters) < abs(
            best.parameters_after() - parameters
        ):
            best = plan
        low, high = (middle, high) if plan.parameters_after() > parameters else (low, middle)
    return best


def post_hoc(
    model: nn.Module,
    names: list[str],
    parameters: int,
    min_ratio: float,
) -> tuple[nn.Module, list[dict[str, Any]], Any]:
    """Compress ``model``'s ``names`` linears in place to about ``parameters`` parameters."""
    modules = dict(model.named_modules())
    spectra = {name: torch.linalg.svdvals(modules[name].weight.detach().float()) for name in names}
    shapes = {name: tuple(modules[name].weight.shape) for name in names}
    plan = match_parameters(spectra, shapes, parameters, min_ratio)
    model, report = factorize_model(model, plan, return_report=True)
    return model, report, plan


def scaled_plan(raw: dict[str, float], shapes: dict[str, tuple[int, int]], parameters: int) -> Any:
    """Every matrix factorized at ``c x raw[name]`` (capped at full rank), ``c`` bisected so that
    the factors hold about ``parameters`` parameters: an allocation proportional to ``raw``."""
    from lowrank_optim.factorize import LayerRank, RankPlan

    def ranks(factor: float) -> dict[str, int]:
        return {n: min(min(shapes[n]), max(1, round(factor * v))) for n, v in raw.items()}

    low, high = 0.0, 1e4
    for _ in range(60):
        middle = (low + high) / 2
        used = sum(k * sum(shapes[n]) for n, k in ranks(middle).items())
        low, high = (middle, high) if used < parameters else (low, middle)
    return RankPlan({n: LayerRank(k, shapes[n], True) for n, k in ranks(low).items()})
