"""WeLore's factorization of a row-sharded weight, without gathering the weight.

Under FSDP2 (``fully_shard``) a weight ``W`` (``m x n``) is ``Shard(0)``: rank ``i`` of ``R``
holds the rows ``W_i`` (``torch.chunk`` layout, trailing ranks may hold fewer or none). This
module computes, on every rank, the factors of its truncated SVD ``W ~ U_k S_k V_k^T`` in
WeLore's form (:class:`~lowrank_optim.factorize.LowRankLinear`): ``up = U_k S_k^1/2``
(row-sharded like ``W``: rank ``i`` gets ``up_i``, the same rows) and ``down = S_k^1/2 V_k^T``
(``k x n``, replicated: identical bits on every rank). No rank ever holds ``W`` whole. Two
routes, each a handful of collectives:

``gram`` (narrow ``n``): ``W^T W = sum_i W_i^T W_i``. One all-reduce of the ``n x n`` Gram
    matrix, in fp64: the Gram squares the condition number, so fp32 (relative error ~1e-7 on
    ``sigma^2``) would leave singular values below ~3e-4 of the largest, exactly the tail WeLore's
    min/max normalization looks at, with no correct digit; fp64 keeps them to ~1e-8 of the
    largest, below fp32's own resolution of ``W``. ``eigh`` gives ``V`` and ``S^2`` on every rank,
    ``down = S_k^1/2 V_k^T``, and ``up_i = W_i V_k S_k^-1/2`` from the local rows alone (no further
    communication). Values at the noise floor (``sigma <= sqrt(n eps_64) sigma_max``) carry no
    direction: their columns of ``up`` and rows of ``down`` are set to zero instead of dividing
    by a near-zero ``sqrt(sigma)`` (their term ``sigma u v^T`` is below the tolerance anyway).
``sketch`` (wide ``n``, rank ``k`` known; Halko, Martinsson and Tropp, 2011): a randomized range
    finder with ``l = k + p`` columns. ``Omega`` (``n x l``) is drawn from a generator seeded
    identically on every rank (so it is never sent), panel by panel; ``Y_i = W_i Omega`` is local.
    ``Y`` is orthonormalized by a tall-skinny QR: each rank factors ``Y_i = Q_i R_i``, the
    ``l x l`` ``R_i`` are all-gathered, every rank factors the stacked ``R`` blocks the same way
    (``[R_1; ...; R_R] = Q' R``), and ``Q_i <- Q_i Q'_i``. ``q`` power iterations
    (``Z = orth(W^T Q)``, ``Q = orth(W Z)``, one all-reduce of ``n x l`` each) sharpen the range
    to ``(sigma_{l+1} / sigma_k)^{2q+1}``. Then the ``l x n`` sketch ``B = Q^T W =
    sum_i Q_i^T W_i`` is all-reduced and its small SVD ``B = U~ S V^T`` gives
    ``up_i = Q_i U~_k S_k^1/2`` and ``down = S_k^1/2 V_k^T``.

The full spectrum of a sharded weight, for WeLore's threshold, is
:mod:`lowrank_optim.distributed.spectrum_routes` (every rank: the same fp64 Gram, or the row Gram
from column panels) or :mod:`lowrank_optim.distributed.spectra` (one owner rank per matrix); both
build on the helpers here (:func:`all_reduced_gram`, :class:`Ledger`, :func:`noise_floor`).

:func:`choose_factorization` picks ``gram`` or ``sketch`` by bytes moved among the routes whose
per-rank peak stays below one full weight (:func:`gram_factorize_bytes`,
:func:`sketch_factorize_bytes` and the ``*_peak_bytes`` formulas are public). Every function
reports the peak of what it allocated (``peak_bytes``: the sum of the live tensors it created,
the caller's local rows not counted), so tests assert the memory bound from tensor sizes, not
timings.

Limits, stated by the formulas: the sketch holds a few ``n x l`` blocks (the all-reduced
``W^T Q``, its orthonormal copy, the sketch's right singular vectors), so it stays below one
weight while ``l`` is below about ``m / 8`` (LLaMA-1B in fp32 at ``k = 128``: 0.4-0.6 of a
weight; at ``k = 512``: 1.2-2.2); all-reducing those blocks in column panels would remove that
term. The sketch is exact to ``(sigma_{l+1} / sigma_k)^(2q+1)``: good for the heavy-tailed
layers WeLore hands off, poor for a flat spectrum, where ``strategy="gram"`` is the exact choice.

Every rank calls every function with the same arguments (the same matrices in the same order):
the collectives must line up. Under ``Shard(0)`` every rank holds rows of every matrix, and the
all-reduced Gram (or sketch) is bit-identical on every rank, as is the deterministic LAPACK call
on it, so ``down`` is identical everywhere without any further all-gather (the tests check it by
gathering it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lowrank_optim.distributed.sharding import local_rows_of, rows_per_rank

__all__ = [
    "FACTORIZE_STRATEGIES",
    "Ledger",
    "ShardedFactors",
    "all_reduced_gram",
    "check_strategy",
    "choose_factorization",
    "factorize_sharded",
    "gram_factorize_bytes",
    "gram_peak_bytes",
    "gram_row_chunk",
    "rows_times",
    "noise_floor",
    "panel_cols",
    "sketch_factorize_bytes",
    "sketch_peak_bytes",
    "weight_gather_bytes",
]

FACTORIZE_STRATEGIES = ("auto", "gram", "sketch")
_F64 = 8  # bytes of an fp64 element


# ------------------------------------------------------------------------- byte formulas
def weight_gather_bytes(rows: int, cols: int, world_size: int, itemsize: int = 4) -> int:
    """Payload of gathering the whole weight (the route this module avoids): ``R`` padded blocks."""
    return max(rows_per_rank(rows, world_size)) * world_size * cols * itemsize


def gram_factorize_bytes(cols: int) -> int:
    """Payload of the ``gram`` route's one all-reduce: the ``n x n`` fp64 Gram matrix."""
    return cols * cols * _F64


