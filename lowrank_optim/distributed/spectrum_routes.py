"""WeLore's spectra of a row-sharded weight, computed on every rank, without gathering the weight.

Under FSDP2 (``fully_shard``) a weight ``W`` (``m x n``) is ``Shard(0)``: rank ``i`` of ``R``
holds the rows ``W_i`` (``torch.chunk`` layout, trailing ranks may hold fewer or none). This
module computes, on every rank, all ``min(m, n)`` singular values of ``W`` (WeLore's threshold
needs the whole normalized spectrum). No rank ever holds ``W`` whole. Two routes:

``gram`` (narrow ``n``): the fp64 ``n x n`` Gram ``W^T W = sum_i W_i^T W_i``, all-reduced once
    (:func:`lowrank_optim.distributed.factorize.all_reduced_gram`, fp64 for the reason the
    factorization gives: the Gram squares the condition number), and ``eigvalsh`` of it.
``panels`` (wide ``n``): the sketch of :mod:`lowrank_optim.distributed.factorize` only sees the
    top ``l`` values, and the ``n x n`` Gram outweighs the weight, so the ``m x m`` row Gram
    ``W W^T`` is accumulated from column panels ``W[:, J]`` (all-gathered, ``m x c`` each, never
    more than one at a time); ``eigvalsh`` gives every singular value exactly. It moves the
    weight's bytes once, in pieces, but no rank holds more than one panel of it.

:func:`choose_spectrum` picks ``gram`` or ``panels`` by bytes moved among the routes whose
per-rank peak stays below one full weight (:func:`panel_spectrum_bytes` and
:func:`panel_spectrum_peak_bytes` are public). :func:`sharded_spectrum` reports the peak of what
it allocated (``peak_bytes``: the sum of the live tensors it created, the caller's local rows
not counted). An exact full spectrum needs a dense ``min(m, n)``-square eigensolve, which for
square matrices is weight-sized whatever the route; :func:`choose_spectrum` says so.

Every rank calls every function with the same arguments (the same matrices in the same order):
the collectives must line up. The all-reduced Gram (or panel-gathered row Gram) is bit-identical
on every rank, as is the deterministic LAPACK call on it, so the singular values and the WeLore
ranks chosen from them are identical everywhere without any further all-gather (the tests check
it by gathering them). That costs every rank a Gram all-reduce (or the weight's panels) per
matrix: for all of WeLoreAdamW's candidates at a check step,
:mod:`lowrank_optim.distributed.spectra` gives each matrix one owner rank instead, and one
all-gather of the (small) singular-value vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lowrank_optim.distributed.factorize import (
    Ledger,
    all_reduced_gram,
    check_strategy,
    gram_factorize_bytes,
    gram_row_chunk,
    panel_cols,
    weight_gather_bytes,
)
from lowrank_optim.distributed.sharding import local_rows_of, rows_per_rank

__all__ = [
    "SPECTRUM_STRATEGIES",
    "ShardedSpectrum",
    "choose_spectrum",
    "panel_spectrum_bytes",
    "panel_spectrum_peak_bytes",
    "sharded_spectra",
    "sharded_spectrum",
]

SPECTRUM_STRATEGIES = ("auto", "gram", "panels")
_F64 = 8  # bytes of an fp64 element


# ------------------------------------------------------------------- byte and peak formulas
def panel_spectrum_bytes(rows: int, cols: int, world_size: int, itemsize: int = 4) -> int:
    """Payload of the ``panels`` spectrum: every column panel gathered once (the weight's bytes,
    padded to equal row blocks), in pieces."""
    return weight_gather_bytes(rows, cols, world_size, itemsize)


def panel_spectrum_peak_bytes(rows: int, cols: int, world_size: int, itemsize: int = 4) -> int:
    """Largest sum of live tensors the ``panels`` spectrum allocates: the fp64 ``m x m`` row Gram
    (twice while ``eigvalsh`` works on its copy), one gathered panel (padded) and its fp64 copy."""
    padded = max(rows_per_rank(rows, world_size)) * world_size
    panel = panel_cols(cols, rows)
    return (2 * rows * rows + rows) * _F64 + padded * panel * (2 * itemsize + _F64)


def _gram_spectrum_peak_bytes(rows: int, cols: int, world_size: int) -> int:
    local = max(rows_per_rank(rows, world_size))
    chunk = gram_row_chunk(cols, local)
    return (2 * cols * cols + cols + chunk * cols) * _F64


# --------------------------------------------------------------------------- choice
def choose_spectrum(rows: int, cols: int, world_size: int, itemsize: int = 4) -> str:
    """``gram`` or ``panels`` for the full spectrum of a sharded ``rows x cols`` weight.

    Among the routes whose peak stays below one full weight, the one moving fewer bytes (the
    Gram's all-reduce about twice ``8 n^2`` on the wire, the panels about ``m n itemsize``); if
    neither fits, the one with the smaller peak. An exact full spectrum needs a dense
    ``min(m, n)``-square eigensolve on some rank, so it fits below the weight only for clearly
    rectangular matrices (``n`` below about ``m / 4``, or above about ``4 m``); for square ones
    its peak is a few weights' worth (the factorization itself never is: see
    :func:`lowrank_optim.distributed.factorize.choose_factorization`).
    """
    weight = rows * cols * itemsize
    peaks = {
        "gram": _gram_spectrum_peak_bytes(rows, cols, world_size),
        "panels": panel_spectrum_peak_bytes(rows, cols, world_size, itemsize),
    }
    wire = {
        "gram": 2 * gram_factorize_bytes(cols),
        "panels": panel_spectrum_bytes(rows, cols, world_size, itemsize),
    }
    fitting = [name for name in ("gram", "panels") if peaks[name] < weight]
    if fitting:
        return min(fitting, key=lambda name: wire[name])
    return min(peaks, key=lambda name: peaks[name])


# --------------------------------------------------------------------------- spectrum
@dataclass
class ShardedSpectrum:
    """Every singular value of the weight (fp64, descending), the route, and its peak bytes."""

    values: torch.Tensor
    strategy: str
    peak_bytes: int


def sharded_spectrum(
    weight: torch.Tensor,
    *,
    rows: int | None = None,
    group: dist.ProcessGroup | None = None,
    strategy: str = "auto",
) -> ShardedSpectrum:
    """All ``min(m, n)`` singular values of the row-sharded ``weight``, identical on every rank.

    ``weight``: a ``Shard(0)`` DTensor, or this rank's rows with the global ``rows`` and the
    process ``group``. ``strategy``: ``auto`` (:func:`choose_spectrum`), ``gram`` or ``panels``.
    """
    check_strategy(strategy, SPECTRUM_STRATEGIES, "spectrum strategy")
    local, rows, group = local_rows_of(weight, rows, group)
    cols = local.shape[1]
    world = dist.get_world_size(group)
    if strategy == "auto":
        strategy = choose_spectrum(rows, cols, world, local.element_size())
    ledger = Ledger()
    if strategy == "gram":
        gram = all_reduced_gram(local, ledger, group)
        eigen = torch.linalg.eigvalsh(gram)
        ledger.hold(eigen, torch.empty_like(gram))  # LAPACK works on a copy of its input
    else:
        gram = _row_gram(local, rows, ledger, group)
        eigen = torch.linalg.eigvalsh(gram)
        ledger.hold(eigen, torch.empty_like(gram))
    values = eigen.flip(0)[: min(rows, cols)].clamp_min(0.0).sqrt()
    return ShardedSpectrum(values, strategy, ledger.peak)


def _row_gram(
    local: torch.Tensor, rows: int, ledger: Ledger, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """``W W^T`` (``m x m``, fp64) from all-gathered column panels, one panel alive at a time."""
    world = dist.get_world_size(group)
    counts = rows_per_rank(rows, world)
    chunk = max(counts)
    cols = local.shape[1]
    gram = torch.zeros(rows, rows, dtype=torch.float64, device=local.device)
    ledger.hold(gram)
    width = panel_cols(cols, rows)
    for start in range(0, cols, width):
        stop = min(cols, start + width)
        mine = local.new_zeros(chunk, stop - start)
        mine[: local.shape[0]] = local[:, start:stop]
        gathered = local.new_empty(chunk * world, stop - start)
        ledger.hold(mine, gathered)
        dist.all_gather_single(gathered, mine, group=group)
        panel = torch.cat([gathered[r * chunk : r * chunk + counts[r]] for r in range(world)])
        panel = panel.double()
        ledger.hold(panel)
        gram.addmm_(panel, panel.T)
        ledger.drop(mine, gathered, panel)
    return gram


def sharded_spectra(
    weights: Mapping[str, torch.Tensor],
    *,
    rows: Mapping[str, int] | None = None,
    group: dist.ProcessGroup | None = None,
    strategy: str = "auto",
) -> dict[str, torch.Tensor]:
    """Singular values (fp32, descending) of every row-sharded weight, in the given order.

    Feed them to :func:`lowrank_optim.factorize.plan_ranks` or
    :func:`lowrank_optim.handoff.choose_ranks`: they are identical on every rank, so every rank
    chooses the same WeLore threshold and ranks.
    """
    return {
        name: sharded_spectrum(
            weight, rows=None if rows is None else rows[name], group=group, strategy=strategy
        ).values.float()
        for name, weight in weights.items()
    }
