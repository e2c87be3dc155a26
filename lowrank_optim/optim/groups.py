"""Param groups of the GaLore family: expanding config objects, validating, refusing.

A group is projected when it sets ``rank`` (galore-torch's convention, with
``update_proj_gap``, ``scale`` and ``proj_type``) or holds a ``projection`` entry; every value
is validated up front, as ``torch.optim`` does, with errors that name the value and the range.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from lowrank_optim.config import (
    ProjectionConfig,
    StabilityConfig,
    validate_adam_hyperparameters,
    validate_on_bad_gradient,
)

__all__ = [
    "TORCH_ADAMW_OPTIONS",
    "check_projected_params",
    "expand_group",
    "refuse_unimplemented_options",
    "validate_group",
    "validate_step_hyperparameters",
]


def expand_group(param_group: dict[str, Any], default: ProjectionConfig) -> dict[str, Any]:
    """The group with its ``projection`` (``True``: ``default``) and ``stability`` config
    objects expanded into group keys; keys the group sets itself win over the projection's."""
    group = dict(param_group)
    projection = group.pop("projection", None)
    if projection is True:
        projection = default
    if isinstance(projection, ProjectionConfig):
        group = {**projection.to_group(), **group}
    elif projection not in (None, False):
        raise ValueError(
            f"Invalid projection: {projection!r}; expected a ProjectionConfig, True or None"
        )
    stability = group.pop("stability", None)
    if isinstance(stability, StabilityConfig):
        group.update(stability.to_group())
    elif stability is not None:
        raise ValueError(f"Invalid stability: {stability!r}; expected a StabilityConfig")
    return group


#: ``torch.optim.AdamW`` options this family does not implement, with the value that means
#: what it does. A group that sets one otherwise is refused: torch keeps any key a group sets
#: (``"name"``, say), so without this ``maximize=True`` would be kept and silently ignored.
TORCH_ADAMW_OPTIONS: dict[str, object] = {
    "maximize": False,
    "amsgrad": False,
    "capturable": False,
    "differentiable": False,
    "foreach": None,
    "fused": None,
    "decoupled_weight_decay": True,
}


def refuse_unimplemented_options(group: dict[str, Any]) -> None:
    """Raise if ``group`` asks for a ``torch.optim.AdamW`` option this family does not have."""
    for key, implemented in TORCH_ADAMW_OPTIONS.items():
        if key in group and group[key] != implemented:
            raise ValueError(
                f"Invalid param group option {key}={group[key]!r}: the GaLore family does not "
                f"implement torch.optim.AdamW's {key!r} (it behaves as {key}={implemented!r}); "
                f"remove the key. Options it does not implement: {', '.join(TORCH_ADAMW_OPTIONS)}"
            )


def validate_group(group: dict[str, Any]) -> None:
    """Check every hyper-parameter of a complete group (defaults filled in)."""
    refuse_unimplemented_options(group)
    validate_adam_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    validate_on_bad_gradient(group["on_bad_gradient"])
    StabilityConfig.from_group(group)
    if group.get("rank") is not None:
        ProjectionConfig.from_group(group)


def validate_step_hyperparameters(groups: Sequence[dict[str, Any]]) -> None:
    """Re-check lr, betas, eps and weight decay before a step updates anything.

    A scheduler or user code may have set a tensor, a string or NaN since construction, and
    ``float(group["lr"])`` would silently accept a string or a 1-element tensor.
    """
    for group in groups:
        validate_adam_hyperparameters(
            group["lr"], group["betas"], group["eps"], group["weight_decay"]
        )


def check_projected_params(
    group: dict[str, Any], name_of: Callable[[dict[str, Any], int], str]
) -> None:
    """Refuse complex projected parameters; warn once per layer about a clipped rank.

    GaLore's bases are real singular vectors of a real gradient: a complex matrix would need
    a complex SVD and conjugate projections, so it is refused here rather than stepped
    wrongly (complex parameters outside projected groups get AdamW on their real view, as
    in ``torch.optim.AdamW``). A rank above ``min(m, n)`` is clipped to it, which leaves
    low-rank moments the size of a full side of the matrix plus an ``m x m`` (or ``n x n``)
    basis: at least as much state as AdamW's.
    """
    if group.get("rank") is None:
        return
    rank = group["rank"]
    for index, param in enumerate(group["params"]):
        if param.dim() != 2:
            continue
        name = name_of(group, index)
        if param.is_complex():
            raise ValueError(
                f"Invalid parameter {name}: complex dtype {param.dtype} in a projected group "
                f"(rank={rank}); GaLore projection supports real parameters only. Put it in "
                "a group without `rank` (stepped as AdamW on its real view, as "
                "torch.optim.AdamW does) or train its real and imaginary parts as real tensors"
            )
        size = min(param.shape)
        if rank > size:
            warnings.warn(
                f"rank={rank} exceeds the size of {name} (shape {tuple(param.shape)}); it is "
                f"clipped to {size}, so its optimizer state is at least as large as AdamW's "
                "(moments of a full side plus the basis). Lower the rank or leave this "
                "parameter unprojected",
                UserWarning,
                stacklevel=5,  # the line that built the optimizer
            )
