"""Where the owner-computed WeLore spectra (:mod:`lowrank_optim.distributed.spectra`) put the
work, and what they cost: each matrix's owner rank and Gram side, the gathered blocks, and
exact byte formulas for the traffic and the peak memory of :func:`~lowrank_optim.distributed.
spectra.owner_spectra` and :func:`~lowrank_optim.distributed.spectra.shared_factors`.

Functions of the shapes and the number of ranks alone: every rank gets the same answers
without communicating, and the benchmarks (``benchmarks/fsdp_handoff_bytes.py``) and tests
check the counted collectives against them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lowrank_optim.distributed.sharding import rows_per_rank

__all__ = [
    "F64_BYTES",
    "assign_owners",
    "factor_chunk",
    "gathered_blocks",
    "owner_gram_peak",
    "owner_spectra_bytes",
    "owner_spectra_peak_bytes",
    "panel_width",
    "row_block",
    "shared_factors_bytes",
    "shared_factors_peak_bytes",
    "spectrum_side",
]

F64_BYTES = 8  # bytes of an fp64 element


# ------------------------------------------------------------------------------ layout
def spectrum_side(rows: int, cols: int) -> str:
    """``right`` (Gram ``W^T W``, ``n x n``) for ``m >= n``, else ``left`` (``W W^T``)."""
    return "right" if rows >= cols else "left"


def assign_owners(shapes: Sequence[tuple[int, int]], world_size: int) -> list[int]:
    """The owner rank of each matrix: longest eigensolve first, each to the rank with the least
    eigensolve work so far (``sum d^3``, ``d = min(m, n)``), ties to the fewest bytes received
    (``sum m n``), then to the lowest rank. A function of the shapes alone: every rank gets the
    same answer without communicating."""
    order = sorted(
        range(len(shapes)), key=lambda i: (-(min(shapes[i]) ** 3), -math.prod(shapes[i]), i)
    )
    load = [(0, 0)] * world_size
    owners = [0] * len(shapes)
    for index in order:
        owner = min(range(world_size), key=lambda r: (load[r], r))
        owners[index] = owner
        rows, cols = shapes[index]
        load[owner] = (load[owner][0] + min(rows, cols) ** 3, load[owner][1] + rows * cols)
    return owners


def row_block(cols: int, local_max: int, world: int) -> int:
    """Rows of every rank gathered at a time (``right``): the gathered ``R c n`` elements are
    about a quarter of the fp64 Gram's bytes."""
    return max(1, min(local_max, math.ceil(cols / (2 * world))))


def panel_width(rows: int, cols: int) -> int:
    """Columns per panel (``left``): the fp64 ``m x c`` panel is half the fp64 row Gram."""
    return max(1, min(cols, math.ceil(rows / 2)))


