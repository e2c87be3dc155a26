"""Errors raised by the optimizers, each naming the parameter it concerns."""

from __future__ import annotations

__all__ = ["CheckpointMismatchError", "NonFiniteGradientError", "SubspaceRefreshError"]


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or Inf; stepping on it would corrupt the weights and moments."""


class SubspaceRefreshError(RuntimeError):
    """The basis refresh failed (an SVD that did not converge, or a non-finite basis)."""


class CheckpointMismatchError(ValueError):
    """An optimizer state dict was saved under another configuration or for other shapes."""
