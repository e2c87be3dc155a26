"""GaLore-family steps on FSDP2 parameters (``DTensor``, ``Shard(0)``): the optimizer's dispatch.

``GaLoreAdamW._dense_step`` and ``_projected_step`` hand their ``DTensor`` items to
:func:`step_sharded` and keep the rest. For a weight ``W`` (``m x n``) whose rows are split over
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
basis is replicated); quantized state only on the number it was saved with, otherwise the first
step raises :class:`~lowrank_optim.errors.CheckpointMismatchError`.

Refused with an error: placements other than ``(Shard(0),)`` on a 1-D mesh, ``proj_type``
that projects the sharded side (``left``, ``full``, ``std`` on a wide matrix,
``reverse_std`` on a tall one: use ``proj_type="right"``), QGaLoreAdamW's INT8 weights, and
layer-wise stepping (inside backward). WeLore hand-offs are refused in
:func:`refuse_sharded_handoff`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lowrank_optim import state_keys as keys
from lowrank_optim.config import StabilityConfig
from lowrank_optim.distributed.refresh import refresh_sharded
from lowrank_optim.distributed.sharding import (
    WORLD_SIZE_KEY,
    check_row_sharded,
    init_local_moments,
    local_view,
    store_sharded,
)
from lowrank_optim.errors import CheckpointMismatchError
from lowrank_optim.projection import RIGHT, basis_keys, effective_rank, project, project_back_
from lowrank_optim.stability import init_stability_state, record_captured_energy_

if TYPE_CHECKING:
    from lowrank_optim.optim.galore_adamw import GaLoreAdamW
    from lowrank_optim.optim.welore_adamw import WeLoreAdamW

__all__ = ["refuse_sharded_handoff", "step_sharded"]

Item = tuple[int, torch.Tensor]


def step_sharded(
    optimizer: GaLoreAdamW, group: dict[str, Any], items: list[Item], projected: bool
) -> list[Item]:
    """Step the ``DTensor`` items of ``items``; returns the others for the caller to step."""
    sharded = [(index, param) for index, param in items if isinstance(param, DTensor)]
    if not sharded:
        return items
    for index, param in sharded:
        _check_supported(optimizer, group, index, param, projected)
    sharded = _finite_everywhere(optimizer, group, sharded)
    if sharded:
        if projected:
            _projected_step(optimizer, group, sharded)
        else:
            _dense_step(optimizer, group, sharded)
    return [(index, param) for index, param in items if not isinstance(param, DTensor)]


def refuse_sharded_handoff(optimizer: WeLoreAdamW, step: int) -> None:
    """Raise if a WeLore hand-off at ``step`` would factorize an FSDP2-sharded weight.

    Checked on the optimizer's parameters, not the model's modules: ``fully_shard`` changes a
    ``Linear``'s class, so a module walk would silently find nothing to hand off.
    """
    for group in optimizer.param_groups:
        for index, param in enumerate(group["params"]):
            if not isinstance(param, DTensor) or not optimizer.is_projected(group, param):
                continue
            if optimizer.ready_for_handoff(param, step):
                raise NotImplementedError(
                    f"WeLore hand-off of {optimizer.param_name(group, index)} (stable, step "
                    f"{step}) is not supported on FSDP2-sharded parameters (fully_shard "
                    "DTensors): replacing a sharded Linear changes FSDP's parameter groups. Hand "
                    "off between stages instead: save with torch.distributed.checkpoint, load the "
                    "full model and optimizer in one process and call maybe_handoff there, then "
                    "apply fully_shard again and continue. To train on without hand-offs, set "
                    "HandoffConfig(start_step=...) beyond the run."
                )


# ------------------------------------------------------------------------------- checks
def _check_supported(
    optimizer: GaLoreAdamW, group: dict[str, Any], index: int, param: DTensor, projected: bool
) -> None:
    name = optimizer.param_name(group, index)
    if torch._C._current_graph_task_id() != -1 or param.grad is None:
        raise NotImplementedError(
            f"Layer-wise stepping of {name} (an optimizer step inside backward, or a low-rank "
            "gradient in place of .grad) is not supported on FSDP2-sharded parameters: the "
            "gradient shard exists only after FSDP's reduce-scatter. Call optimizer.step() "
            "after backward."
        )
    check_row_sharded(param, name)
    if param in getattr(optimizer, "owners", {}):
        raise NotImplementedError(
            f"QGaLoreAdamW's INT8 weights ({name}) are not supported under FSDP2; build "
            "QGaLoreAdamW without model= (bf16/fp32 weights, INT4 bases and 8-bit moments "
            "work) or train it without fully_shard"
        )
    if projected and basis_keys(group["proj_type"], param.shape) != (RIGHT,):
        raise ValueError(
            f"Invalid proj_type for FSDP2: {group['proj_type']!r} projects {name} "
            f"(shape {tuple(param.shape)}, rows sharded) on the left; allowed: proj_type='right' "
            "(or 'std' for m >= n, 'reverse_std' for m < n), which keeps the sharded rows local"
        )
    state = optimizer.state.get(param)
    world = param.device_mesh.size()
    if state and state.get(WORLD_SIZE_KEY, world) != world:
        if _is_quantized(state):
            raise CheckpointMismatchError(
                f"Quantized moments of {name} were saved on {state[WORLD_SIZE_KEY]} ranks and this "
                f"run has {world}: their quantization blocks follow the shards, so they load "
                "only on the same number of ranks (full-precision moments load on any number)"
            )
        state[WORLD_SIZE_KEY] = world


def _is_quantized(state: dict[str, Any]) -> bool:
    return keys.EXP_AVG not in state


def _finite_everywhere(
    optimizer: GaLoreAdamW, group: dict[str, Any], items: list[Item]
) -> list[Item]:
    """Items whose *global* gradient is finite; all ranks decide alike (one tiny all-reduce)."""
    grads = [param.grad.to_local() for _, param in items]
    local = torch.stack([(~torch.isfinite(g)).any().float() for g in grads]) if grads else None
    mesh = items[0][1].device_mesh
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=mesh.get_group())
    bad = local.tolist()
    if not any(bad):
        return items
    names = [
        optimizer.param_name(group, i) for (i, _), flag in zip(items, bad, strict=True) if flag
    ]
    optimizer._bad_gradient(group, names)
    return [item for item, flag in zip(items, bad, strict=True) if not flag]


# ---------------------------------------------------------------------------------- steps
class _LocalStates:
    """Swap ``optimizer.state[p]`` for its local view while stepping, then store it back.

    The optimizer's own moment math (``_adam_moments``) then runs unchanged on local tensors.
    """

    def __init__(
        self, optimizer: GaLoreAdamW, params: list[DTensor], shapes: list[tuple[int, ...]]
    ) -> None:
        self.optimizer, self.params, self.shapes = optimizer, params, shapes
        self.saved: list[dict[str, Any]] = []

    def __enter__(self) -> list[dict[str, Any]]:
        views = []
        for param, shape in zip(self.params, self.shapes, strict=True):
            state = self.optimizer.state[param]
            local_shape = (param.to_local().shape[0], *shape[1:])
            view = local_view(state, local_shape, self.optimizer.moment_storage)
            self.saved.append(state)
            self.optimizer.state[param] = view
            views.append(view)
        return views

    def __exit__(self, *exc: object) -> None:
        for param, shape, state in zip(self.params, self.shapes, self.saved, strict=True):
            view = self.optimizer.state[param]
            store_sharded(state, view, param, shape, self.optimizer.moment_storage)
            self.optimizer.state[param] = state


def _dense_step(optimizer: GaLoreAdamW, group: dict[str, Any], items: list[Item]) -> None:
    params = [param for _, param in items]
    for param in params:
        state = optimizer.state[param]
        if not state:
            view: dict[str, Any] = {keys.STEP: 0}
            local = param.to_local()
            init_local_moments(
                optimizer.moment_storage, view, tuple(local.shape), param.numel(), local
            )
            store_sharded(state, view, param, tuple(param.shape), optimizer.moment_storage)
    locals_ = [param.to_local() for param in params]
    grads = [param.grad.to_local() for param in params]
    with _LocalStates(optimizer, params, [tuple(p.shape) for p in params]):
        exp_avgs, denominators, step_sizes, decay = optimizer._adam_moments(group, params, grads)
        for local, exp_avg, denominator, step_size in zip(
            locals_, exp_avgs, denominators, step_sizes, strict=True
        ):
            # GaLoreAdamW._dense_step's update, on the local rows.
            if decay != 1.0:
                local.mul_(decay)
            if local.dtype == exp_avg.dtype:
                local.addcdiv_(exp_avg, denominator, value=-step_size)
            else:
                local.add_((exp_avg / denominator).to(local.dtype), alpha=-step_size)


def _init_projected(
    optimizer: GaLoreAdamW, group: dict[str, Any], param: DTensor, shape: tuple[int, int]
) -> None:
    """As ``GaLoreAdamW._init_projected_state``, with moments for this rank's rows only."""
    local = param.to_local()
    view: dict[str, Any] = {keys.STEP: 0}
    init_local_moments(
        optimizer.moment_storage, view, (local.shape[0], shape[1]), shape[0] * shape[1], local
    )
    view[keys.REFRESH_GAP] = int(group["update_proj_gap"])
    view[keys.NEXT_REFRESH] = 1
    view[keys.LAST_REFRESH] = 0
    view[keys.REFRESHES] = 0
    view[keys.REFRESHES_SKIPPED] = 0
    view[keys.REFRESHES_FAILED] = 0
    init_stability_state(view, StabilityConfig.from_group(group))
    store_sharded(optimizer.state[param], view, param, shape, optimizer.moment_storage)


