"""Model surgery: swap dense linear layers for ``LowRankLinear`` factors, and back."""

from __future__ import annotations

from typing import Any

from torch import nn

from lowrank_optim.factorize.lowrank_linear import LowRankLinear
from lowrank_optim.factorize.rank_selection import RankPlan, dense_weight_of

__all__ = ["factorize_model", "init_lowrank_structure", "merge_model", "replace_module"]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _planned_modules(model: nn.Module, plan: RankPlan) -> list[tuple[str, nn.Module, int]]:
    modules = dict(model.named_modules())
    found = []
    for name in plan.lrc_names:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"Plan names module {name!r}, which {type(model).__name__} lacks")
        weight = dense_weight_of(module)
        if weight is None:
            raise ValueError(
                f"Plan names {name!r}, a {type(module).__name__}; only nn.Linear and Conv1D "
                "can be factorized"
            )
        expected = plan.layers[name].shape
        if tuple(weight.shape) != tuple(expected):
            raise ValueError(
                f"Plan expects {name!r} of shape {tuple(expected)}; the model's is "
                f"{tuple(weight.shape)}"
            )
        found.append((name, module, plan.rank_of(name)))
    return found


def factorize_model(
    model: nn.Module, plan: RankPlan, *, return_report: bool = False
) -> nn.Module | tuple[nn.Module, list[dict[str, Any]]]:
    """Replace every LRC of ``plan`` by its truncated-SVD factors, in place."""
    report = []
    for name, module, rank in _planned_modules(model, plan):
        factored = LowRankLinear.from_linear(module, rank)
        weight = dense_weight_of(module)
        rows, cols = weight.shape
        report.append(
            {
                "name": name,
                "shape": [rows, cols],
                "rank": rank,
                "params_before": rows * cols,
                "params_after": rank * (rows + cols),
                "relative_error": factored.relative_error(weight),
            }
        )
        replace_module(model, name, factored)
    return (model, report) if return_report else model


def init_lowrank_structure(model: nn.Module, plan: RankPlan) -> nn.Module:
    """Swap in ``LowRankLinear`` layers of the planned shapes without an SVD (for loading)."""
    for name, module, rank in _planned_modules(model, plan):
        rows, cols = dense_weight_of(module).shape
        weight = dense_weight_of(module)
        factored = LowRankLinear(
            cols, rows, rank, module.bias is not None, weight.device, weight.dtype
        )
        replace_module(model, name, factored)
    return model


def merge_model(model: nn.Module) -> nn.Module:
    """Turn every ``LowRankLinear`` back into an ``nn.Linear`` (``W = up @ down``), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            replace_module(model, name, module.to_linear())
    return model
