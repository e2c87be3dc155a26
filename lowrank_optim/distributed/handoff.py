"""The WeLore hand-off of an FSDP2-sharded layer, in place, with no full weight on any rank.

Under ``fully_shard`` a projected ``nn.Linear`` weight ``W`` (``m x n``) is a ``Shard(0)``
DTensor: rank ``i`` holds the rows ``W_i``. :func:`hand_off_sharded_layer` replaces the layer by
:class:`~lowrank_optim.factorize.LowRankLinear` factors without gathering ``W``:

1. **Factorize.** This rank's rows ``up_i = U_i S_k^1/2`` and the replicated
   ``down = S_k^1/2 V_k^T``: from the decomposition the check step's WeLore spectra made
   (:func:`~lowrank_optim.distributed.spectra.shared_factors`: the owner broadcasts its top
   ``k`` singular vectors, no second pass over the weight), or, without one (a hand-off not
   chosen by the spectra), by :func:`~lowrank_optim.distributed.factorize.factorize_sharded`
   (a Gram all-reduce or a randomized sketch, whichever moves fewer bytes with a peak below one
   weight).
2. **Carry the state.** The FSDP2 placement projects on the right only, so the layer's moments
   are ``M_i`` (``m_i x r``, this rank's rows) with the replicated basis ``Q`` (``n x r``). The
   single-process carry (:mod:`lowrank_optim.handoff.carry`), ``m_U = M Q^T D^T`` and
   ``m_D = U^T M Q^T``, is re-associated so that nothing ``m x n`` (or even ``m_i x n``) is formed:
   ``m_U,i = M_i (D Q)^T`` is local, and ``m_D = (sum_i U_i^T M_i) Q^T`` needs one all-reduce of a
   ``k x r`` block; the second moments alike with ``D o D``, ``Q o Q``, ``U_i o U_i``. Each
   factor's moments are stored ``Shard(0)`` like the factor (``up``'s rows are the weight's rows;
   ``down``'s rows are split by ``torch.chunk`` like any parameter). The factors' lr multipliers
   (``HandoffConfig.factor_step``, :mod:`lowrank_optim.handoff.factor_step`) need four squared
   norms, summed over the ranks' rows in one all-reduce of four fp64 values.
3. **Re-shard.** The factors join the FSDP2 parameter group that held the weight, in its place:
   FSDP2 builds their ``FSDPParam`` from a full-shape meta parameter (no memory), the local rows
   are then set the way ``to_empty`` / ``load_state_dict(assign=True)`` set them
   (``reset_sharded_param``), and the weight's ``FSDPParam`` leaves the group. Forward and backward
   then all-gather and reduce-scatter the factors with the rest of the block: the same
   communication unit the user chose for the dense layer, so no sharding policy is needed.

Why not call ``fully_shard`` again. ``fully_shard`` cannot re-shard a module already under it:
its parameters are already ``DTensor`` s, which ``fully_shard`` takes for tensor-parallel shards
(a second mesh dimension), and the parent's group would still all-gather the dead weight.
``fully_shard`` on the new ``LowRankLinear`` alone would make a new FSDP state after the root's
lazy initialization has listed all states, and that state would take itself for a root. The
route here touches FSDP2's group object, not its hooks or streams; it is tested on torch 2.13
(``tests/test_fsdp_handoff.py``) and checks what it relies on before it changes anything.

Resuming. A checkpoint taken after hand-offs is loaded into a freshly built, ``fully_shard`` -ed
model once its plan is re-applied: :func:`reapply_sharded_layer` makes the same factorized
layer, joined to the same FSDP2 group the same way, with uninitialized local rows (the load
fills them), and no collective. :func:`lowrank_optim.distributed.load_sharded_checkpoint` does
it all.

Not supported (refused before anything changes, by
:func:`lowrank_optim.handoff.refuse_sharded_handoff`): transformers ``Conv1D`` (its weight is
stored ``in x out``, so FSDP2 shards the input side), tapering (``taper_steps > 0``), and a
parameter group in the middle of a forward or backward (call ``maybe_handoff`` after ``step``).
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from lowrank_optim import state_keys as keys
from lowrank_optim.basis_storage import read_basis
from lowrank_optim.distributed.factorize import (
    Ledger,
    choose_factorization,
    factorize_sharded,
    sketch_peak_bytes,
)
from lowrank_optim.distributed.sharding import (
    check_row_sharded,
    local_view,
    rows_per_rank,
    store_sharded,
)
from lowrank_optim.distributed.spectra import OwnedSpectra, shared_factors
from lowrank_optim.factorize import LowRankLinear, replace_module
from lowrank_optim.handoff.candidates import HandoffCandidate
from lowrank_optim.handoff.carry import HANDOFF_STEP, LR_MULTIPLIER, move_to_factor_group
from lowrank_optim.handoff.factor_step import squared_step_norms, step_multipliers
from lowrank_optim.moment_storage import MomentStorage
from lowrank_optim.projection import LEFT, RIGHT
from lowrank_optim.stability import OVERLAP_HISTORY, STABLE_SINCE, latest

__all__ = [
    "ShardedHandoff",
    "fsdp_group_of",
    "check_sharded_reapply",
    "hand_off_sharded_layer",
    "handoff_route",
    "reapply_sharded_layer",
    "sharded_factor_moments",
]


@dataclass
class ShardedHandoff:
    """The report fields of one sharded hand-off, plus this rank's peak allocation and route."""

    fields: dict[str, Any]
    peak_bytes: int
    strategy: str


