"""QGaLoreAdamW: 8-bit moments, 4-bit projections, INT8 weights with stochastic rounding.

Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients", 2024. On top of :class:`GaLoreAdamW8bit`:

* projection bases stored in 4 bits (``proj_bits=4`` by default; 8 also available), group-wise
  with a float offset and two codes per byte (:mod:`lowrank_optim.basis_storage`);
* weights of projected linear layers stored as INT8 (:class:`QuantizedLinear`, made by
  :func:`lowrank_optim.quant.quantize_model`); the update is added in fp32 and the weight is
  re-quantized with stochastic rounding, ``W <- SR(W + dW)``, so ``E[W_new] = W + dW`` and
  updates smaller than one quantization step survive in expectation;
* Q-GaLore's lazy layer-adaptive refresh (``StabilityConfig(policy="qgalore")``) by default;
  the overlap-based policy is available as well.

The stochastic rounding draws from the optimizer's own generator, whose state is part of
``state_dict()``, so a resumed run rounds exactly as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lowrank_optim.config import ProjectionConfig, StabilityConfig
from lowrank_optim.optim.galore_adamw8bit import GaLoreAdamW8bit
from lowrank_optim.projection import project_back_
from lowrank_optim.quant import QuantizedLinear, quantized_linear_owners

__all__ = ["QGaLoreAdamW"]

_CHECKPOINT_KEY = "qgalore"


class QGaLoreAdamW(GaLoreAdamW8bit):
    """GaLoreAdamW8bit with INT4 bases, INT8 weights and Q-GaLore's adaptive refresh.

    Args:
        params, lr, betas, eps, weight_decay, on_bad_gradient: as :class:`GaLoreAdamW`.
        projection: defaults for projected groups; ``proj_bits`` defaults to 4 here.
        stability: defaults to ``StabilityConfig(policy="qgalore")``.
        model: the model whose ``QuantizedLinear`` layers hold INT8 weights (after
            ``quantize_model(model)``); their weight handles must be in projected groups.
            Without it, weights are updated in full precision like GaLoreAdamW8bit.
        seed: seed of the stochastic-rounding generator.
        quant_backend, moment_bits: how the moments are stored (as :class:`GaLoreAdamW8bit`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *args: Any,
        projection: ProjectionConfig | None = None,
        stability: StabilityConfig | None = None,
        model: nn.Module | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            *args,
            projection=projection or ProjectionConfig(proj_bits=4),
            stability=stability or StabilityConfig(policy="qgalore"),
            **kwargs,
        )
        self.model = model
        self.owners: dict[nn.Parameter, QuantizedLinear] = (
            quantized_linear_owners(model) if model is not None else {}
        )
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param in self.owners and not self.is_projected(group, param):
                    raise ValueError(
                        "A QuantizedLinear weight is in a param group without `rank`; INT8 "
                        "weights are updated only through the projected path. Put it in a "
                        "projected group (lowrank_param_groups does)."
                    )

    def rounding_generator(self, device: torch.device) -> torch.Generator:
        """The stochastic-rounding generator of ``device`` (created on first use)."""
        key = str(device)
        if key not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[key] = generator
        return self._generators[key]

    def updates_int8_weight(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is a ``QuantizedLinear``'s INT8 weight this optimizer updates."""
        return param in self.owners

    def _apply_projected_update(
        self,
        param: torch.Tensor,
        direction: torch.Tensor,
        bases: dict[str, torch.Tensor],
        alpha: float,
        decay: float,
    ) -> None:
        owner = self.owners.get(param)
        if owner is None:
            super()._apply_projected_update(param, direction, bases, alpha, decay)
            return
        weight = owner.dequantized_weight(torch.float32)
        # dW = (decay - 1) W + alpha back(d): decoupled decay and the projected-back step.
        update = weight.mul(decay - 1.0)
        wide = {key: basis.float() for key, basis in bases.items()}
        project_back_(update, direction.float(), wide, alpha)
        owner.apply_update_(update, self.rounding_generator(weight.device))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[_CHECKPOINT_KEY] = {
            "generators": {key: g.get_state() for key, g in self._generators.items()}
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get(_CHECKPOINT_KEY, {"generators": {}})
        for key, generator_state in saved["generators"].items():
            self.rounding_generator(torch.device(key)).set_state(generator_state)
