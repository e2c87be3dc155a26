"""Checking and loading optimizer state dicts: refuse a mismatch before torch loads anything.

A checkpoint saved for other shapes, another ``rank``/``proj_type``/``proj_bits`` or another
moment storage would otherwise load silently and fail later (``KeyError: 'exp_avg'``) or train
on in the wrong form. The moment layout is asked of the storage; a parameter's placement says
how many moment values a checkpoint holds for it (unknown for FSDP2 shards).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from lowrank_optim.errors import CheckpointMismatchError
from lowrank_optim.functional import real_view
from lowrank_optim.moment_storage import MomentStorage
from lowrank_optim.placement import placement_for
from lowrank_optim.projection import LEFT, RIGHT, basis_keys, effective_rank, low_rank_shape
from lowrank_optim.stability import upgrade_legacy_metrics
from lowrank_optim.state_keys import basis_part

__all__ = ["STRUCTURAL_KEYS", "check_compatible", "split_fixed_dtype"]

#: Group keys that fix the shapes (or the stored form) of the state; a checkpoint must agree.
STRUCTURAL_KEYS = ("rank", "proj_type", "proj_bits")

#: The advice when a checkpoint entry does not fit its parameter: torch matches by position.
_ANOTHER_PARAMETERS_STATE = (
    "It is another parameter's state: build the param groups in the order of the run that "
    "saved it"
)

IsProjected = Callable[[dict[str, Any], torch.Tensor], bool]
NameOf = Callable[[dict[str, Any], int], str]


def split_fixed_dtype(
    saved_state: Mapping[Any, Mapping[str, Any]], fixed_dtype_keys: Collection[str]
) -> tuple[dict[Any, dict[str, torch.Tensor]], dict[Any, dict[str, Any]]]:
    """``(held, rest)``: per saved parameter, the tensors torch must not cast, and the others.

    torch casts every loaded floating tensor, and every tensor of a floating parameter, to the
    parameter's dtype. Metric histories must stay fp32 and integer or quantized state must keep
    its dtype, so those entries are held back and only moved to the parameter's device.
    """
    held: dict[Any, dict[str, torch.Tensor]] = {}
    rest: dict[Any, dict[str, Any]] = {}
    for param_id, entry in saved_state.items():
        entry = upgrade_legacy_metrics(dict(entry))
        keep = {
            key: value
            for key, value in entry.items()
            if isinstance(value, torch.Tensor)
            and (key in fixed_dtype_keys or not value.is_floating_point())
        }
        held[param_id] = keep
        rest[param_id] = {k: v for k, v in entry.items() if k not in keep}
    return held, rest


def check_compatible(
    state_dict: Mapping[str, Any],
    groups: Sequence[dict[str, Any]],
    storage: MomentStorage,
    is_projected: IsProjected,
    name_of: NameOf,
) -> None:
    """Raise :class:`CheckpointMismatchError` if ``state_dict`` does not fit ``groups``."""
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(groups):
        raise CheckpointMismatchError(
            f"Checkpoint has {len(saved_groups)} param groups; this optimizer has {len(groups)}"
        )
    saved_state = state_dict.get("state", {})
    for group_index, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        for key in STRUCTURAL_KEYS:
            if saved.get(key) != group.get(key):
                raise CheckpointMismatchError(
                    f"Checkpoint param group {group_index} was saved with {key}="
                    f"{saved.get(key)!r}; this optimizer has {key}={group.get(key)!r}"
                )
        _check_names(saved, group, group_index)
        if len(saved["params"]) != len(group["params"]):
            continue  # torch's own check reports this with its usual message
        for index, (saved_id, param) in enumerate(
            zip(saved["params"], group["params"], strict=True)
        ):
            entry = saved_state.get(saved_id)
            if entry is not None:
                _check_entry(
                    entry, group, group_index, param, storage, is_projected, name_of(group, index)
                )


def _check_names(saved: Mapping[str, Any], group: Mapping[str, Any], group_index: int) -> None:
    """Where both the checkpoint and the optimizer name a group's parameters, the names must
    agree position by position: torch matches state to parameters by position alone, so groups
    built in another order would load each parameter's state into another parameter."""
    saved_names, names = saved.get("param_names"), group.get("param_names")
    if saved_names is None or names is None or list(saved_names) == list(names):
        return
    for position, (theirs, ours) in enumerate(zip(saved_names, names, strict=False)):
        if theirs != ours:
            raise CheckpointMismatchError(
                f"Checkpoint param group {group_index} holds {theirs!r} at position "
                f"{position}; this optimizer has {ours!r} there. Its param groups list other "
                "parameters or another order: build them as the run that saved it did"
            )
    shorter = min(len(saved_names), len(names))
    extra = list(saved_names)[shorter:] or list(names)[shorter:]
    raise CheckpointMismatchError(
        f"Checkpoint param group {group_index} names {len(saved_names)} parameters; this "
        f"optimizer's names {len(names)} (only one side has {extra[0]!r})"
    )


def _check_entry(
    entry: Mapping[str, Any],
    group: dict[str, Any],
    group_index: int,
    param: torch.Tensor,
    storage: MomentStorage,
    is_projected: IsProjected,
    name: str,
) -> None:
    projected = is_projected(group, param)
    if projected:
        rank = effective_rank(group["rank"], param.shape)
        expected = low_rank_shape(group["proj_type"], param.shape, rank)
    else:
        expected = tuple(real_view(param).shape)
    numel = math.prod(expected)
    known = placement_for(param).checkpoint_numel(param, numel)
    problem = storage.layout_problem(entry, known)
    if problem is not None:
        raise CheckpointMismatchError(
            f"Checkpoint state of {name} (param group {group_index}) {problem}. It was saved by "
            "an optimizer with another moment storage (GaLoreAdamW keeps full-precision "
            "moments, GaLoreAdamW8bit and QGaLoreAdamW quantized ones); load it into the class "
            "(and moment_bits) that saved it"
        )
    if projected:
        found = storage.numel(entry)
        if found != numel:
            raise CheckpointMismatchError(
                f"Checkpoint moments of param group {group_index} have {found} elements; a "
                f"parameter of shape {tuple(param.shape)} at rank {rank} needs {expected}"
            )
        _check_bases(entry, group, group_index, param, name)
    shape = storage.moment_shape(entry)
    if known is not None and shape is not None and shape != tuple(expected):
        raise CheckpointMismatchError(
            f"Checkpoint state of {name} (param group {group_index}) holds moments of shape "
            f"{shape}; this parameter (shape {tuple(param.shape)}) needs {tuple(expected)}. "
            + _ANOTHER_PARAMETERS_STATE
        )


def _check_bases(
    entry: Mapping[str, Any],
    group: Mapping[str, Any],
    group_index: int,
    param: torch.Tensor,
    name: str,
) -> None:
    """A projected entry that holds bases must hold the ones this parameter's shape uses
    (none at all only if its first refresh failed and was skipped)."""
    def held(key: str) -> bool:
        return key in entry or basis_part(key, "codes") in entry

    wanted = basis_keys(group["proj_type"], tuple(param.shape))
    present = [key for key in (LEFT, RIGHT) if held(key)]
    if present and sorted(present) != sorted(wanted):
        raise CheckpointMismatchError(
            f"Checkpoint state of {name} (param group {group_index}) holds the "
            f"{' and '.join(present)} basis; this parameter (shape {tuple(param.shape)}, "
            f"proj_type={group['proj_type']!r}) uses {' and '.join(wanted)}. "
            + _ANOTHER_PARAMETERS_STATE
        )