def gathered_blocks(rows: int, cols: int, world: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each gathered block: local rows (``right``) or columns (``left``)."""
    local_max = max(rows_per_rank(rows, world))
    if spectrum_side(rows, cols) == "right":
        step, total = row_block(cols, local_max, world), local_max
    else:
        step, total = panel_width(rows, cols), cols
    return [(start, min(total, start + step)) for start in range(0, total, step)]


def factor_chunk(local_rows: int, rank: int) -> int:
    """Rows of ``W_i`` converted to fp64 at a time when forming the factors: ``k`` (32 at
    least), so the fp64 block stays the size of ``down`` in fp64."""
    return max(1, min(local_rows, max(rank, 32)))


# ------------------------------------------------------------------------------ formulas
def owner_spectra_bytes(
    shapes: Sequence[tuple[int, int]], world_size: int, itemsize: int = 4
) -> list[dict[str, int]]:
    """Per rank, what :func:`owner_spectra` moves for matrices of ``shapes`` (in order).

    ``gather``: the bytes :class:`~lowrank_optim.distributed.CollectiveCounter` counts on that
    rank (the block it sends for a matrix it does not own, the ``R`` gathered blocks for one it
    owns); ``all_gather_single``: the singular values' all-gather (fp64, ``R`` padded shares);
    ``sent`` and ``received``: that rank's traffic (a gather to the owner: each other rank sends
    its block once; a ring all-gather: ``(R - 1) / R`` of the payload each way); ``wire``: the
    larger of the two. Every rank's rows are padded to the largest rank's (``torch.chunk``)."""
    owners = assign_owners(shapes, world_size)
    share = [0] * world_size
    for shape, owner in zip(shapes, owners, strict=True):
        share[owner] += min(shape)
    values = world_size * max(share) * F64_BYTES
    ring = round((world_size - 1) / world_size * values)
    out = []
    for me in range(world_size):
        counted = sent = received = 0
        for (rows, cols), owner in zip(shapes, owners, strict=True):
            block = max(rows_per_rank(rows, world_size)) * cols * itemsize
            if owner == me:
                counted += world_size * block
                received += (world_size - 1) * block
            else:
                counted += block
                sent += block
        out.append(
            {
                "gather": counted,
                "all_gather_single": values,
                "sent": sent + ring,
                "received": received + ring,
                "wire": max(sent, received) + ring,
            }
        )
    return out


def owner_gram_peak(rows: int, cols: int, world: int, itemsize: int) -> int:
    """Live bytes while the owner builds and decomposes one Gram (``d = min(m, n)``)."""
    d = min(rows, cols)
    local_max = max(rows_per_rank(rows, world))
    gram = d * d * F64_BYTES
    if spectrum_side(rows, cols) == "right":
        block = row_block(cols, local_max, world)
        building = world * block * cols * itemsize + block * cols * (itemsize + F64_BYTES)
    else:
        width = panel_width(rows, cols)
        building = local_max * width * itemsize * (world + 1) + rows * width * F64_BYTES
    return gram + max(building, gram + d * F64_BYTES)


def owner_spectra_peak_bytes(
    shapes: Sequence[tuple[int, int]],
    world_size: int,
    keep: Sequence[int] | None = None,
    itemsize: int = 4,
) -> list[int]:
    """Per rank, an upper bound on the live bytes :func:`owner_spectra` allocates: the kept
    eigenvectors of the matrices it owns so far (``d x keep``, compute dtype) and their values,
    plus the largest
    of one owned Gram's build and eigensolve (:func:`owner_gram_peak`), one non-owned block (its
    rows, padded, or a panel copy) and, at the end, the values (every spectrum, fp64, and the
    all-gather's buffers)."""
    owners = assign_owners(shapes, world_size)
    keep = list(keep) if keep is not None else [0] * len(shapes)
    compute = max(itemsize, 4)
    share = [0] * world_size
    for shape, owner in zip(shapes, owners, strict=True):
        share[owner] += min(shape)
    out = []
    for me in range(world_size):
        held = peak = 0
        for (rows, cols), owner, kept in zip(shapes, owners, keep, strict=True):
            local_max = max(rows_per_rank(rows, world_size))
            if owner == me:
                peak = max(peak, held + owner_gram_peak(rows, cols, world_size, itemsize))
                d = min(rows, cols)
                held += d * min(kept, d) * compute + d * F64_BYTES  # vectors kept, values
            else:
                width = gathered_blocks(rows, cols, world_size)[0]
                block = (width[1] - width[0]) * (cols if rows >= cols else local_max)
                peak = max(peak, held + block * itemsize)
        every = sum(min(shape) for shape in shapes) * F64_BYTES
        peak = max(peak, held + every + (world_size + 1) * max(share) * F64_BYTES)
        out.append(peak)
    return out


def shared_factors_bytes(rows: int, cols: int, rank: int, itemsize: int = 4) -> dict[str, int]:
    """Payload of :func:`shared_factors`: the ``broadcast`` of the owner's top ``rank`` vectors
    (compute dtype) and, for a ``left`` matrix, the ``all_reduce`` of ``U_k^T W`` (``k x n``,
    fp64)."""
    compute = max(itemsize, 4)
    if spectrum_side(rows, cols) == "right":
        return {"broadcast": cols * rank * compute, "all_reduce": 0}
    return {"broadcast": rows * rank * compute, "all_reduce": rank * cols * F64_BYTES}


def shared_factors_peak_bytes(
    rows: int, cols: int, rank: int, world_size: int, itemsize: int = 4
) -> int:
    """Largest sum of live tensors :func:`shared_factors` allocates on the busiest rank: the
    broadcast vectors, their fp64 copy and scaled copy (``right``) or this rank's rows of them
    and the ``k x n`` fp64 product (``left``), an fp64 row chunk of ``W_i`` and the factors."""
    local = max(rows_per_rank(rows, world_size))
    compute = max(itemsize, 4)
    factors = (local * rank + rank * cols) * itemsize
    chunk = factor_chunk(local, rank)
    if spectrum_side(rows, cols) == "right":
        vectors = cols * rank * (compute + 2 * F64_BYTES)
        loop = cols * rank * F64_BYTES + chunk * (cols + rank) * F64_BYTES
        return max(vectors, loop) + factors
    fixed = rows * rank * compute + local * rank * (itemsize + F64_BYTES) + rank * cols * F64_BYTES
    return fixed + max(chunk * cols * F64_BYTES, rank * cols * itemsize)
