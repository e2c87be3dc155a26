"""FSDP2 checkpoints with ``torch.distributed.checkpoint`` (DCP): hand-offs and what cannot fit.

**After hand-offs.** A model that handed layers off has ``LowRankLinear`` factors where a freshly
built model has dense weights, so the checkpoint's factor entries have nothing to load into.
The plan travels with the checkpoint: :func:`sharded_checkpoint_state` is the dict to save,
``{"model", "optim", "welore"}``: DCP's model and optimizer state dicts plus the optimizer's
plan and records (``WeLoreAdamW.handoff_state``) as one JSON string, because
``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups``. To resume, build the model
as before (normally, or on the meta device and ``to_empty``), ``fully_shard`` it the same way
and build the optimizer on it; then :func:`load_sharded_checkpoint` reads the plan first,
re-applies it (``WeLoreAdamW.load_handoff_state``: the same factorized layers in the same
FSDP2 groups, with placeholder values), and then loads model and optimizer state, bit for bit.
Optimizers without hand-offs save and load the same way, without the ``"welore"`` entry.

Full-precision moments load on any number of ranks (DCP reshards their rows). Quantized
moments do not: their blocks and absmax values follow the shards they were saved from. Where
the padded absmax of an uneven shard changes its global size with the number of ranks (5 rows
on 2 ranks: 3 + 2), ``dcp.load`` itself fails with a size mismatch of an absmax entry, before
the optimizer's own check (:class:`~lowrank_optim.distributed.placement.RowShardedPlacement`,
at the first step) could name the cause. :func:`load_sharded_state` reads the number of ranks
each quantized entry was saved on first, and raises
:class:`~lowrank_optim.errors.CheckpointMismatchError` before anything is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from lowrank_optim import state_keys as keys
from lowrank_optim.errors import CheckpointMismatchError
from lowrank_optim.moment_storage import EXP_AVG_CODES

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "HANDOFF_ENTRY",
    "load_sharded_checkpoint",
    "load_sharded_state",
    "sharded_checkpoint_state",
    "world_size_mismatch",
]

#: Key of the hand-off plan (a JSON string) in :func:`sharded_checkpoint_state`.
HANDOFF_ENTRY = "welore"


def world_size_mismatch(name: str, saved: int, world: int) -> CheckpointMismatchError:
    """The refusal of quantized moments of ``name`` saved on ``saved`` ranks, loaded on
    ``world`` (one wording for the load and for the step)."""
    return CheckpointMismatchError(
        f"Quantized moments of {name} were saved on {saved} ranks and this run has {world}: "
        "their quantization blocks follow the shards, so they load only on the same number of "
        "ranks (full-precision moments load on any number)"
    )


def _quantized_entries(
    tree: Mapping[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], int]]:
    """``(path, world size)`` of every state entry in ``tree`` that holds quantized moments
    laid out for FSDP2 shards (it has codes and records the number of ranks)."""
    if keys.WORLD_SIZE in tree and EXP_AVG_CODES in tree:
        yield path, int(tree[keys.WORLD_SIZE])
        return
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _quantized_entries(value, (*path, str(key)))


def _nest(paths: list[tuple[str, ...]], leaf: str, value: int) -> dict[str, Any]:
    """A nested dict holding ``value`` under ``(*path, leaf)`` for every path."""
    root: dict[str, Any] = {}
    for path in paths:
        node = root
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return root


def _parameter_name(path: tuple[str, ...]) -> str:
    """The parameter's name in a DCP path (what follows ``state``: ``optim.state.out.weight``
    names ``out.weight``)."""
    if "state" in path:
        path = path[len(path) - path[::-1].index("state") :]
    return ".".join(path)


def load_sharded_state(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    **load_options: Any,
) -> None:
    """``torch.distributed.checkpoint.load(state_dict, ...)`` after checking that every
    quantized optimizer state in it was saved on this number of ranks.

    Use it in place of ``dcp.load`` on the dict from ``get_optimizer_state_dict`` (or one
    holding it, e.g. ``{"model": ..., "optim": ...}``); ``load_options`` (``storage_reader``,
    ``planner``, ``process_group``, ...) go to ``dcp.load``. Like ``dcp.load`` it is a
    collective: every rank calls it. Raises :class:`CheckpointMismatchError` naming the first
    parameter whose quantized moments were saved on another number of ranks, before anything
    is loaded; full-precision state loads on any number of ranks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    entries = list(_quantized_entries(state_dict))
    if entries:
        # Read only the recorded world sizes (small pickled ints): a partial load, so state
        # the checkpoint lacks (another storage) is left to the optimizer's own checks.
        probe = _nest([path for path, _ in entries], keys.WORLD_SIZE, -1)
        probe_options = {k: v for k, v in load_options.items() if k != "planner"}
        dcp.load(
            probe,
            checkpoint_id=checkpoint_id,
            planner=DefaultLoadPlanner(allow_partial_load=True),
            **probe_options,
        )
        for path, world in entries:
            node: Any = probe
            for key in path:
                node = node[key]
            saved = int(node[keys.WORLD_SIZE])
            if saved not in (-1, world):  # -1: not in the checkpoint (not saved quantized)
                raise world_size_mismatch(_parameter_name(path), saved, world)
    dcp.load(state_dict, checkpoint_id=checkpoint_id, **load_options)


