"""Fast refresh: randomized range finder with subspace iteration, warm-started from the old basis.

Halko, Martinsson & Tropp (2011), "Finding structure with randomness", Alg. 4.4. For a matrix
``A`` (``d x k``) and target rank ``r``:

* cold start: ``Y = A Omega`` with a Gaussian ``Omega`` of ``r + p`` columns;
* warm start: ``Y = [P_old, A Omega_p]``, the previous basis plus ``p`` random directions;
  gradient subspaces drift slowly between refreshes (that is the premise of GaLore's lazy
  refresh), so one iteration from the old basis already lands close to the new dominant
  subspace, and the random columns pick up directions that newly entered it;
* ``q`` iterations of ``Y <- A (A^T Q)`` with ``Q = qr(Y)``, re-orthonormalized each time so that
  small singular directions are not washed out in floating point;
* Rayleigh-Ritz: ``B = Q^T A``, ``B = U_B S_B V_B^T``, basis ``Q U_B[:, :r]``, which orders the
  directions by singular value (so "the first singular vector" is meaningful) and drops the
  oversampled ones.

Each iteration is two ``d x k x r`` products, ``O(dkr)``, against ``O(dk min(d, k))`` for the
exact SVD; the Rayleigh-Ritz SVD is of an ``(r + p) x k`` matrix.
"""

from __future__ import annotations

import torch

from lowrank_optim.projection.registry import register_refresh_method

__all__ = ["randomized_basis"]


def _orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix, mode="reduced").Q


def randomized_basis(
    matrix: torch.Tensor,
    rank: int,
    previous: torch.Tensor | None = None,
    *,
    power_iters: int = 1,
    oversample: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Approximate top-``rank`` left singular vectors of ``matrix`` in ``O(d k r)``."""
    rows, cols = matrix.shape
    warm = previous is not None and previous.shape == (rows, rank)
    # A warm start keeps the old basis and adds `oversample` fresh random directions, which
    # catch directions that entered the dominant subspace since the last refresh.
    width = min(oversample if warm else rank + oversample, cols)
    omega = torch.randn(cols, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    sketch = matrix @ omega
    if warm:
        sketch = torch.cat([previous.to(matrix.dtype), sketch], dim=1)
    for _ in range(power_iters):
        sketch = matrix @ (matrix.T @ _orthonormalize(sketch))
    basis = _orthonormalize(sketch)
    ritz_left, _, _ = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ ritz_left[:, :rank]).contiguous()


register_refresh_method("randomized", randomized_basis)
