"""Basis refresh for a row-sharded gradient: every rank ends up with the same ``n x r`` basis.

Under FSDP2 rank ``k`` holds rows ``G_k`` of the gradient ``G`` (``m x n``). The projection is on
the right, ``R_k = G_k Q`` with ``Q`` (``n x r``) replicated, so the per-step projection and the
update ``W_k -= lr * scale * d_k Q^T`` need no communication. Only a refresh, which needs the
top-``r`` right singular vectors of the *whole* ``G``, communicates. Two ways:

``gram`` (``refresh="gram_eigh"`` only): ``G^T G = sum_k G_k^T G_k``. Each rank forms its
    ``n x n`` partial Gram matrix (``O(m n^2 / R)`` flops, the big product shared out), one
    ``all_reduce`` (fp32, ``4 n^2`` bytes of payload, about ``2 (R - 1) / R`` times that on the
    wire per rank with a ring) sums them, and every rank takes the top-``r`` eigenvectors.
``gather``: one ``all_gather`` of the row blocks (``4 m n`` bytes of payload, each rank
    receiving ``(R - 1) / R`` of it), after which every rank runs the group's own refresh
    method (``svd``, ``randomized`` or ``gram_eigh``) on the full ``G``, exactly as a single
    process would: bit-for-bit the single-process basis, at ``O(m n^2)`` flops on every rank.

``auto`` (the default; a param group may set ``fsdp_refresh`` to ``gram`` or ``gather``) picks,
for ``gram_eigh``, the one that moves fewer bytes: ``gram`` when ``2 n <= m`` (tall matrices,
e.g. LLaMA's ``5461 x 2048`` gate/up projections), ``gather`` otherwise (square attention
matrices, the wide down projection). Other refresh methods always ``gather``. Measured at two
ranks on the LLaMA-1B shapes (``benchmarks/fsdp_comm.py``, gloo on a loaded 2-core CPU host):
the bytes counted on real steps (``2048 x 2048`` there, small shapes in the tests) equal these
formulas, and the collective alone took 1.34 s (gram) vs 0.67 s
(gather) for ``2048 x 2048``, 0.83 s vs 9.98 s for ``5461 x 2048`` and 12.1 s vs 9.9 s for
``2048 x 5461``: in each case the faster one is the one that moves fewer bytes, which is the
rule. The rest of a refresh is the ``n x n`` eigh, the same for both.

Every rank gets identical input (an all-reduce returns the same sums everywhere; a gather the
same matrix) and runs the same deterministic LAPACK call, so the bases agree bit for bit; the
tests check it by gathering them. The bookkeeping after the new basis (metrics, moment
rotation, gap) is :func:`lowrank_optim.projection.refresh.install_bases_` on the rank's local
state, as in one process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lowrank_optim.distributed.sharding import rows_per_rank
from lowrank_optim.errors import SubspaceRefreshError
from lowrank_optim.moment_storage import MomentStorage
from lowrank_optim.projection import RIGHT
from lowrank_optim.projection.gram import gram_top_eigenvectors
from lowrank_optim.projection.refresh import (
    compute_bases,
    install_bases_,
    read_previous_bases,
    refresh_failed_,
)

__all__ = [
    "FSDP_REFRESH",
    "choose_strategy",
    "gather_rows",
    "gram_refresh_bytes",
    "gather_refresh_bytes",
    "refresh_sharded",
    "sharded_right_basis",
]

#: Values of the optional ``fsdp_refresh`` param-group key.
FSDP_REFRESH = ("auto", "gram", "gather")


def gram_refresh_bytes(cols: int, itemsize: int = 4) -> int:
    """Payload of the ``gram`` refresh's one all-reduce: the ``n x n`` Gram matrix."""
    return cols * cols * itemsize


def gather_refresh_bytes(rows: int, cols: int, world_size: int, itemsize: int = 4) -> int:
    """Payload of the ``gather`` refresh's all-gather: ``R`` blocks of ``ceil(m / R)`` rows."""
    return max(rows_per_rank(rows, world_size)) * world_size * cols * itemsize