#: Per-parameter numbers a hand-off gives a factor's state. ``get_optimizer_state_dict`` of a
#: freshly built optimizer has no such entries, and ``dcp.load`` fills only the entries of the
#: dict it is given, so each one the checkpoint holds gets a placeholder first.
_HANDOFF_SCALARS = {keys.HANDOFF_STEP: -1, keys.LR_MULTIPLIER: -1.0}


def _add_saved_scalars(
    optim: dict[str, Any],
    checkpoint_id: str | os.PathLike[str] | None,
    load_options: Mapping[str, Any],
) -> None:
    """Give ``optim["state"]`` (a fresh ``get_optimizer_state_dict``) a placeholder for each
    hand-off number (:data:`_HANDOFF_SCALARS`) the checkpoint saved, so that the load restores
    it: one partial load of those small pickles finds which ones exist."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    missing = {
        name: {key: value for key, value in _HANDOFF_SCALARS.items() if key not in entry}
        for name, entry in optim.get("state", {}).items()
    }
    probe = {"optim": {"state": {name: dict(v) for name, v in missing.items() if v}}}
    if not probe["optim"]["state"]:
        return
    options = {k: v for k, v in load_options.items() if k != "planner"}
    dcp.load(
        probe,
        checkpoint_id=checkpoint_id,
        planner=DefaultLoadPlanner(allow_partial_load=True),
        **options,
    )
    for name, found in probe["optim"]["state"].items():
        for key, value in found.items():
            if value != _HANDOFF_SCALARS[key]:  # still the sentinel: not in the checkpoint
                optim["state"][name][key] = value


def _handoff_json(optimizer: Any) -> str | None:
    """The optimizer's hand-off plan and records as JSON (None for optimizers without)."""
    if not hasattr(optimizer, "handoff_state"):
        return None
    saved = optimizer.handoff_state()
    if saved.get("tapering"):
        raise NotImplementedError(
            f"Layers {', '.join(saved['tapering'])} are being tapered: tapering is not "
            "supported on FSDP2-sharded parameters, so their state has no sharded checkpoint"
        )
    return json.dumps(saved)


