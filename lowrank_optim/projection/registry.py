"""Registry of basis-refresh methods, so a group can name its method with a plain string.

A refresh method maps a matrix ``A`` (fp32, ``d x k``) to an orthonormal basis of ``r`` columns
that approximately spans ``A``'s dominant left singular subspace. Keeping the method a string in
the param group (not a callable) is what lets optimizer state and param groups round-trip through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = [
    "RefreshMethod",
    "available_refresh_methods",
    "get_refresh_method",
    "register_refresh_method",
]


class RefreshMethod(Protocol):
    def __call__(
        self,
        matrix: torch.Tensor,
        rank: int,
        previous: torch.Tensor | None,
        *,
        power_iters: int,
        oversample: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Return a ``matrix.shape[0] x rank`` basis with orthonormal columns."""
        ...


_METHODS: dict[str, RefreshMethod] = {}


def register_refresh_method(name: str, method: RefreshMethod, *, overwrite: bool = False) -> None:
    """Make ``method`` available to param groups as ``refresh=name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid refresh method name: {name!r}; must be a non-empty string")
    if name in _METHODS and not overwrite:
        raise ValueError(f"Refresh method {name!r} is already registered; pass overwrite=True")
    _METHODS[name] = method


def available_refresh_methods() -> tuple[str, ...]:
    return tuple(sorted(_METHODS))


def get_refresh_method(name: str) -> RefreshMethod:
    try:
        return _METHODS[name]
    except KeyError:
        allowed = ", ".join(available_refresh_methods())
        raise ValueError(f"Invalid refresh: {name!r}; allowed: {allowed}") from None
