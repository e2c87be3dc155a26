"""Row-sharded DTensors: what FSDP2 hands the optimizer, and the optimizer state kept beside it.

``torch.distributed.fsdp.fully_shard`` (FSDP2) turns every parameter into a ``DTensor`` with
placement ``Shard(0)`` on a 1-D mesh: rank ``k`` of ``R`` holds rows
``[k c, min((k + 1) c, m))`` with ``c = ceil(m / R)`` (``torch.chunk``; trailing ranks may
hold fewer rows, or none). Gradients come back with the same layout after the reduce-scatter.

The optimizer steps each rank's rows with local tensors (:func:`local_view`) and keeps every
per-row entry of the state (the Adam moments, or their quantized codes) as a ``Shard(0)`` DTensor
(:func:`store_sharded`), so ``torch.distributed.checkpoint`` saves and reshards it like the
parameters. Entries that do not depend on the row (step, bases, metric histories, counters)
are plain tensors and numbers, identical on every rank; DCP saves one copy of them.

Quantized (8- or 4-bit) moments are quantized per rank in blocks of consecutive values of the
local shard, of the optimizer's :class:`~lowrank_optim.moment_storage.MomentStorage`'s
``block_size``. Codes are stored as the moment's shape with its last dimension in bytes (``(rows,
cols)`` for 8 bits, ``(rows, cols / 2)`` for 4), so they shard like the moments; the per-block
absmax (and codes whose rows do not fill whole bytes: 4-bit codes of odd rows) is padded to the
largest rank's count so that it is a regular ``Shard(0)`` tensor. The block boundaries depend on
the number of ranks, so quantized state reloads only with the same number; full-precision
moments reshard to any number (see :mod:`lowrank_optim.distributed.placement`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lowrank_optim import state_keys as keys
from lowrank_optim.moment_storage import MomentStorage

__all__ = [
    "check_row_sharded",
    "flat_code_width",
    "global_code_bytes",
    "is_sharded",
    "local_rows_of",
    "local_view",
    "rows_per_rank",
    "sharded_keys",
    "store_sharded",
]


def sharded_keys(storage: MomentStorage) -> frozenset[str]:
    """State entries holding one rank's rows (moments or their codes); the rest is replicated."""
    return storage.state_keys - {keys.MOMENT_SHAPE}


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


def local_rows_of(
    weight: torch.Tensor, rows: int | None, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, int, dist.ProcessGroup | None]:
    """``(local rows, global rows, process group)`` from a ``Shard(0)`` DTensor or local rows."""
    if isinstance(weight, DTensor):
        check_row_sharded(weight, "the weight")
        return weight.to_local().detach(), int(weight.shape[0]), weight.device_mesh.get_group()
    if rows is None:
        raise ValueError("Invalid rows: None; give the global row count with local rows")
    expected = rows_per_rank(rows, dist.get_world_size(group))[dist.get_rank(group)]
    if weight.dim() != 2 or weight.shape[0] != expected:
        raise ValueError(
            f"Invalid local rows: shape {tuple(weight.shape)}; torch.chunk sharding of {rows} rows "
            f"over {dist.get_world_size(group)} ranks gives {expected} rows here"
        )
    return weight.detach(), rows, group


def rows_per_rank(rows: int, world_size: int) -> list[int]:
    """Rows held by each rank under ``torch.chunk`` sharding (FSDP2's layout)."""
    chunk = math.ceil(rows / world_size) if rows else 0
    return [max(0, min(chunk, rows - rank * chunk)) for rank in range(world_size)]


