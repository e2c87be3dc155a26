"""WeLore's spectra of many row-sharded weights at once, each computed by one owner rank, and
the hand-off factors taken from the same decomposition.

WeLore's global threshold needs every candidate's whole normalized spectrum at each check step.
Computing each spectrum on every rank (:func:`lowrank_optim.distributed.spectrum_routes.
sharded_spectrum`) all-reduces an fp64 Gram or all-gathers the weight's column panels for every
matrix on every rank: at the LLaMA-1B shapes that moves more than gathering the weights. Here
each matrix ``W`` (``m x n``, rank ``i`` holding the rows ``W_i``) has one **owner** rank
(:func:`assign_owners`: the eigensolves, ``min(m, n)^3`` each, balanced over the ranks, then
the bytes received); only the owner ever sees all of ``W``'s rows, one block at a time:

``right`` (``m >= n``): the other ranks' rows reach the owner in row blocks (a ``gather`` to the
    owner alone, ``c`` rows of every rank at a time); the owner accumulates the fp64 Gram
    ``G = W^T W = sum_blocks B^T B`` (``n x n``) and its eigendecomposition gives
    ``G = V S^2 V^T``.
``left`` (``m < n``): the same with column panels ``W[:, J]`` (``m x c``) and the row Gram
    ``W W^T = sum_J W[:, J] W[:, J]^T = U S^2 U^T`` (``m x m``).

The Gram is in fp64 for the reason the every-rank route gives (it squares the condition number;
fp64 keeps the tail WeLore's min/max normalization looks at to ~1e-8 of the largest value).
Then **one all-gather** of the owners' singular-value vectors (fp64, padded to the largest
rank's share) gives every rank every spectrum, bit for bit the owner's, so every rank solves the
same threshold and chooses the same ranks.

Each rank sends its own rows of the matrices it does not own once (``m_i n`` elements each) and
receives the other ranks' rows of the matrices it owns: with the owners balanced, about
``(R - 1) / R^2`` of all the weights per rank, against ``(R - 1) / R`` for gathering the weights
on every rank (:func:`~lowrank_optim.distributed.spectra_plan.owner_spectra_bytes` gives the
exact per-rank counts). The price is the
owner's peak: the fp64 Gram and its eigenvectors (``2 d^2 + d`` values, ``d = min(m, n)``),
the same as the every-rank route, on one rank at a time instead of on all of them.

**The factors from the same decomposition.** For the matrices that may be handed off at this
check step (``keep``: name -> the largest rank the hand-off could choose), the owner keeps the
top ``keep`` eigenvectors (in the weight's compute dtype, fp32 at least) instead of throwing the
decomposition away, and :func:`shared_factors` makes WeLore's factors at the chosen ``k`` with
no second Gram:

* ``right``: the owner broadcasts ``V_k`` (``n x k``); every rank forms ``down = S_k^1/2 V_k^T``
  and ``up_i = W_i V_k S_k^-1/2`` from its own rows (the Gram route's math, in fp64).
* ``left``: the owner broadcasts ``U_k`` (``m x k``); ``up_i = U_k[rows_i] S_k^1/2`` is local,
  and ``down = S_k^-1/2 U_k^T W = S_k^-1/2 sum_i U_k[rows_i]^T W_i`` needs one all-reduce of a
  ``k x n`` fp64 block.

Values at the noise floor (``sigma <= sqrt(d eps_64) sigma_max``) carry no direction: their
columns of ``up`` and rows of ``down`` are zero (see :func:`~lowrank_optim.distributed.
factorize.noise_floor`). ``down`` is identical on every rank: built from broadcast vectors and
all-gathered values by the same operations, or all-reduced.

Every rank calls :func:`owner_spectra` with the same matrices in the same order, and
:func:`shared_factors` for the same matrices in the same order: the collectives line up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lowrank_optim.distributed.factorize import (
    Ledger,
    ShardedFactors,
    noise_floor,
    rows_times,
)
from lowrank_optim.distributed.sharding import local_rows_of, rows_per_rank
from lowrank_optim.distributed.spectra_plan import (
    assign_owners,
    factor_chunk,
    gathered_blocks,
    owner_spectra_bytes,
    owner_spectra_peak_bytes,
    shared_factors_bytes,
    shared_factors_peak_bytes,
    spectrum_side,
)

__all__ = [
    "OwnedSpectra",
    "assign_owners",
    "owner_spectra",
    "owner_spectra_bytes",
    "owner_spectra_peak_bytes",
    "shared_factors",
    "shared_factors_bytes",
    "shared_factors_peak_bytes",
    "spectrum_side",
]

SHARED = "shared"  # the route name of factors taken from the spectra's decomposition


# ------------------------------------------------------------------------------ spectra
@dataclass
class OwnedSpectra:
    """Every matrix's singular values (fp64, descending; identical on every rank), its owner,
    its side, how many top vectors its owner kept, and the vectors this rank kept
    (``name -> d x kept``, for :func:`shared_factors`); the peak bytes this rank allocated."""

    values: dict[str, torch.Tensor]
    owners: dict[str, int]
    sides: dict[str, str]
    kept: dict[str, int]
    group: dist.ProcessGroup | None
    peak_bytes: int
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)


def _global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _padded_rows(local: torch.Tensor, start: int, stop: int, ledger: Ledger) -> torch.Tensor:
    """This rank's rows ``[start, stop)`` as a contiguous block, zero rows past its own."""
    if stop <= local.shape[0]:
        return local[start:stop].contiguous()  # a view: FSDP2's local rows are contiguous
    block = local.new_zeros(stop - start, local.shape[1])
    if start < local.shape[0]:
        block[: local.shape[0] - start] = local[start:]
    ledger.hold(block)
    return block