def _projected_step(optimizer: GaLoreAdamW, group: dict[str, Any], items: list[Item]) -> None:
    params = [param for _, param in items]
    ranks = [effective_rank(group["rank"], param.shape) for param in params]
    shapes = [(param.shape[0], rank) for param, rank in zip(params, ranks, strict=True)]
    for param, shape in zip(params, shapes, strict=True):
        if not optimizer.state[param]:
            _init_projected(optimizer, group, param, shape)
    process_group = params[0].device_mesh.get_group()
    with _LocalStates(optimizer, params, shapes) as views:
        kept, lows, bases, energy = [], [], [], []
        for (index, param), view, rank in zip(items, views, ranks, strict=True):
            grad = param.grad.to_local()
            step = int(view[keys.STEP]) + 1
            if step >= view[keys.NEXT_REFRESH]:
                refresh_sharded(
                    grad,
                    view,
                    group,
                    tuple(param.shape),
                    rank,
                    step,
                    optimizer.param_name(group, index),
                    optimizer.moment_storage,
                    param.dtype,
                    process_group,
                )
            basis = optimizer._bases(group, param)  # reads the (swapped-in) local view
            if not basis:
                continue  # the first refresh failed and was skipped: nothing to project with
            low = project(grad, basis)
            if step == view[keys.LAST_REFRESH] + 1:
                energy.append((view, low, grad))
            kept.append(param)
            lows.append(low)
            bases.append(basis)
        _record_energy(energy, StabilityConfig.from_group(group), process_group)
        if not kept:
            return
        exp_avgs, denominators, step_sizes, decay = optimizer._adam_moments(group, kept, lows)
        directions = torch._foreach_div(exp_avgs, denominators)
        scale = float(group["scale"])
        for param, direction, basis, step_size in zip(
            kept, directions, bases, step_sizes, strict=True
        ):
            local = param.to_local()
            project_back_(local, direction.to(local.dtype), basis, -step_size * scale, decay)


def _record_energy(
    records: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]],
    config: StabilityConfig,
    process_group: dist.ProcessGroup,
) -> None:
    """Captured energy ``||G Q||^2 / ||G||^2`` of the whole gradient: sums over ranks."""
    if not records:
        return
    sums = torch.stack(
        [
            torch.stack([low.double().square().sum(), grad.double().square().sum()])
            for _, low, grad in records
        ]
    )
    dist.all_reduce(sums, group=process_group)
    for (view, _, _), (captured, total) in zip(records, sums.tolist(), strict=True):
        record_captured_energy_(view, config, captured / total if total > 0 else float("nan"))
