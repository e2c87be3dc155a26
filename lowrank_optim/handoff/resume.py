"""Re-applying a checkpoint's hand-offs before its optimizer state is loaded.

A checkpoint taken after hand-offs holds factor moments for ``LowRankLinear`` layers that a
freshly built model does not have yet. Its plan (layer name -> ``{"rank", "shape", "group"}``)
is re-applied first: each recorded layer is replaced by factors of the recorded shapes (their
values come from the model's own state dict, loaded afterwards), so the parameter layout
matches the checkpoint. Everything is checked before anything changes, and a mismatch raises
:class:`~lowrank_optim.errors.CheckpointMismatchError` saying why.

An FSDP2-sharded layer (``fully_shard``) is re-applied by
:func:`lowrank_optim.distributed.handoff.reapply_sharded_layer`: its factors join the weight's
FSDP2 group as the in-place hand-off puts them, so that ``torch.distributed.checkpoint`` loads
the sharded factors (:func:`lowrank_optim.distributed.load_sharded_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowrank_optim.errors import CheckpointMismatchError
from lowrank_optim.factorize import LowRankLinear, dense_weight_of
from lowrank_optim.handoff.candidates import HandoffCandidate, IsProjected, projected_linears
from lowrank_optim.handoff.surgery import swap_in_factors
from lowrank_optim.handoff.wrappers import is_sharded_weight, refuse_sharded_handoff

__all__ = ["check_own_handoffs", "parse_plan_entry", "reapply_plan"]


def parse_plan_entry(name: str, entry: Any) -> dict[str, Any]:
    """A checkpoint's hand-off record with ``rank``, ``shape`` and ``group`` as Python ints."""
    try:
        rank, group = int(entry["rank"]), int(entry["group"])
        shape = [int(size) for size in entry["shape"]]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointMismatchError(
            f"Checkpoint hand-off record of layer {name!r} is malformed ({entry!r}); expected "
            "rank (int), shape ([rows, cols]) and group (int)"
        ) from error
    if len(shape) != 2:
        raise CheckpointMismatchError(
            f"Checkpoint hand-off record of layer {name!r} has shape {shape}; expected [rows, cols]"
        )
    return {**entry, "rank": rank, "shape": shape, "group": group}


def check_own_handoffs(
    plan: Mapping[str, Mapping[str, Any]], saved_plan: Mapping[str, Mapping[str, Any]]
) -> None:
    """Every hand-off in ``plan`` (this optimizer's) must be in the checkpoint, at the same
    rank, shape and group: otherwise the saved factor moments have other shapes than the
    factors, or there are none for them."""
    for name, mine in plan.items():
        theirs = saved_plan.get(name)
        if theirs is None:
            raise CheckpointMismatchError(
                f"This optimizer handed off layer {name!r} (rank {mine['rank']}, shape "
                f"{mine['shape']}), but the checkpoint has it dense; a hand-off cannot be "
                "undone: load the checkpoint into a fresh model and optimizer"
            )
        differs = [
            f"{key} {theirs[key]} in the checkpoint vs {key} {mine[key]} here"
            for key in ("rank", "shape", "group")
            if theirs[key] != mine[key]
        ]
        if differs:
            raise CheckpointMismatchError(
                f"Layer {name!r} was handed off differently: {'; '.join(differs)}. Its "
                "saved factor moments do not fit this optimizer's factors: load the "
                "checkpoint into a fresh model and optimizer"
            )


def reapply_plan(
    module: nn.Module,
    pending: Mapping[str, dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    is_projected: IsProjected,
) -> dict[str, dict[str, Any]]:
    """Re-apply recorded hand-offs to ``module``: all are checked first, then all are applied.

    Returns the plan entries applied (to add to the optimizer's plan). The dense weights' state
    is dropped and the factors join their factor groups with no state, as the checkpoint's
    state for them is loaded next. FSDP2-sharded ``nn.Linear`` layers get sharded placeholder
    factors in the weight's FSDP2 group; a sharded ``Conv1D`` is refused (NotImplementedError).
    """
    modules = dict(module.named_modules())
    candidates = {c.name: c for c in projected_linears(module, optimizer, is_projected)}
    groups = optimizer.param_groups
    checked = [
        (_pending_candidate(name, entry, modules, candidates, groups), entry)
        for name, entry in pending.items()
    ]
    sharded = [c for c, _ in checked if is_sharded_weight(c.weight)]
    if sharded:
        from lowrank_optim.distributed.handoff import check_sharded_reapply, reapply_sharded_layer

        refuse_sharded_handoff(sharded, 0)
        for candidate in sharded:
            check_sharded_reapply(module, candidate)
    applied: dict[str, dict[str, Any]] = {}
    for candidate, entry in checked:
        weight = candidate.weight
        if is_sharded_weight(weight):
            reapply_sharded_layer(
                module, candidate, entry["rank"], param_groups=groups, state=optimizer.state
            )
            applied[candidate.name] = dict(entry)
            continue
        rows, cols = entry["shape"]
        factored = LowRankLinear(cols, rows, entry["rank"], False, weight.device, weight.dtype)
        optimizer.state.pop(weight, None)
        swap_in_factors(module, candidate, factored, groups)
        applied[candidate.name] = dict(entry)
    return applied


def _pending_candidate(
    name: str,
    entry: Mapping[str, Any],
    modules: Mapping[str, nn.Module],
    candidates: Mapping[str, HandoffCandidate],
    param_groups: list[dict[str, Any]],
) -> HandoffCandidate:
    """The layer a recorded hand-off applies to, or CheckpointMismatchError saying why not."""
    rank, shape, group = entry["rank"], entry["shape"], entry["group"]
    saved = (
        f"Checkpoint hands off layer {name!r} (rank {rank}, shape {shape} as out x in, "
        f"param group {group})"
    )
    layer = modules.get(name)
    if layer is None:
        raise CheckpointMismatchError(f"{saved}, but the model has no module {name!r}")
    dense = dense_weight_of(layer)
    if dense is None:
        raise CheckpointMismatchError(
            f"{saved}, but the model's {name!r} is a {type(layer).__name__}; only nn.Linear "
            "and transformers Conv1D layers are handed off"
        )
    if list(dense.shape) != shape:
        raise CheckpointMismatchError(
            f"{saved}, but the model's {name!r} has shape {list(dense.shape)}"
        )
    if not 1 <= rank <= min(shape):
        raise CheckpointMismatchError(f"{saved}: rank {rank} is not in [1, {min(shape)}]")
    if not 0 <= group < len(param_groups):
        raise CheckpointMismatchError(
            f"{saved}, but this optimizer has param groups 0..{len(param_groups) - 1}"
        )
    if param_groups[group].get("rank") is None:
        raise CheckpointMismatchError(
            f"{saved}, but this optimizer's param group {group} is not projected"
        )
    candidate = candidates.get(name)
    if candidate is None:
        raise CheckpointMismatchError(
            f"{saved}, but this optimizer cannot hand it off: its weight is not projected "
            "here, or it is tied to another module"
        )
    if candidate.group_index != group:
        raise CheckpointMismatchError(
            f"{saved}, but its weight is in param group {candidate.group_index} here"
        )
    return candidate
