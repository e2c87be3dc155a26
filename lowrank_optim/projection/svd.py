"""Exact truncated SVD refresh: the reference GaLore uses (Zhao et al., ICML 2024).

The basis is the top-``r`` left singular vectors of ``A``: ``A = U S V^T``, ``P = U[:, :r]``.
It costs a full thin SVD, ``O(d k min(d, k))``, at every refresh.
"""

from __future__ import annotations

import torch

from lowrank_optim.projection.registry import register_refresh_method

__all__ = ["svd_basis"]


def svd_basis(
    matrix: torch.Tensor,
    rank: int,
    previous: torch.Tensor | None = None,
    *,
    power_iters: int = 1,
    oversample: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``matrix`` (fp32 in, fp32 out)."""
    del previous, power_iters, oversample, generator  # an exact SVD needs no warm start
    left, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return left[:, :rank].contiguous()


register_refresh_method("svd", svd_basis)