def sketch_factorize_bytes(
    cols: int,
    rank: int,
    world_size: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    itemsize: int = 4,
    rows: int | None = None,
) -> int:
    """Payload of the ``sketch`` route: ``q + 1`` tall-skinny QRs (one of the sketch, one per
    power iteration: an all-gather of ``R`` ``l x l`` blocks each) and ``q + 1`` all-reduces of
    ``n x l`` (``q`` power iterations and the final sketch), in the compute dtype (``itemsize``,
    fp32 at least). ``rows`` caps ``l``."""
    width = _sketch_width(rank, oversample, rows if rows is not None else cols, cols)
    qr_count = power_iters + 1
    return (qr_count * world_size * width * width + (power_iters + 1) * cols * width) * itemsize


# ------------------------------------------------------------------------- peak formulas
def rows_times(
    local: torch.Tensor, right: torch.Tensor, out: torch.Tensor, chunk: int, ledger: Ledger
) -> None:
    """``out = W_i @ right`` in fp64, ``chunk`` rows of ``W_i`` (``local``) at a time, written in
    ``out``'s dtype: ``up_i = W_i V_k S_k^-1/2`` without an fp64 copy of all the local rows."""
    for start in range(0, local.shape[0], chunk):
        block = local[start : start + chunk].double()
        product = block @ right
        ledger.hold(block, product)
        out[start : start + chunk] = product.to(out.dtype)
        ledger.drop(block, product)


def gram_row_chunk(cols: int, local_rows: int) -> int:
    """Rows of ``W_i`` converted to fp64 at a time: an ``n x n`` block at most."""
    return max(1, min(local_rows, cols))


