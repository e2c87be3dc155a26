"""Build an optimizer for a model by name: the one place examples, the CLI and Trainer meet.

``lowrank_param_groups`` splits a model into the matrices GaLore projects (linear layers inside
transformer blocks, chosen by module-name patterns) and everything else (embeddings, norms, the
output head), which gets plain AdamW, following GaLore's recipe (Zhao et al., 2024).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_optim.config import HandoffConfig, ProjectionConfig, StabilityConfig
from lowrank_optim.factorize.rank_selection import dense_weight_of
from lowrank_optim.quant.quantized_linear import QuantizedLinear

__all__ = [
    "OPTIMIZER_NAMES",
    "TARGET_PRESETS",
    "OptimizerSpec",
    "build_optimizer",
    "lowrank_param_groups",
]

OPTIMIZER_NAMES = (
    "adamw",
    "adamw8bit",
    "galore_adamw",
    "galore_adamw8bit",
    "galore_adamw4bit",
    "q_galore_adamw",
    "q_galore_adamw4bit",
    "welore_adamw",
)

#: Module-name patterns: ``attn``/``mlp`` as in GaLore's scripts, ``all-linear`` as in PEFT.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": (r"attn",),
    "mlp": (r"mlp",),
    "attn-mlp": (r"attn", r"mlp"),
    "all-linear": (r".",),
}
_NEVER_PROJECTED = re.compile(r"(lm_head|embed|wte|wpe|classifier|score)")


def lowrank_param_groups(
    model: nn.Module,
    target_modules: str | Sequence[str] = "attn-mlp",
    projection: ProjectionConfig | None = None,
    weight_decay_exempt_1d: bool = False,
) -> list[dict[str, Any]]:
    """Two (or three) named param groups: projected linear weights, and the rest.

    Args:
        model: any ``nn.Module``; ``nn.Linear`` weights whose module name matches one of the
            patterns (a preset name from :data:`TARGET_PRESETS` or regular expressions) are
            projected, except output heads and embeddings.
        projection: the projected group's :class:`ProjectionConfig`.
        weight_decay_exempt_1d: put biases and norm weights in a group with no weight decay.
    """
    patterns = TARGET_PRESETS.get(target_modules) if isinstance(target_modules, str) else None
    if patterns is None:
        if isinstance(target_modules, str):
            raise ValueError(
                f"Invalid target_modules: {target_modules!r}; use one of "
                f"{', '.join(TARGET_PRESETS)} or a list of regular expressions"
            )
        patterns = tuple(target_modules)
    compiled = [re.compile(pattern) for pattern in patterns]
    projected_ids = {
        id(module.weight)
        for name, module in model.named_modules()
        if (isinstance(module, QuantizedLinear) or dense_weight_of(module) is not None)
        and not _NEVER_PROJECTED.search(name)
        and any(pattern.search(name) for pattern in compiled)
    }
    projected, dense, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in projected_ids:
            projected.append((name, param))
        elif weight_decay_exempt_1d and param.dim() < 2:
            no_decay.append((name, param))
        else:
            dense.append((name, param))
    if not projected:
        raise ValueError(
            f"No linear module (nn.Linear, transformers Conv1D, QuantizedLinear) of "
            f"{type(model).__name__} matches target_modules "
            f"{target_modules!r}"
        )
    groups: list[dict[str, Any]] = [{"params": dense}] if dense else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    groups.append({"params": projected, "projection": projection or ProjectionConfig()})
    return groups


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything :func:`build_optimizer` needs besides the model."""

    name: str = "welore_adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    target_modules: str = "attn-mlp"
    projection: ProjectionConfig = ProjectionConfig()
    stability: StabilityConfig | None = None
    handoff: HandoffConfig | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(
                f"Invalid optimizer: {self.name!r}; allowed: {', '.join(OPTIMIZER_NAMES)}"
            )


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The optimizer ``spec.name`` over ``model``'s parameters."""
    hyper = {"lr": spec.lr, "betas": spec.betas, "eps": spec.eps, "weight_decay": spec.weight_decay}
    if spec.name == "adamw":
        return torch.optim.AdamW(model.parameters(), **hyper)
    if spec.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), **hyper)
    groups = lowrank_param_groups(model, spec.target_modules, spec.projection)
    if spec.name == "galore_adamw":
        from lowrank_optim.optim import GaLoreAdamW

        return GaLoreAdamW(groups, **hyper, stability=spec.stability)
    if spec.name in ("galore_adamw8bit", "galore_adamw4bit"):
        from lowrank_optim.optim import GaLoreAdamW8bit

        bits = 4 if spec.name.endswith("4bit") else 8
        return GaLoreAdamW8bit(groups, **hyper, stability=spec.stability, moment_bits=bits)
    if spec.name in ("q_galore_adamw", "q_galore_adamw4bit"):
        from dataclasses import replace

        from lowrank_optim.optim import QGaLoreAdamW
        from lowrank_optim.quant import quantize_model

        projected = {name for name, _ in groups[-1]["params"]}
        quantize_model(model, include=lambda name: f"{name}.weight" in projected)
        groups = lowrank_param_groups(
            model, spec.target_modules, replace(spec.projection, proj_bits=4)
        )
        bits = 4 if spec.name.endswith("4bit") else 8
        return QGaLoreAdamW(
            groups, **hyper, stability=spec.stability, model=model, moment_bits=bits
        )
    if spec.name == "welore_adamw":
        from lowrank_optim.optim.welore_adamw import WeLoreAdamW

        return WeLoreAdamW(
            groups, **hyper, stability=spec.stability, handoff=spec.handoff, model=model
        )
    raise ValueError(f"Invalid optimizer: {spec.name!r}; allowed: {', '.join(OPTIMIZER_NAMES)}")
