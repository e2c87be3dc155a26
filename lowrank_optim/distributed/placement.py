"""The FSDP2 placement: GaLore-family steps on ``DTensor`` parameters sharded ``Shard(0)``.

The optimizer picks :data:`ROW_SHARDED` for every ``DTensor`` parameter
(:func:`lowrank_optim.placement.placement_for`) and runs the step math of
:mod:`lowrank_optim.functional` on the local views this placement gives. For a weight ``W``
(``m x n``) whose rows are split over
``R`` ranks (rank ``k`` holds ``W_k``, ``G_k``), with the replicated right basis ``Q``
(``n x r``, Zhao et al., ICML 2024, projected on the side that keeps the sharded rows local):

    R_k = G_k Q                      (m_k x r: local; the moments of R_k live on rank k)
    W_k <- (1 - lr wd) W_k - lr * scale * d_k Q^T

which is row block ``k`` of the single-process right-projected update, with no communication.
A refresh needs all of ``G`` and communicates once (:mod:`lowrank_optim.distributed.refresh`).
Dense parameters (norms, embeddings, biases) get AdamW on their local rows, which is exact
because AdamW is elementwise.

Communication per ``step()``, besides refreshes: one all-reduce (MAX) of one fp32 flag per
sharded parameter, so that all ranks agree whether a gradient is finite (a NaN lands in one
rank's rows only, and a rank that raised alone would leave the others waiting), and on the step
after a refresh one all-reduce of two fp64 sums per refreshed parameter for the captured energy
``||G Q||^2 / ||G||^2``.

State: moments (or their 8-/4-bit codes) are ``Shard(0)`` DTensors, the rest replicated plain values
(:mod:`lowrank_optim.distributed.sharding`), so ``torch.distributed.checkpoint`` round-trips
it. Full-precision state loads on any number of ranks (DCP reshards the moments' rows; the
basis is replicated); quantized state only on the number it was saved with, otherwise
:func:`~lowrank_optim.distributed.checkpoint.load_sharded_state` (in place of ``dcp.load``)
or else the first step raises :class:`~lowrank_optim.errors.CheckpointMismatchError`.

Refused with an error: placements other than ``(Shard(0),)`` on a 1-D mesh, ``proj_type``
that projects the sharded side (``left``, ``full``, ``std`` on a wide matrix,
``reverse_std`` on a tall one: use ``proj_type="right"``) and QGaLoreAdamW's INT8 weights.
Layer-wise steps run here too, one parameter at a time inside backward. WeLore hand-offs of
sharded ``nn.Linear`` layers are :mod:`lowrank_optim.distributed.handoff`; what it does not do
is refused in :func:`lowrank_optim.handoff.refuse_sharded_handoff`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lowrank_optim import state_keys as keys
from lowrank_optim.distributed.checkpoint import world_size_mismatch
from lowrank_optim.distributed.refresh import refresh_sharded
from lowrank_optim.distributed.sharding import check_row_sharded, local_view, store_sharded
from lowrank_optim.functional import ParamView
from lowrank_optim.moment_storage import MomentStorage
from lowrank_optim.placement import Placement, StepContext
from lowrank_optim.projection import RIGHT, basis_keys

__all__ = ["ROW_SHARDED", "RowShardedPlacement"]


class RowShardedPlacement(Placement):
    """FSDP2's ``Shard(0)`` on a 1-D mesh: each rank steps its own rows of every tensor."""

    checks_before_step = True

    def check(
        self,
        param: torch.Tensor,
        name: str,
        group: dict[str, Any],
        state: dict[str, Any],
        storage: MomentStorage,
        *,
        projected: bool,
        context: StepContext,
    ) -> None:
        """Refuse other layouts, INT8 weights, left projections, and quantized state saved on
        another number of ranks; record the number of ranks. Layer-wise steps (inside
        backward, after FSDP2's reduce-scatter, :mod:`lowrank_optim.distributed.layerwise_fsdp`)
        are allowed: their gradient is this rank's reduced shard, or ``G_k Q`` of it."""
        if not isinstance(param, DTensor):
            raise TypeError(f"{name} is not a DTensor; the FSDP2 placement steps DTensors only")
        check_row_sharded(param, name)
        if context.int8_weight:
            raise NotImplementedError(
                f"QGaLoreAdamW's INT8 weights ({name}) are not supported under FSDP2; build "
                "QGaLoreAdamW without model= (bf16/fp32 weights, INT4 bases and 8-bit moments "
                "work) or train it without fully_shard"
            )
        if projected and basis_keys(group["proj_type"], param.shape) != (RIGHT,):
            raise ValueError(
                f"Invalid proj_type for FSDP2: {group['proj_type']!r} projects {name} "
                f"(shape {tuple(param.shape)}, rows sharded) on the left; allowed: "
                "proj_type='right' (or 'std' for m >= n, 'reverse_std' for m < n), which keeps "
                "the sharded rows local"
            )
        world = param.device_mesh.size()
        if state and state.get(keys.WORLD_SIZE, world) != world:
            if storage.holds_quantized(state):
                raise world_size_mismatch(name, int(state[keys.WORLD_SIZE]), world)
            state[keys.WORLD_SIZE] = world

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local()

    def local_shape(self, param: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (param.to_local().shape[0], *shape[1:])

    def open_state(
        self,
        state: dict[str, Any],
        param: torch.Tensor,
        shape: tuple[int, ...],
        storage: MomentStorage,
    ) -> dict[str, Any]:
        return local_view(state, self.local_shape(param, shape), storage)  # type: ignore[arg-type]

    def close_state(
        self,
        state: dict[str, Any],
        view: dict[str, Any],
        param: torch.Tensor,
        shape: tuple[int, ...],
        storage: MomentStorage,
    ) -> None:
        if view:
            store_sharded(state, view, param, shape, storage)  # type: ignore[arg-type]

    def finite_flags(
        self, views: Sequence[ParamView], tensors: Sequence[torch.Tensor]
    ) -> list[bool]:
        """Whether each *global* gradient is finite; all ranks decide alike (one all-reduce of
        one fp32 flag per tensor, MAX: a NaN lands in one rank's rows only, and a rank that
        raised alone would leave the others waiting)."""
        if not tensors:
            return []
        local = torch.stack([(~torch.isfinite(t)).any().float() for t in tensors])
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=_process_group(views))
        return [not flag for flag in local.tolist()]

    def refresh(
        self,
        view: ParamView,
        group: dict[str, Any],
        basis_keys: tuple[str, ...],
        rank: int,
        step: int,
        storage: MomentStorage,
    ) -> bool:
        """The right basis of the row-sharded gradient: a Gram all-reduce or an all-gather."""
        if view.grad is None:
            raise RuntimeError(f"a basis refresh of {view.name} needs its gradient shard")
        return refresh_sharded(
            view.grad,
            view.state,
            group,
            tuple(view.shape),  # type: ignore[arg-type]
            rank,
            step,
            view.name,
            storage,
            view.param.dtype,
            _process_group([view]),
        )

    def captured_energies(
        self, views: Sequence[ParamView], lows: Sequence[torch.Tensor]
    ) -> list[float]:
        """``||G Q||^2 / ||G||^2`` of the whole gradient: fp64 sums over ranks, one call."""
        sums = torch.stack(
            [
                torch.stack([low.double().square().sum(), view.grad.double().square().sum()])
                for view, low in zip(views, lows, strict=True)
            ]
        )
        dist.all_reduce(sums, group=_process_group(views))
        return [
            captured / total if total > 0 else float("nan") for captured, total in sums.tolist()
        ]

    def checkpoint_numel(self, param: torch.Tensor, numel: int) -> int | None:
        return None  # the moments follow this rank's rows: their size is not known here


def _process_group(views: Sequence[ParamView]) -> dist.ProcessGroup:
    return views[0].param.device_mesh.get_group()


ROW_SHARDED = RowShardedPlacement()
