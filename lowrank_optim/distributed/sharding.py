"""Row-sharded DTensors: what FSDP2 hands the optimizer, and the optimizer state kept beside it.

``torch.distributed.fsdp.fully_shard`` (FSDP2) turns every parameter into a ``DTensor`` with
placement ``Shard(0)`` on a 1-D mesh: rank ``k`` of ``R`` holds rows
``[k c, min((k + 1) c, m))`` with ``c = ceil(m / R)`` (``torch.chunk``; trailing ranks may
hold fewer rows, or none). Gradients come back with the same layout after the reduce-scatter.

The optimizer steps each rank's rows with local tensors (:func:`local_view`) and keeps every
per-row entry of the state (the Adam moments, or their 8-bit codes) as a ``Shard(0)`` DTensor
(:func:`store_sharded`), so ``torch.distributed.checkpoint`` saves and reshards it like the
parameters. Entries that do not depend on the row (step, bases, metric histories, counters)
are plain tensors and numbers, identical on every rank; DCP saves one copy of them.

8-bit moments are quantized per rank in blocks of 256 consecutive values of the local shard.
Codes are stored as ``(rows, cols)`` (so they shard like the moments); the per-block absmax is
padded to the largest rank's block count so that it is a regular ``Shard(0)`` tensor. The block
boundaries depend on the number of ranks, so 8-bit state reloads only with the same number;
full-precision moments reshard to any number (see :mod:`lowrank_optim.distributed.fsdp`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from lowrank_optim import state_keys as keys
from lowrank_optim.moment_storage import (
    EXP_AVG_ABSMAX,
    EXP_AVG_CODES,
    EXP_AVG_SQ_ABSMAX,
    EXP_AVG_SQ_CODES,
    MOMENT_SHAPE,
    MomentStorage,
)

__all__ = [
    "SHARDED_KEYS",
    "WORLD_SIZE_KEY",
    "check_row_sharded",
    "init_local_moments",
    "is_sharded",
    "local_view",
    "rows_per_rank",
    "store_sharded",
]

#: State entries holding one rank's rows (or their codes); everything else is replicated.
SHARDED_KEYS = frozenset(
    {
        keys.EXP_AVG,
        keys.EXP_AVG_SQ,
        EXP_AVG_CODES,
        EXP_AVG_SQ_CODES,
        EXP_AVG_ABSMAX,
        EXP_AVG_SQ_ABSMAX,
    }
)
_ABSMAX_KEYS = frozenset({EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX})
_CODE_KEYS = frozenset({EXP_AVG_CODES, EXP_AVG_SQ_CODES})
#: Replicated int: the number of ranks the sharded state was laid out for.
WORLD_SIZE_KEY = "fsdp_world_size"


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def check_row_sharded(param: DTensor, name: str) -> None:
    """Refuse any layout but FSDP2's ``Shard(0)`` on a 1-D mesh, naming what was found."""
    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"Invalid DTensor placement for {name}: {placements} on a {param.device_mesh.ndim}-D "
            "mesh; GaLore-family optimizers support parameters sharded on dim 0 on a 1-D mesh, "
            "(Shard(0),), as torch.distributed.fsdp.fully_shard makes them (no HSDP, no tensor "
            "parallelism)"
        )
    expected = rows_per_rank(param.shape[0], param.device_mesh.size())[
        param.device_mesh.get_local_rank()
    ]
    if param.to_local().shape[0] != expected:
        raise ValueError(
            f"Invalid shard of {name}: {param.to_local().shape[0]} local rows; torch.chunk "
            f"sharding of {param.shape[0]} rows over {param.device_mesh.size()} ranks gives "
            f"{expected} here"
        )


def rows_per_rank(rows: int, world_size: int) -> list[int]:
    """Rows held by each rank under ``torch.chunk`` sharding (FSDP2's layout)."""
    chunk = math.ceil(rows / world_size) if rows else 0
    return [max(0, min(chunk, rows - rank * chunk)) for rank in range(world_size)]


def _blocks(numel: int) -> int:
    from lowrank_optim.quant import BLOCKSIZE

    return math.ceil(numel / BLOCKSIZE)


def local_view(state: dict[str, Any], local_shape: tuple[int, int]) -> dict[str, Any]:
    """A copy of ``state`` whose sharded entries are this rank's local tensors.

    Full-precision moments are views of the DTensors' storage (updated in place); 8-bit codes
    are reshaped back to flat, the absmax padding is dropped and the moment shape is the local
    one, which is what :class:`~lowrank_optim.moment_storage.MomentStorage` expects.
    """
    view = {}
    numel = math.prod(local_shape)
    for key, value in state.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if key in _CODE_KEYS:
            local = local.reshape(-1)
        elif key in _ABSMAX_KEYS:
            local = local[: _blocks(numel)]
        view[key] = local
    if MOMENT_SHAPE in state:
        view[MOMENT_SHAPE] = torch.tensor(local_shape, dtype=torch.int64)
    return view


def store_sharded(
    state: dict[str, Any],
    view: dict[str, Any],
    param: DTensor,
    global_shape: tuple[int, int],
) -> None:
    """Write ``view`` back into ``state``, wrapping its per-row entries as ``Shard(0)`` DTensors.

    ``global_shape`` is the moments' logical shape (``m x r`` projected, ``m x n`` dense); the
    replicated entries (and the global moment shape of 8-bit state) go back as they are.
    """
    mesh = param.device_mesh
    world = mesh.size()
    rows = rows_per_rank(global_shape[0], world)
    cols = global_shape[1] if len(global_shape) > 1 else 1
    for key, value in view.items():
        if key == MOMENT_SHAPE:
            state[key] = torch.tensor(global_shape, dtype=torch.int64)
        elif key not in SHARDED_KEYS:
            state[key] = value
        elif key in _ABSMAX_KEYS:
            width = max(_blocks(count * cols) for count in rows)
            padded = value.new_zeros(width)
            padded[: value.numel()] = value
            state[key] = DTensor.from_local(
                padded, mesh, [Shard(0)], run_check=False, shape=(width * world,), stride=(1,)
            )
        else:
            local = value.reshape(-1, *global_shape[1:]) if key in _CODE_KEYS else value
            stride = tuple(math.prod(global_shape[i + 1 :]) for i in range(len(global_shape)))
            state[key] = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=global_shape, stride=stride
            )
    state[WORLD_SIZE_KEY] = world


def init_local_moments(
    storage: MomentStorage,
    view: dict[str, Any],
    local_shape: tuple[int, int],
    global_numel: int,
    like: torch.Tensor,
) -> None:
    """Zero moments for this rank's rows, quantized or not as the *whole* tensor would be.

    The 8-bit storage keeps tensors under 4096 elements in full precision; deciding that on the
    global size keeps the same state keys on every rank (a shard can be small when the tensor
    is not), which DCP needs.
    """
    storage.init(view, local_shape, like)
    min_numel = getattr(storage, "min_numel", None)
    if min_numel is None or keys.EXP_AVG not in view or global_numel < min_numel:
        return
    del view[keys.EXP_AVG], view[keys.EXP_AVG_SQ]
    view[MOMENT_SHAPE] = torch.tensor(local_shape, dtype=torch.int64)
    zeros = torch.zeros(local_shape, dtype=torch.float32, device=like.device)
    storage.write(view, zeros, zeros)