def _codes_shape(global_shape: tuple[int, ...], bits: int) -> tuple[int, ...] | None:
    """Global shape of a moment's ``bits``-bit codes sharded by rows: the moment's shape with its
    last dimension in bytes; ``None`` when a row does not fill whole bytes (stored flat)."""
    last = global_shape[-1] if len(global_shape) > 1 else 1
    if (last * bits) % 8:
        return None
    return (*global_shape[:-1], last * bits // 8) if len(global_shape) > 1 else global_shape


def flat_code_width(storage: MomentStorage, global_shape: tuple[int, ...], world: int) -> int:
    """Bytes per rank of a quantized moment's codes stored flat (rows that do not fill whole
    bytes): the largest rank's ``code_bytes``, to which every rank's codes are padded. The
    global entry holds ``world`` times this."""
    row_numel = math.prod(global_shape[1:])
    return max(storage.code_bytes(count * row_numel)
               for count in rows_per_rank(global_shape[0], world))


def global_code_bytes(storage: MomentStorage, global_shape: tuple[int, ...], world: int) -> int:
    """Bytes of a row-sharded quantized moment's codes in the saved (global) state: the codes
    of ``global_shape`` when its rows fill whole bytes, else ``world`` padded flat shards."""
    if _codes_shape(global_shape, storage.bits) is not None:
        return storage.code_bytes(math.prod(global_shape))
    return world * flat_code_width(storage, global_shape, world)


def _flat_padded(value: torch.Tensor, width: int, mesh: DeviceMesh, world: int) -> DTensor:
    """A flat per-rank entry padded to ``width`` (the largest rank's), as a ``Shard(0)``."""
    padded = value.new_zeros(width)
    padded[: value.numel()] = value.reshape(-1)
    return DTensor.from_local(
        padded, mesh, [Shard(0)], run_check=False, shape=(width * world,), stride=(1,)
    )


def local_view(
    state: dict[str, Any], local_shape: tuple[int, int], storage: MomentStorage
) -> dict[str, Any]:
    """A copy of ``state`` whose sharded entries are this rank's local tensors.

    Full-precision moments are views of the DTensors' storage (updated in place); quantized
    codes are reshaped back to flat, the padding is dropped (sizes from ``storage``) and the
    moment shape is the local one, which is what ``storage`` expects.
    """
    view = {}
    numel = math.prod(local_shape)
    for key, value in state.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if key in storage.code_keys:
            local = local.reshape(-1)[: storage.code_bytes(numel)]
        elif key in storage.absmax_keys:
            local = local[: storage.absmax_blocks(numel)]
        view[key] = local
    if keys.MOMENT_SHAPE in state:
        view[keys.MOMENT_SHAPE] = torch.tensor(local_shape, dtype=torch.int64)
    return view


def store_sharded(
    state: dict[str, Any],
    view: dict[str, Any],
    param: DTensor,
    global_shape: tuple[int, int],
    storage: MomentStorage,
) -> None:
    """Write ``view`` back into ``state``, wrapping its per-row entries as ``Shard(0)`` DTensors.

    ``global_shape`` is the moments' logical shape (``m x r`` projected, ``m x n`` dense); the
    replicated entries (and the global moment shape of quantized state) go back as they are.
    ``storage`` (the optimizer's) gives the code bytes and absmax blocks of quantized moments.
    """
    mesh = param.device_mesh
    world = mesh.size()
    rows = rows_per_rank(global_shape[0], world)
    row_numel = math.prod(global_shape[1:])
    sharded = sharded_keys(storage)
    for key, value in view.items():
        if key == keys.MOMENT_SHAPE:
            state[key] = torch.tensor(global_shape, dtype=torch.int64)
        elif key not in sharded:
            state[key] = value
        elif key in storage.absmax_keys:
            width = max(storage.absmax_blocks(count * row_numel) for count in rows)
            state[key] = _flat_padded(value, width, mesh, world)
        else:
            shape, local = global_shape, value
            if key in storage.code_keys:
                shape = _codes_shape(global_shape, storage.bits)
                if shape is None:
                    width = flat_code_width(storage, global_shape, world)
                    state[key] = _flat_padded(value, width, mesh, world)
                    continue
                local = value.reshape(-1, *shape[1:])
            stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
            state[key] = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride
            )
    state[keys.WORLD_SIZE] = world
