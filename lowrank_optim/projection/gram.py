"""Gram-matrix refresh: the top-``r`` eigenvectors of ``A A^T`` (``refresh="gram_eigh"``).

For ``A`` (``d x k``) with thin SVD ``A = U S V^T``, ``A A^T = U S^2 U^T``: its eigenvectors
are ``A``'s left singular vectors and its eigenvalues the squared singular values, so the top-``r``
eigenvectors of the ``d x d`` Gram matrix are the GaLore basis (Zhao et al., ICML 2024) up to
the sign of each column. What makes this method worth having is that a Gram matrix is a *sum
over rows* of the gradient: ``G^T G = sum_k G_k^T G_k`` for any split of ``G`` into row blocks
``G_k``. Under FSDP2, where each rank holds a row block, one all-reduce of the ``n x n`` partial
Gram matrices gives every rank the same input (see :mod:`lowrank_optim.distributed.refresh`);
this module is the single-process form of the same computation, so the two are comparable.

Squaring the spectrum squares the condition number: directions with ``s_i / s_1`` below about
``sqrt(eps)`` (3e-4 in fp32) are resolved poorly. Only the top ``r`` matter here, and
:func:`~lowrank_optim.projection.refresh.compute_bases` retries in fp64 when LAPACK fails.

Signs are canonical (the largest-magnitude entry of every column is positive), so two
computations on Gram matrices that differ by rounding return the same basis up to rounding,
not up to a sign flip, which matters when moments are kept across a refresh.
"""

from __future__ import annotations

import torch

from lowrank_optim.projection.registry import register_refresh_method

__all__ = ["canonical_signs", "gram_eigh_basis", "gram_top_eigenvectors"]


def canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """``basis`` with each column's sign chosen so its largest-magnitude entry is positive."""
    if basis.numel() == 0:
        return basis
    rows = basis.abs().argmax(dim=0)
    signs = torch.sign(basis.gather(0, rows.unsqueeze(0)))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return basis * signs


def gram_top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors of a symmetric PSD ``gram``, by decreasing eigenvalue."""
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return canonical_signs(vectors[:, -rank:].flip(-1)).contiguous()


def gram_eigh_basis(
    matrix: torch.Tensor,
    rank: int,
    previous: torch.Tensor | None = None,
    *,
    power_iters: int = 1,
    oversample: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``matrix`` from ``eigh(matrix matrix^T)``."""
    del previous, power_iters, oversample, generator  # exact: no warm start, no randomness
    return gram_top_eigenvectors(matrix @ matrix.T, rank)


register_refresh_method("gram_eigh", gram_eigh_basis)
