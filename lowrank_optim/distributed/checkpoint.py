"""Loading FSDP2 checkpoints with ``torch.distributed.checkpoint``, refusing what cannot fit.

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

import os
from collections.abc import Iterator, Mapping
from typing import Any

from lowrank_optim import state_keys as keys
from lowrank_optim.errors import CheckpointMismatchError
from lowrank_optim.moment_storage import EXP_AVG_CODES

__all__ = ["load_sharded_state", "world_size_mismatch"]


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
