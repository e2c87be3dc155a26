"""Which side of a matrix is projected, and the projection maps themselves.

For ``W`` of shape ``m x n`` with gradient ``G`` and effective rank ``r``:

* ``left``:  ``R = P^T G`` (``r x n``), back: ``P R``; ``P`` (``m x r``) spans ``G``'s columns.
* ``right``: ``R = G Q`` (``m x r``), back: ``R Q^T``; ``Q`` (``n x r``) spans ``G``'s rows.
* ``full``:  ``R = P^T G Q`` (``r x r``), back: ``P R Q^T``.

``std`` (galore-torch's default) projects onto the smaller side: ``left`` when ``m < n``, else
``right``, so the moments have ``max(m, n) x r`` entries and the basis ``min(m, n) x r``.
``reverse_std`` does the opposite.
"""

from __future__ import annotations

import torch

from lowrank_optim.state_keys import LEFT, RIGHT

__all__ = [
    "LEFT",
    "RIGHT",
    "basis_keys",
    "effective_rank",
    "low_rank_shape",
    "project",
    "project_back_",
    "refresh_target",
    "resolve_sides",
    "rotate_moments_",
]


def resolve_sides(proj_type: str, shape: torch.Size | tuple[int, int]) -> tuple[bool, bool]:
    """``(uses_left, uses_right)`` for a matrix of ``shape`` under ``proj_type``."""
    rows, cols = shape
    if proj_type == "std":
        return (rows < cols, rows >= cols)
    if proj_type == "reverse_std":
        return (rows >= cols, rows < cols)
    if proj_type == "left":
        return (True, False)
    if proj_type == "right":
        return (False, True)
    if proj_type == "full":
        return (True, True)
    raise ValueError(
        f"Invalid proj_type: {proj_type!r}; allowed: std, reverse_std, left, right, full"
    )


def basis_keys(proj_type: str, shape: torch.Size | tuple[int, int]) -> tuple[str, ...]:
    uses_left, uses_right = resolve_sides(proj_type, shape)
    return tuple(k for k, used in ((LEFT, uses_left), (RIGHT, uses_right)) if used)


def effective_rank(rank: int, shape: torch.Size | tuple[int, int]) -> int:
    """Rank clipped to ``min(m, n)``: a larger rank cannot add directions."""
    return min(rank, *shape)


def low_rank_shape(
    proj_type: str, shape: torch.Size | tuple[int, int], rank: int
) -> tuple[int, int]:
    uses_left, uses_right = resolve_sides(proj_type, shape)
    rows, cols = shape
    return (rank if uses_left else rows, rank if uses_right else cols)


def refresh_target(grad: torch.Tensor, key: str) -> torch.Tensor:
    """The fp32 matrix whose dominant left singular vectors form the basis stored under ``key``."""
    matrix = grad.float()
    return matrix if key == LEFT else matrix.T


def project(grad: torch.Tensor, bases: dict[str, torch.Tensor]) -> torch.Tensor:
    """Low-rank coordinates of ``grad`` in the given bases."""
    low = grad
    if LEFT in bases:
        low = bases[LEFT].T @ low
    if RIGHT in bases:
        low = low @ bases[RIGHT]
    return low


def project_back_(
    param: torch.Tensor,
    low: torch.Tensor,
    bases: dict[str, torch.Tensor],
    alpha: float,
    beta: float = 1.0,
) -> None:
    """``param = beta * param + alpha * back(low)`` in one ``addmm_`` where the shapes allow.

    Folding ``beta`` (decoupled weight decay, ``1 - lr * wd``) into the GEMM saves a full pass
    over the weight.
    """
    left, right = bases.get(LEFT), bases.get(RIGHT)
    if left is not None and right is not None:
        param.addmm_(left, low @ right.T, beta=beta, alpha=alpha)
    elif left is not None:
        param.addmm_(left, low, beta=beta, alpha=alpha)
    elif right is not None:
        param.addmm_(low, right.T, beta=beta, alpha=alpha)
    else:
        if beta != 1.0:
            param.mul_(beta)
        param.add_(low, alpha=alpha)


def rotate_moments_(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    old_bases: dict[str, torch.Tensor],
    new_bases: dict[str, torch.Tensor],
) -> None:
    """Carry low-rank Adam moments from the old bases into the new ones, in place.

    With ``C = P_new^T P_old`` (``r x r``), a first moment ``M`` in old coordinates becomes
    ``C M``: the part of the old subspace that the new one still sees, expressed in new
    coordinates (for the right side, ``M C^T``). The second moment is not linear in the
    gradient; assuming uncorrelated coordinates, ``E[(C g)_i^2] = sum_j C_ij^2 E[g_j^2]``, so it
    is carried by ``C o C`` (elementwise square), which also keeps it non-negative. Directions
    the new basis adds start with zero moments, as a fresh Adam state would.
    """
    for key, new in new_bases.items():
        old = old_bases.get(key)
        if old is None:
            continue
        compute = torch.promote_types(exp_avg.dtype, torch.float32)  # fp32 at least, fp64 kept
        change = (new.T.to(compute) @ old.to(compute)).to(exp_avg.dtype)
        squared = change.square()
        if key == LEFT:
            exp_avg.copy_(change @ exp_avg)
            exp_avg_sq.copy_(squared @ exp_avg_sq)
        else:
            exp_avg.copy_(exp_avg @ change.T)
            exp_avg_sq.copy_(exp_avg_sq @ squared.T)