def choose_strategy(group: dict[str, Any], shape: tuple[int, int]) -> str:
    """``gram`` or ``gather`` for a parameter of global ``shape`` in ``group`` (see module doc)."""
    choice = group.get("fsdp_refresh", "auto")
    if choice not in FSDP_REFRESH:
        raise ValueError(f"Invalid fsdp_refresh: {choice!r}; allowed: {', '.join(FSDP_REFRESH)}")
    if choice == "gram" and group["refresh"] != "gram_eigh":
        raise ValueError(
            f"Invalid fsdp_refresh: 'gram' with refresh={group['refresh']!r}; the all-reduced "
            "Gram matrix only serves refresh='gram_eigh' (use fsdp_refresh='gather' or 'auto')"
        )
    if choice != "auto":
        return choice
    rows, cols = shape
    # Ring all-reduce moves ~2x its payload per rank, all-gather ~1x: compare 2 n^2 with m n.
    return "gram" if group["refresh"] == "gram_eigh" and 2 * cols <= rows else "gather"


def gather_rows(local: torch.Tensor, rows: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The full ``rows x n`` matrix from each rank's row block (padded to equal blocks)."""
    world = dist.get_world_size(group)
    chunk = max(rows_per_rank(rows, world))
    padded = local.new_zeros(chunk, local.shape[1])
    padded[: local.shape[0]] = local
    out = local.new_empty(chunk * world, local.shape[1])
    dist.all_gather_single(out, padded, group=group)
    counts = rows_per_rank(rows, world)
    return torch.cat([out[k * chunk : k * chunk + counts[k]] for k in range(world)])


def sharded_right_basis(
    grad_local: torch.Tensor,
    shape: tuple[int, int],
    rank: int,
    previous: dict[str, torch.Tensor],
    group: dict[str, Any],
    step: int,
    name: str,
    process_group: dist.ProcessGroup | None,
) -> dict[str, torch.Tensor]:
    """``{RIGHT: Q}``, the fp32 top-``rank`` right singular basis of the row-sharded gradient."""
    if choose_strategy(group, shape) == "gather":
        full = gather_rows(grad_local, shape[0], process_group)
        return compute_bases(full, (RIGHT,), rank, previous, group, step, name)
    local = grad_local.float()
    gram = local.T @ local
    dist.all_reduce(gram, group=process_group)
    try:
        basis = gram_top_eigenvectors(gram, rank)
    except torch.linalg.LinAlgError:
        try:  # as compute_bases: LAPACK's fp32 driver failing usually succeeds in fp64
            basis = gram_top_eigenvectors(gram.double(), rank).float()
        except torch.linalg.LinAlgError as error:
            raise SubspaceRefreshError(
                f"Basis refresh (gram_eigh, sharded) of parameter {name} (shape {shape}) did "
                f"not converge at step {step}: {error}"
            ) from error
    if not bool(torch.isfinite(basis).all()):
        raise SubspaceRefreshError(
            f"Basis refresh (gram_eigh, sharded) of parameter {name} returned a non-finite "
            f"basis at step {step}"
        )
    return {RIGHT: basis}


def refresh_sharded(
    grad_local: torch.Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    shape: tuple[int, int],
    rank: int,
    step: int,
    name: str,
    storage: MomentStorage,
    dtype: torch.dtype,
    process_group: dist.ProcessGroup | None,
) -> bool:
    """Refresh the right basis in the rank's local ``state``; ``False`` if skipped.

    The skip decision (an SVD that failed) is the same on every rank, since all ranks computed
    from the same input.
    """
    previous = read_previous_bases(state, (RIGHT,), group.get("proj_bits"))
    try:
        new_bases = sharded_right_basis(
            grad_local, shape, rank, previous, group, step, name, process_group
        )
    except SubspaceRefreshError as error:
        return refresh_failed_(state, group, error, step)
    install_bases_(state, group, previous, new_bases, step, storage, dtype)
    return True