def handoff_route(rows: int, cols: int, rank: int, world_size: int, itemsize: int = 4) -> str:
    """The factorization route of a hand-off: the randomized ``sketch`` only where it keeps the
    peak below one weight and the exact ``gram`` does not; the ``gram`` otherwise.

    The sketch is exact only to ``(sigma_{l+1} / sigma_k)^(2q+1)``; where neither route fits
    below one weight (small matrices, or a rank near ``m / 8`` and above) the memory bound is
    lost anyway, and the hand-off keeps the exact factors of the single-process hand-off.
    """
    route = choose_factorization(rows, cols, rank, world_size, itemsize=itemsize)
    compute = max(itemsize, 4)
    fits = (
        sketch_peak_bytes(rows, cols, rank, world_size, itemsize=compute) < rows * cols * itemsize
    )
    return "sketch" if route == "sketch" and fits else "gram"


def fsdp_group_of(root: nn.Module, param: torch.Tensor) -> tuple[Any, Any]:
    """``(FSDPParamGroup, FSDPParam)`` of the FSDP2 group that manages ``param``.

    Raises ``ValueError`` when no ``fully_shard`` group under ``root`` holds it (a DTensor made
    another way), or when that group is not resharded (inside a forward or backward).
    """
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()  # noqa: SLF001 - FSDP2's group lives on its state
        for group in state._fsdp_param_groups:  # noqa: SLF001
            for fsdp_param in group.fsdp_params:
                if fsdp_param.sharded_param is param:
                    if not group.is_sharded:
                        raise ValueError(
                            "Invalid time for a hand-off: the FSDP2 group holding the weight is "
                            "unsharded (inside forward or backward); call maybe_handoff after "
                            "optimizer.step()"
                        )
                    return group, fsdp_param
    raise ValueError(
        "Invalid sharded weight: no fully_shard group under the model manages it; the FSDP2 "
        "hand-off needs weights sharded by torch.distributed.fsdp.fully_shard"
    )