def sharded_checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, **extra: Any
) -> dict[str, Any]:
    """What a DCP checkpoint of an FSDP2 run holds: ``{"model", "optim", "welore", **extra}``.

    ``model`` and ``optim`` are ``get_model_state_dict`` and ``get_optimizer_state_dict``;
    ``welore`` is the optimizer's hand-off plan and records as one JSON string (only for an
    optimizer that hands off, one with ``handoff_state``); ``extra`` (a schedule, the data
    position) is saved as given. Pass it to ``dcp.save``; :func:`load_sharded_checkpoint` loads
    it back.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    state["optim"] = get_optimizer_state_dict(model, optimizer)
    plan = _handoff_json(optimizer)
    if plan is not None:
        state[HANDOFF_ENTRY] = plan
    return {**state, **extra}


def load_sharded_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    **load_options: Any,
) -> dict[str, Any]:
    """Load a :func:`sharded_checkpoint_state` checkpoint into ``model`` and ``optimizer``:
    the plan's hand-offs are re-applied first, then model and optimizer state are loaded.

    ``model`` is built and ``fully_shard`` -ed as the saved one was, with ``optimizer`` built
    on it (a ``WeLoreAdamW`` with ``model=``); its layers are still dense. Its hand-offs are
    re-applied from the checkpoint's ``"welore"`` entry (``optimizer.load_handoff_state``), so
    the parameters are the saved ones; then :func:`load_sharded_state` loads everything (a
    collective: every rank calls it), and ``set_model_state_dict`` and
    ``optimizer.load_state_dict`` put it in place. ``extra`` is the rest of the saved dict
    (schedule, data position: state dicts to load into); the loaded dict is returned, so
    ``result["scheduler"]`` is the saved schedule. Full-precision state loads on any number of
    ranks; quantized moments on the saved number only
    (:class:`~lowrank_optim.errors.CheckpointMismatchError`).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if hasattr(optimizer, "load_handoff_state"):
        # The plan first (one small string, a partial load): it decides the parameters.
        probe: dict[str, Any] = {HANDOFF_ENTRY: ""}
        probe_options = {k: v for k, v in load_options.items() if k != "planner"}
        dcp.load(
            probe,
            checkpoint_id=checkpoint_id,
            planner=DefaultLoadPlanner(allow_partial_load=True),
            **probe_options,
        )
        if probe[HANDOFF_ENTRY]:  # absent: saved without hand-off state (nothing handed off)
            optimizer.load_handoff_state(json.loads(probe[HANDOFF_ENTRY]))
    state = sharded_checkpoint_state(model, optimizer, **dict(extra or {}))
    state.pop(HANDOFF_ENTRY, None)  # restored above
    names = [list(group["params"]) for group in state["optim"]["param_groups"]]
    _add_saved_scalars(state["optim"], checkpoint_id, load_options)
    load_sharded_state(state, checkpoint_id=checkpoint_id, **load_options)
    set_model_state_dict(model, state["model"])
    optimizer.load_state_dict(_by_position(state["optim"], names))
    return state


def _by_position(loaded: Mapping[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """The loaded DCP optimizer state (keyed by parameter names) keyed by position, as
    ``optimizer.load_state_dict`` takes it, after checking that the saved param groups hold the
    parameters of this optimizer's (``names``), in the same order.

    ``set_optimizer_state_dict`` matches groups by their parameters instead, which cannot tell
    empty groups apart (a factor group before its first hand-off, a projected group after its
    last): it refuses more than one and may give one the hyper-parameters of another.
    """
    saved = loaded["param_groups"]
    if len(saved) != len(names):
        raise CheckpointMismatchError(
            f"The checkpoint has {len(saved)} param groups and this optimizer {len(names)}"
        )
    groups, index = [], 0
    positions: dict[str, int] = {}
    for number, (group, mine) in enumerate(zip(saved, names, strict=True)):
        if list(group["params"]) != mine:
            raise CheckpointMismatchError(
                f"Param group {number} holds {list(group['params'])[:4]}... in the checkpoint "
                f"and {mine[:4]}... here: build the model, its sharding and the optimizer as "
                "for the saved run"
            )
        positions.update((name, index + offset) for offset, name in enumerate(mine))
        groups.append({**group, "params": list(range(index, index + len(mine)))})
        index += len(mine)
    state = {positions[name]: value for name, value in loaded["state"].items()}
    return {"state": state, "param_groups": groups}