def _owner_gram(
    local: torch.Tensor, rows: int, owner: int, ledger: Ledger, group: dist.ProcessGroup | None
) -> torch.Tensor | None:
    """``W^T W`` (``right``) or ``W W^T`` (``left``) in fp64 on the owner, from blocks gathered
    to it alone; ``None`` on the other ranks, which only send their blocks."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    counts = rows_per_rank(rows, world)
    local_max, cols = max(counts), local.shape[1]
    right = spectrum_side(rows, cols) == "right"
    mine = me == owner
    size = cols if right else rows
    gram = torch.zeros(size, size, dtype=torch.float64, device=local.device) if mine else None
    if gram is not None:
        ledger.hold(gram)
    dst = _global_rank(group, owner)
    for start, stop in gathered_blocks(rows, cols, world):
        if right:
            block = _padded_rows(local, start, stop, ledger)
        else:
            block = local.new_zeros(local_max, stop - start)
            block[: local.shape[0]] = local[:, start:stop]
            ledger.hold(block)
        gathered = [torch.empty_like(block) for _ in range(world)] if mine else None
        if gathered is not None:
            ledger.hold(*gathered)
        dist.gather(block, gathered, dst=dst, group=group)
        if gram is not None and gathered is not None:
            if right:
                for part in gathered:
                    wide = part.double()
                    ledger.hold(wide)
                    gram.addmm_(wide.T, wide)
                    ledger.drop(wide)
            else:
                panel = torch.empty(rows, stop - start, dtype=torch.float64, device=local.device)
                ledger.hold(panel)
                offset = 0
                for rank, part in enumerate(gathered):
                    panel[offset : offset + counts[rank]] = part[: counts[rank]]
                    offset += counts[rank]
                gram.addmm_(panel, panel.T)
                ledger.drop(panel)
            ledger.drop(*gathered)
        ledger.drop(block)
    return gram


def owner_spectra(
    weights: Mapping[str, torch.Tensor],
    *,
    rows: Mapping[str, int] | None = None,
    group: dist.ProcessGroup | None = None,
    keep: Mapping[str, int] | None = None,
) -> OwnedSpectra:
    """Every singular value of every row-sharded weight, identical on every rank, each computed
    by its owner (see the module docstring).

    ``weights``: ``Shard(0)`` DTensors (on one mesh), or this rank's rows with the global
    ``rows`` and the process ``group``; every rank passes the same names in the same order.
    ``keep``: name -> how many top singular vectors the owner keeps for :func:`shared_factors`
    (absent or 0: the spectrum only, from ``eigvalsh``).
    """
    keep = dict(keep or {})
    locals_: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for name, weight in weights.items():
        local, total, found = local_rows_of(weight, None if rows is None else rows[name], group)
        group = found
        locals_[name], shapes[name] = local, (total, local.shape[1])
    world = dist.get_world_size(group)
    names = list(weights)
    owners = dict(zip(names, assign_owners([shapes[n] for n in names], world), strict=True))
    kept = {n: max(0, min(int(keep.get(n, 0)), min(shapes[n]))) for n in names}
    ledger = Ledger()
    mine: dict[str, torch.Tensor] = {}
    vectors: dict[str, torch.Tensor] = {}
    for name in names:
        local = locals_[name]
        gram = _owner_gram(local, shapes[name][0], owners[name], ledger, group)
        if gram is None:
            continue
        count = kept[name]
        if count:
            eigen, basis = torch.linalg.eigh(gram)  # ascending; LAPACK works in ``basis``
            ledger.hold(eigen, basis)
            ledger.drop(gram)
            del gram
            compute = torch.promote_types(local.dtype, torch.float32)
            vectors[name] = basis[:, basis.shape[1] - count :].to(compute)  # ascending order
            ledger.hold(vectors[name])
            ledger.drop(basis)
            del basis
        else:
            eigen = torch.linalg.eigvalsh(gram)
            ledger.hold(eigen)
            ledger.transient(gram.numel() * gram.element_size())  # LAPACK's copy of the Gram
            ledger.drop(gram)
            del gram
        mine[name] = eigen.flip(0).clamp_min(0.0).sqrt()  # descending
        ledger.hold(mine[name])
        ledger.drop(eigen)
    device = next(iter(locals_.values())).device if locals_ else torch.device("cpu")
    values = _share_values(mine, names, shapes, owners, device, ledger, group)
    sides = {name: spectrum_side(*shapes[name]) for name in names}
    return OwnedSpectra(values, owners, sides, kept, group, ledger.peak, vectors)


def _share_values(
    mine: dict[str, torch.Tensor],
    names: list[str],
    shapes: dict[str, tuple[int, int]],
    owners: dict[str, int],
    device: torch.device,
    ledger: Ledger,
    group: dist.ProcessGroup | None,
) -> dict[str, torch.Tensor]:
    """One all-gather of every owner's singular values (fp64, padded to the largest share)."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    share = [0] * world
    for name in names:
        share[owners[name]] += min(shapes[name])
    width = max(share)
    packed = torch.zeros(width, dtype=torch.float64, device=device)
    offset = 0
    for name in names:
        if owners[name] == me:
            packed[offset : offset + min(shapes[name])] = mine[name]
            offset += min(shapes[name])
    gathered = packed.new_empty(world * width)
    ledger.hold(packed, gathered)
    dist.all_gather_single(gathered, packed, group=group)
    ledger.drop(*mine.values())
    values: dict[str, torch.Tensor] = {}
    offsets = [rank * width for rank in range(world)]
    for name in names:
        owner, d = owners[name], min(shapes[name])
        values[name] = gathered[offsets[owner] : offsets[owner] + d].clone()
        offsets[owner] += d
    ledger.hold(*values.values())
    ledger.drop(packed, gathered)
    return values