def sharded_factor_moments(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    basis: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    group: dist.ProcessGroup | None,
    ledger: Ledger | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((m_U,i, v_U,i), (m_D, v_D))``: this rank's rows of ``up``'s moments and all of
    ``down``'s (replicated) from the right-projected moments ``M_i``, ``V_i`` (``m_i x r``), the
    basis ``Q`` (``n x r``) and the factors ``up_i`` (``m_i x k``), ``down`` (``k x n``).

    Exactly :func:`lowrank_optim.handoff.factor_moments` with ``bases = {right: Q}``,
    re-associated so that the largest temporary is ``k x n``; one all-reduce of ``2 k r``
    values.
    """
    ledger = ledger if ledger is not None else Ledger()
    compute = torch.promote_types(up.dtype, torch.float32)
    first, second = exp_avg.to(compute), exp_avg_sq.to(compute)
    right = basis.to(compute)
    up_wide, down_wide = up.detach().to(compute), down.detach().to(compute)
    ledger.hold(first, second, right, up_wide, down_wide)
    rotated = down_wide @ right  # D Q, k x r
    rotated_sq = down_wide.square() @ right.square()  # (D o D)(Q o Q)
    ledger.hold(rotated, rotated_sq)
    up_first, up_second = first @ rotated.T, second @ rotated_sq.T  # m_i x k
    ledger.hold(up_first, up_second)
    reduced = torch.stack([up_wide.T @ first, up_wide.square().T @ second])  # 2 x k x r
    ledger.hold(reduced)
    dist.all_reduce(reduced, group=group)
    down_first, down_second = reduced[0] @ right.T, reduced[1] @ right.square().T  # k x n
    ledger.hold(down_first, down_second)
    return (up_first, up_second), (down_first, down_second)


def _squared_step_norms(
    moments: tuple[torch.Tensor, torch.Tensor],
    basis: torch.Tensor,
    carried: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    factors: tuple[torch.Tensor, torch.Tensor],
    step: int,
    source: dict[str, Any],
    group: dist.ProcessGroup | None,
    ledger: Ledger,
) -> torch.Tensor:
    """:func:`lowrank_optim.handoff.squared_step_norms` of a row-sharded layer: each rank adds
    up its rows' values in row chunks, then one all-reduce of four values. ``carried`` holds
    this rank's rows of ``up``'s moments and all of ``down``'s, ``factors`` this rank's rows of
    ``up`` and all of ``down``."""
    betas, eps = source["betas"], source["eps"]
    (up_first, up_second), (down_first, down_second) = carried
    down = factors[1].detach()
    rows = factors[0].shape[0]
    sums = torch.zeros(4, dtype=torch.float64, device=down.device)
    # Rows per chunk such that its temporaries (24 bytes an entry, below) stay within one
    # k x n fp32 block, the size of the moment carry's own largest temporary.
    chunk = max(1, min(rows, down.shape[0] // 6))
    for begin in range(0, rows, chunk):
        part = slice(begin, begin + chunk)
        # A chunk of rows is a row shard of its own: the single-process formula applies.
        sums += squared_step_norms(
            moments[0][part],
            moments[1][part],
            {RIGHT: basis},
            ((up_first[part], up_second[part]), (down_first, down_second)),
            factors[0][part],
            down,
            step=step,
            betas=betas,
            eps=eps,
        )
        # four chunk x n fp32 terms and one fp64 square alive at once: 24 bytes an entry
        ledger.transient(24 * min(chunk, rows - begin) * down.shape[1])
    dist.all_reduce(sums, group=group)
    return sums


def _factor_state(
    local: torch.Tensor,
    global_shape: tuple[int, int],
    param: DTensor,
    carried: tuple[torch.Tensor, torch.Tensor] | None,
    step: int,
    storage: MomentStorage,
) -> dict[str, Any]:
    """AdamW state of one sharded factor, as the FSDP2 placement keeps a dense parameter's."""
    view: dict[str, Any] = {keys.STEP: step if carried is not None else 0}
    storage.init(view, tuple(local.shape), local, math.prod(global_shape))
    if carried is not None:
        storage.write(view, *carried)
    state: dict[str, Any] = {}
    store_sharded(state, view, param, global_shape, storage)
    state[HANDOFF_STEP] = state[keys.STEP]
    return state


def _sharded_parameter(local: torch.Tensor, mesh: Any, shape: tuple[int, int]) -> nn.Parameter:
    stride = (shape[1], 1)
    tensor = DTensor.from_local(
        local.contiguous(), mesh, [Shard(0)], run_check=False, shape=shape, stride=stride
    )
    return nn.Parameter(tensor)


def _join_group(
    group: Any,
    old: Any,
    factored: LowRankLinear,
    locals_: dict[str, torch.Tensor],
    name: str,
) -> None:
    """Put ``factored``'s factors in FSDP2 group ``group`` in place of ``old`` (the weight's).

    Each factor's ``FSDPParam`` is built by FSDP2 from a full-shape meta parameter (nothing
    allocated); then the real local rows are set and FSDP2 re-pads them
    (``reset_sharded_param``, its path for ``to_empty`` and ``load_state_dict(assign=True)``).
    """
    fsdp_param_type = type(old)
    info_type = type(old._module_info)  # noqa: SLF001
    mesh = group.mesh_info.mesh
    made = []
    for attribute in ("up", "down"):
        current = getattr(factored, attribute)
        fsdp_param = fsdp_param_type(
            current,
            info_type(factored, attribute),
            group.mesh_info,
            group.post_forward_mesh_info,
            group.device,
            None,
            group.mp_policy,
            group.offload_policy,
        )
        setattr(factored, attribute, _sharded_parameter(locals_[attribute], mesh, current.shape))
        fsdp_param.reset_sharded_param()
        fsdp_param._param_fqn = f"{name}.{attribute}"  # noqa: SLF001 - FSDP2's error messages
        made.append(fsdp_param)
    bias = factored.bias
    if bias is not None:  # the dense layer's bias, kept: its FSDPParam now serves the new module
        for fsdp_param in group.fsdp_params:
            if fsdp_param.sharded_param is bias:
                fsdp_param._post_load_hook_handle.remove()  # noqa: SLF001
                fsdp_param._module_info = info_type(factored, "bias")  # noqa: SLF001
                fsdp_param._post_load_hook_handle = factored.register_load_state_dict_post_hook(  # noqa: SLF001
                    lambda *args, p=fsdp_param, **kwargs: p.reset_sharded_param()
                )
    position = group.fsdp_params.index(old)
    group.fsdp_params[position : position + 1] = made
    old._post_load_hook_handle.remove()  # noqa: SLF001
    # The state-dict hooks (reshard before save/load) are registered per module: redo them so
    # the new module has them and the removed one does not.
    for handles in (
        group._module_to_pre_save_state_dict_hook_handle,  # noqa: SLF001
        group._module_to_pre_load_state_dict_hook_handle,  # noqa: SLF001
    ):
        for handle in handles.values():
            handle.remove()
        handles.clear()
    group._register_state_dict_hooks()  # noqa: SLF001
    group._init_mp_dtypes()  # noqa: SLF001


def hand_off_sharded_layer(
    root: nn.Module,
    candidate: HandoffCandidate,
    rank: int,
    *,
    param_groups: Sequence[dict[str, Any]],
    state: MutableMapping[torch.Tensor, Any],
    storage: MomentStorage,
    fresh: bool,
    factor_step: str = "fixed",
    spectra: OwnedSpectra | None = None,
) -> ShardedHandoff:
    """Hand off the FSDP2-sharded ``nn.Linear`` ``candidate`` at ``rank`` inside ``root``.

    The sharded counterpart of :func:`lowrank_optim.handoff.hand_off_layer` (same arguments, same
    report fields): factorize without gathering, carry the moments shard by shard, and put the
    factors in the weight's FSDP2 group. ``spectra``: this check step's
    :func:`~lowrank_optim.distributed.spectra.owner_spectra` of the unchanged weight; when it
    kept at least ``rank`` vectors of the layer, the factors come from it (route ``shared``).
    Every rank must call it for the same layers in the same order, with the same ``spectra``
    (the collectives line up). Returns the report fields, this rank's peak allocation (the live
    tensors the hand-off created, the model's existing shards not counted) and the
    factorization route.
    """
    if type(candidate.module) is not nn.Linear:
        raise NotImplementedError(
            f"{candidate.name}: the FSDP2 hand-off factorizes nn.Linear weights only; a "
            f"{type(candidate.module).__name__} stores its weight in x out, so FSDP2 shards the "
            "input side"
        )
    weight = candidate.weight
    check_row_sharded(weight, candidate.name)
    group, old = fsdp_group_of(root, weight)
    rows, cols = weight.shape
    mesh = weight.device_mesh
    process_group = mesh.get_group()
    world, me = mesh.size(), mesh.get_local_rank()
    local_weight = weight.to_local().detach()

    if spectra is not None and rank <= spectra.kept.get(candidate.name, 0):
        factors = shared_factors(spectra, candidate.name, weight, rank)
    else:
        route = handoff_route(rows, cols, rank, world, local_weight.element_size())
        factors = factorize_sharded(weight, rank, strategy=route)
    ledger = Ledger()
    ledger.hold(factors.up, factors.down)
    down_counts = rows_per_rank(rank, world)
    start = sum(down_counts[:me])
    down_local = factors.down[start : start + down_counts[me]].clone()
    ledger.hold(down_local)

    # The relative error ||W - U D|| / ||W||, from row chunks of this rank's shard.
    sums = torch.zeros(2, dtype=torch.float64, device=local_weight.device)
    chunk = max(1, min(local_weight.shape[0], rank))
    for begin in range(0, local_weight.shape[0], chunk):
        block = local_weight[begin : begin + chunk].double()
        approx = factors.up[begin : begin + chunk].double() @ factors.down.double()
        ledger.hold(block, approx)
        sums[0] += (block - approx).square().sum()
        sums[1] += block.square().sum()
        ledger.drop(block, approx)
    dist.all_reduce(sums, group=process_group)
    error = float(sums[0].sqrt() / sums[1].sqrt().clamp_min(1e-30))

    weight_state = state.pop(weight, {})
    bits = param_groups[candidate.group_index].get("proj_bits")
    if read_basis(weight_state, LEFT, bits, weight.dtype) is not None:
        raise ValueError(f"{candidate.name}: a left basis on an FSDP2-sharded weight")
    basis = read_basis(weight_state, RIGHT, bits, weight.dtype)
    carried, multipliers = None, None
    matching = factor_step != "fixed" and int(weight_state.get(keys.STEP, 0)) > 0
    if basis is not None and (matching or not fresh):
        low_rank = (local_weight.shape[0], basis.shape[1])
        view = local_view(weight_state, low_rank, storage)
        exp_avg, exp_avg_sq = storage.read(view)
        up_moments, down_moments = sharded_factor_moments(
            exp_avg, exp_avg_sq, basis, factors.up, factors.down, process_group, ledger
        )
        if matching:
            norms = _squared_step_norms(
                (exp_avg, exp_avg_sq),
                basis,
                (up_moments, down_moments),
                (factors.up, factors.down),
                int(weight_state[keys.STEP]),
                param_groups[candidate.group_index],
                process_group,
                ledger,
            )
            multipliers = step_multipliers(norms, factor_step)
        down_moments = (
            down_moments[0][start : start + down_counts[me]],
            down_moments[1][start : start + down_counts[me]],
        )
        carried = None if fresh else (up_moments, down_moments)

    factored = LowRankLinear(cols, rows, rank, False, "meta", weight.dtype)
    if candidate.module.bias is not None:
        factored.bias = candidate.module.bias
    replace_module(root, candidate.name, factored)
    _join_group(group, old, factored, {"up": factors.up, "down": down_local}, candidate.name)
    move_to_factor_group(param_groups, candidate, weight, factored)  # the sharded factors
    step = int(weight_state.get(keys.STEP, 0))
    for index, (attribute, local) in enumerate((("up", factors.up), ("down", down_local))):
        param = getattr(factored, attribute)
        state[param] = _factor_state(
            local,
            tuple(param.shape),
            param,
            None if carried is None else carried[index],
            step,
            storage,
        )
        if multipliers is not None:
            state[param][LR_MULTIPLIER] = multipliers[index]
    weight.grad = None  # the dense shard is gone from the model: free its gradient now
    fields = {
        "rank": rank,
        "full_rank": min(rows, cols),
        "params_before": rows * cols,
        "params_after": rank * (rows + cols),
        "relative_error": error,
        "overlap": latest(weight_state, OVERLAP_HISTORY),
        "stable_since": int(weight_state.get(STABLE_SINCE, -1)),
        "lr_multipliers": [1.0, 1.0] if multipliers is None else list(multipliers),
    }
    peak = max(factors.peak_bytes, ledger.peak)
    return ShardedHandoff(fields, peak, factors.strategy)


def check_sharded_reapply(root: nn.Module, candidate: HandoffCandidate) -> None:
    """Raise, before anything changes, if a checkpoint's hand-off of ``candidate`` cannot be
    re-applied to this sharded model (what :func:`reapply_sharded_layer` relies on)."""
    if type(candidate.module) is not nn.Linear:
        raise NotImplementedError(
            f"{candidate.name}: the FSDP2 hand-off re-applies nn.Linear layers only, not a "
            f"{type(candidate.module).__name__}"
        )
    check_row_sharded(candidate.weight, candidate.name)
    fsdp_group_of(root, candidate.weight)


def reapply_sharded_layer(
    root: nn.Module,
    candidate: HandoffCandidate,
    rank: int,
    *,
    param_groups: Sequence[dict[str, Any]],
    state: MutableMapping[torch.Tensor, Any],
) -> None:
    """Re-apply a recorded hand-off of the sharded ``nn.Linear`` ``candidate`` at ``rank``, with
    placeholder factors whose values a checkpoint load fills in.

    The layout is that of :func:`hand_off_sharded_layer`: ``up``'s local rows are the weight's,
    ``down`` (``rank x n``) is split by ``torch.chunk``, both join the weight's FSDP2 group in
    its place, and move to the factor group of the weight's param group, with no state. The
    placeholders are created on the weight's device (``meta`` stays ``meta`` until
    ``to_empty``). Local to each rank: no collective.
    """
    check_sharded_reapply(root, candidate)
    weight = candidate.weight
    group, old = fsdp_group_of(root, weight)
    rows, cols = weight.shape
    mesh = weight.device_mesh
    local_weight = weight.to_local()
    options = {"dtype": weight.dtype, "device": local_weight.device}
    down_rows = rows_per_rank(rank, mesh.size())[mesh.get_local_rank()]
    placeholders = {
        "up": torch.empty(local_weight.shape[0], rank, **options),
        "down": torch.empty(down_rows, cols, **options),
    }
    state.pop(weight, None)
    factored = LowRankLinear(cols, rows, rank, False, "meta", weight.dtype)
    if candidate.module.bias is not None:
        factored.bias = candidate.module.bias
    replace_module(root, candidate.name, factored)
    _join_group(group, old, factored, placeholders, candidate.name)
    move_to_factor_group(param_groups, candidate, weight, factored)
    weight.grad = None
