"""Gradient projection: bases, projection maps and refresh methods (exact and randomized)."""

from lowrank_optim.projection.gram import gram_eigh_basis
from lowrank_optim.projection.randomized import randomized_basis
from lowrank_optim.projection.registry import (
    RefreshMethod,
    available_refresh_methods,
    get_refresh_method,
    register_refresh_method,
)
from lowrank_optim.projection.sides import (
    LEFT,
    RIGHT,
    basis_keys,
    effective_rank,
    low_rank_shape,
    project,
    project_back_,
    refresh_target,
    resolve_sides,
    rotate_moments_,
)
from lowrank_optim.projection.svd import svd_basis

__all__ = [
    "LEFT",
    "RIGHT",
    "RefreshMethod",
    "available_refresh_methods",
    "basis_keys",
    "effective_rank",
    "get_refresh_method",
    "gram_eigh_basis",
    "low_rank_shape",
    "project",
    "project_back_",
    "randomized_basis",
    "refresh_target",
    "register_refresh_method",
    "resolve_sides",
    "rotate_moments_",
    "svd_basis",
]