# ------------------------------------------------------------------------------ factors
def shared_factors(
    spectra: OwnedSpectra, name: str, weight: torch.Tensor, rank: int, *, rows: int | None = None
) -> ShardedFactors:
    """WeLore's factors of ``name`` at ``rank`` from the decomposition :func:`owner_spectra`
    made (no second Gram): this rank's rows of ``up = U_k S_k^1/2`` and the replicated
    ``down = S_k^1/2 V_k^T``, in the weight's dtype, route ``shared``.

    ``weight``: the same weight (a ``Shard(0)`` DTensor, or this rank's rows with ``rows``),
    unchanged since. ``rank`` must not exceed the vectors kept (``spectra.kept[name]``, the same
    on every rank). The owner's kept vectors are released.
    """
    count = spectra.kept.get(name, 0)
    if not isinstance(rank, int) or not 1 <= rank <= count:
        raise ValueError(
            f"Invalid rank for {name}: {rank!r}; the spectra kept {count} vectors (an integer in "
            f"[1, {count}] is allowed)"
        )
    group = spectra.group
    local, total, _ = local_rows_of(weight, rows, group)
    cols = local.shape[1]
    world, me = dist.get_world_size(group), dist.get_rank(group)
    owner = spectra.owners[name]
    right = spectra.sides[name] == "right"
    size = cols if right else total
    compute = torch.promote_types(local.dtype, torch.float32)
    ledger = Ledger()
    if me == owner:
        stored = spectra.vectors.pop(name)
        basis = stored[:, count - rank :].flip(1).contiguous()  # descending, size x rank
        del stored
    else:
        basis = torch.empty(size, rank, dtype=compute, device=local.device)
    ledger.hold(basis)
    dist.broadcast(basis, src=_global_rank(group, owner), group=group)
    values = spectra.values[name]
    top = values[:rank]
    keep = top > noise_floor(values, size)
    root = top.sqrt()
    zero = torch.zeros_like(root)
    root_kept = torch.where(keep, root, zero)
    inverse_root = torch.where(keep, 1.0 / root.clamp_min(1e-300), zero)
    up = local.new_empty(local.shape[0], rank)
    ledger.hold(up)
    if right:  # down = S^1/2 V^T, up_i = W_i V S^-1/2 (the Gram route's math)
        wide = basis.double()
        ledger.hold(wide)
        down = (root_kept[:, None] * wide.T).to(local.dtype)
        scaled = wide * inverse_root
        ledger.hold(down, scaled)
        ledger.drop(wide, basis)
        del wide, basis
        rows_times(local, scaled, up, factor_chunk(local.shape[0], rank), ledger)
        return ShardedFactors(up, down, values.float(), SHARED, ledger.peak)
    # left: up_i = U_k[rows_i] S^1/2, down = S^-1/2 sum_i U_k[rows_i]^T W_i (one all-reduce)
    first = sum(rows_per_rank(total, world)[:me])
    mine = basis[first : first + local.shape[0]].double()
    ledger.hold(mine)
    up.copy_((mine * root_kept).to(local.dtype))
    product = torch.zeros(rank, cols, dtype=torch.float64, device=local.device)
    ledger.hold(product)
    chunk = factor_chunk(local.shape[0], rank)
    for start in range(0, local.shape[0], chunk):
        block = local[start : start + chunk].double()
        ledger.hold(block)
        product.addmm_(mine[start : start + chunk].T, block)
        ledger.drop(block)
    dist.all_reduce(product, group=group)
    down = (inverse_root[:, None] * product).to(local.dtype)
    ledger.hold(down)
    return ShardedFactors(up, down, values.float(), SHARED, ledger.peak)