def panel_cols(cols: int, rows: int) -> int:
    """Columns per panel (gathered, or of ``Omega``): an eighth of the columns, at most ``m``."""
    return max(1, min(cols // 8, rows))


def _sketch_chunk(local_rows: int) -> int:
    """Rows of ``W_i`` converted to the compute dtype at a time in the sketch: an eighth."""
    return max(1, math.ceil(local_rows / 8))


def _sketch_width(rank: int, oversample: int, rows: int, cols: int) -> int:
    return max(1, min(rank + oversample, rows, cols))


def gram_peak_bytes(rows: int, cols: int, rank: int, world_size: int, itemsize: int = 4) -> int:
    """Largest sum of live tensors the ``gram`` route allocates on the busiest rank.

    The fp64 Gram and its eigenvectors (``2 n^2``, plus the eigenvalues), or, after ``eigh``, the
    eigenvectors, an fp64 row chunk of ``W_i``, its product with ``V_k`` and the two factors.
    """
    local = max(rows_per_rank(rows, world_size))
    chunk = gram_row_chunk(cols, local)
    during_eigh = (2 * cols * cols + cols) * _F64
    factors = (local * rank + rank * cols) * itemsize
    after = (cols * cols + cols + 2 * cols * rank + chunk * cols + chunk * rank) * _F64 + factors
    return max(during_eigh, after)


def sketch_peak_bytes(
    rows: int,
    cols: int,
    rank: int,
    world_size: int,
    *,
    oversample: int = 10,
    itemsize: int = 4,
) -> int:
    """Largest sum of live tensors the ``sketch`` route allocates on the busiest rank.

    Bounded by: ``Y_i``/``Q_i`` and their QR (``3 m_i l``), the gathered ``R`` blocks and their
    QR (``(2 R + 3) l^2``), the ``n x l`` all-reduced product, its orthonormal copy and the
    sketch's right singular vectors (``3 n l``), an ``Omega`` panel with its ``W_i`` panel, a
    converted chunk of ``W_i`` rows, the SVD's ``l^2 + l`` and the factors; in the compute dtype
    (``itemsize``).
    """
    local = max(rows_per_rank(rows, world_size))
    width = _sketch_width(rank, oversample, rows, cols)
    elements = (
        3 * local * width
        + (2 * world_size + 3) * width * width
        + 3 * cols * width
        + panel_cols(cols, rows) * (width + local)
        + _sketch_chunk(local) * cols
        + width * width
        + width
        + local * rank
        + rank * cols
    )
    return elements * itemsize


# --------------------------------------------------------------------------- choices
def check_strategy(value: str, allowed: tuple[str, ...], what: str) -> None:
    """Raise ``ValueError`` unless ``value`` (a ``strategy=`` argument) is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"Invalid {what}: {value!r}; allowed: {', '.join(allowed)}")


def choose_factorization(
    rows: int,
    cols: int,
    rank: int,
    world_size: int,
    *,
    itemsize: int = 4,
    oversample: int = 10,
    power_iters: int = 2,
) -> str:
    """``gram`` or ``sketch`` for a rank-``rank`` factorization of a sharded ``rows x cols`` weight.

    Among the routes whose per-rank peak stays below one full weight (``rows cols itemsize``),
    the one that moves fewer bytes on the wire (a ring all-reduce moves about twice its payload,
    an all-gather once, as in :func:`lowrank_optim.distributed.refresh.choose_strategy`); the
    ``sketch`` when neither fits (its peak is ``O((m / R + n) l)``, far below ``m n``).
    """
    compute = max(itemsize, 4)
    weight = rows * cols * itemsize
    width = _sketch_width(rank, oversample, rows, cols)
    sketch_wire = (
        2 * (power_iters + 1) * cols * width + (power_iters + 1) * world_size * width * width
    ) * compute
    gram_wire = 2 * gram_factorize_bytes(cols)
    fits = {
        "gram": gram_peak_bytes(rows, cols, rank, world_size, itemsize) < weight,
        "sketch": sketch_peak_bytes(
            rows, cols, rank, world_size, oversample=oversample, itemsize=compute
        )
        < weight,
    }
    if fits["gram"] and (not fits["sketch"] or gram_wire <= sketch_wire):
        return "gram"
    return "sketch"


# --------------------------------------------------------------------------- accounting
class Ledger:
    """Bytes of the tensors a route created and still holds; ``peak`` is the largest sum."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.peak = 0

    def hold(self, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            self.live[id(tensor)] = tensor.numel() * tensor.element_size()
        self.peak = max(self.peak, sum(self.live.values()))

    def drop(self, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            self.live.pop(id(tensor), None)

    def transient(self, nbytes: int) -> None:
        """A temporary of ``nbytes`` alive on top of what is held (LAPACK's copy of its input)."""
        self.peak = max(self.peak, sum(self.live.values()) + nbytes)


@dataclass
class ShardedFactors:
    """``up`` (this rank's rows, ``m_i x k``), ``down`` (``k x n``, replicated), the top
    singular values the route saw (all of them for ``gram``, the top ``l`` for ``sketch``), the
    route taken, and the peak bytes it allocated on this rank."""

    up: torch.Tensor
    down: torch.Tensor
    values: torch.Tensor
    strategy: str
    peak_bytes: int


# --------------------------------------------------------------------------- helpers
def all_reduced_gram(
    local: torch.Tensor, ledger: Ledger, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """``sum_i W_i^T W_i`` in fp64, formed from row chunks (never all of ``W_i`` in fp64)."""
    cols = local.shape[1]
    gram = torch.zeros(cols, cols, dtype=torch.float64, device=local.device)
    ledger.hold(gram)
    chunk = gram_row_chunk(cols, local.shape[0])
    for start in range(0, local.shape[0], chunk):
        block = local[start : start + chunk].double()
        ledger.hold(block)
        gram.addmm_(block.T, block)
        ledger.drop(block)
    dist.all_reduce(gram, group=group)
    return gram


def noise_floor(values: torch.Tensor, cols: int) -> float:
    """Singular values at or below this carry no direction (fp64 Gram resolution)."""
    top = float(values.max()) if values.numel() else 0.0
    return math.sqrt(cols * torch.finfo(torch.float64).eps) * top


# ------------------------------------------------------------------------- factorization
def factorize_sharded(
    weight: torch.Tensor,
    rank: int,
    *,
    rows: int | None = None,
    group: dist.ProcessGroup | None = None,
    strategy: str = "auto",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> ShardedFactors:
    """WeLore's factors of the row-sharded ``weight`` at ``rank``, without gathering it.

    Returns this rank's rows of ``up = U_k S_k^1/2`` and the replicated ``down = S_k^1/2 V_k^T``,
    in the weight's dtype (see the module docstring for the routes). ``strategy``: ``auto``
    (:func:`choose_factorization`), ``gram`` or ``sketch``; ``oversample``, ``power_iters`` and
    ``seed`` (the same on every rank) tune the sketch.
    """
    check_strategy(strategy, FACTORIZE_STRATEGIES, "factorize strategy")
    local, rows, group = local_rows_of(weight, rows, group)
    cols = local.shape[1]
    if not isinstance(rank, int) or not 1 <= rank <= min(rows, cols):
        raise ValueError(f"Invalid rank: {rank!r}; must be an integer in [1, {min(rows, cols)}]")
    if oversample < 0 or power_iters < 0:
        raise ValueError(
            f"Invalid sketch: oversample={oversample!r}, power_iters={power_iters!r}; both >= 0"
        )
    world = dist.get_world_size(group)
    if strategy == "auto":
        strategy = choose_factorization(
            rows,
            cols,
            rank,
            world,
            itemsize=local.element_size(),
            oversample=oversample,
            power_iters=power_iters,
        )
    if strategy == "gram":
        return _gram_factors(local, rank, group)
    return _sketch_factors(local, rows, rank, group, oversample, power_iters, seed)


def _gram_factors(
    local: torch.Tensor, rank: int, group: dist.ProcessGroup | None
) -> ShardedFactors:
    ledger = Ledger()
    cols = local.shape[1]
    gram = all_reduced_gram(local, ledger, group)
    eigen, vectors = torch.linalg.eigh(gram)
    ledger.hold(eigen, vectors)
    ledger.drop(gram)
    del gram
    order = torch.arange(cols - 1, -1, -1, device=local.device)
    values = eigen[order].clamp_min(0.0).sqrt()  # descending
    top = values[:rank]
    keep = top > noise_floor(values, cols)
    root = top.sqrt()
    inverse_root = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    basis = vectors[:, order[:rank]]  # V_k, n x k
    ledger.hold(basis)
    down = (torch.where(keep, root, torch.zeros_like(root))[:, None] * basis.T).to(local.dtype)
    up = local.new_empty(local.shape[0], rank)
    ledger.hold(down, up)
    scaled = basis * inverse_root  # V_k S_k^-1/2
    ledger.hold(scaled)
    ledger.drop(basis)
    rows_times(local, scaled, up, gram_row_chunk(cols, local.shape[0]), ledger)
    return ShardedFactors(up, down, values.float(), "gram", ledger.peak)


def _tsqr(local: torch.Tensor, ledger: Ledger, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's rows of ``Q`` in ``Y = Q R`` for the row-sharded tall ``Y`` (``m x l``).

    Local QR, all-gather of the ``l x l`` ``R`` blocks (a rank with fewer than ``l`` rows pads
    its block with zero rows), the same QR of the stacked blocks on every rank, then
    ``Q_i <- Q_i Q'_i``. Every rank factors the same gathered blocks with the same
    deterministic LAPACK call, so ``Q'`` (signs included) agrees across ranks.
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)
    width = local.shape[1]
    q_local, r_local = torch.linalg.qr(local)  # m_i x min(m_i, l), min(m_i, l) x l
    block = local.new_zeros(width, width)
    block[: r_local.shape[0]] = r_local
    stacked = local.new_empty(world * width, width)
    ledger.hold(q_local, r_local, block, stacked)
    dist.all_gather_single(stacked, block, group=group)
    q_outer, r_outer = torch.linalg.qr(stacked)  # (R l) x l
    ledger.hold(q_outer, r_outer)
    mine = q_outer[me * width : me * width + r_local.shape[0]]
    result = q_local @ mine
    ledger.hold(result)
    ledger.drop(q_local, r_local, block, stacked, q_outer, r_outer)
    return result


def _times_right(local: torch.Tensor, right: torch.Tensor, ledger: Ledger) -> torch.Tensor:
    """``W_i @ right`` in ``right``'s dtype, converting ``W_i`` an eighth of its rows at a time."""
    out = right.new_empty(local.shape[0], right.shape[1])
    ledger.hold(out)
    chunk = _sketch_chunk(local.shape[0])
    for start in range(0, local.shape[0], chunk):
        block = local[start : start + chunk].to(right.dtype)
        ledger.hold(block)
        out[start : start + chunk] = block @ right
        ledger.drop(block)
    return out


def _left_times(left: torch.Tensor, local: torch.Tensor, ledger: Ledger) -> torch.Tensor:
    """``left^T @ W_i`` (``l x n``) in ``left``'s dtype, converting ``W_i`` by row chunks."""
    out = left.new_zeros(left.shape[1], local.shape[1])
    ledger.hold(out)
    chunk = _sketch_chunk(local.shape[0])
    for start in range(0, local.shape[0], chunk):
        block = local[start : start + chunk].to(left.dtype)
        ledger.hold(block)
        out.addmm_(left[start : start + chunk].T, block)
        ledger.drop(block)
    return out


def _sketch_factors(
    local: torch.Tensor,
    rows: int,
    rank: int,
    group: dist.ProcessGroup | None,
    oversample: int,
    power_iters: int,
    seed: int,
) -> ShardedFactors:
    ledger = Ledger()
    compute = torch.promote_types(local.dtype, torch.float32)
    cols = local.shape[1]
    width = _sketch_width(rank, oversample, rows, cols)
    # Omega, panel by panel, from a generator seeded alike on every rank: never communicated.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sketch = torch.zeros(local.shape[0], width, dtype=compute, device=local.device)
    ledger.hold(sketch)
    step = panel_cols(cols, rows)
    for start in range(0, cols, step):
        stop = min(cols, start + step)
        omega = torch.randn(stop - start, width, generator=generator, dtype=compute)
        omega = omega.to(local.device)
        panel = local[:, start:stop].to(compute)
        ledger.hold(omega, panel)
        sketch.addmm_(panel, omega)
        ledger.drop(omega, panel)
    basis = _tsqr(sketch, ledger, group)  # Q_i
    ledger.drop(sketch)
    for _ in range(power_iters):
        across = _left_times(basis, local, ledger)  # Q_i^T W_i, summed to (W^T Q)^T
        dist.all_reduce(across, group=group)
        right = torch.linalg.qr(across.T).Q  # orth(W^T Q): n x l, replicated
        ledger.hold(right)
        ledger.drop(across)
        product = _times_right(local, right, ledger)
        ledger.drop(basis, right)
        basis = _tsqr(product, ledger, group)
        ledger.drop(product)
    small = _left_times(basis, local, ledger)  # this rank's share of B = Q^T W (l x n)
    dist.all_reduce(small, group=group)
    left, values, right_t = torch.linalg.svd(small, full_matrices=False)
    ledger.hold(left, values, right_t)
    ledger.drop(small)
    root = values[:rank].sqrt()
    up = ((basis @ left[:, :rank]) * root).to(local.dtype)
    down = (root[:, None] * right_t[:rank]).to(local.dtype)
    ledger.hold(up, down)
    return ShardedFactors(up, down, values.float(), "sketch", ledger.peak)
