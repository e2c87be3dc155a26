"""Per-layer gradient-subspace stabilization: metrics, stability criterion, adaptive refresh gap.

WeLore (Jaiswal et al., ICML 2025) observes that each layer's gradient subspace settles at its
own pace, and that the layers whose subspace settles are the ones that end up low-rank. At every
basis refresh we record, per projected matrix:

* the subspace overlap ``o = ||P_old^T P_new||_F^2 / r``: the mean squared cosine of the
  principal angles between the old and new ``r``-dimensional subspaces. It is 1 for the same
  subspace and about ``r / d`` for two random ones in ``d`` dimensions, and it is invariant to
  sign flips and rotations of the basis vectors (unlike comparing single singular vectors);
* the captured energy ``||P^T G||_F^2 / ||G||_F^2`` of the first gradient after the refresh,
  i.e. how much of a fresh gradient the new basis actually sees;
* Q-GaLore's signal, ``|cos(p_old_1, p_new_1)|`` of the leading vectors.

A refresh policy turns these into the next refresh gap. The state is the latest value of each
metric and the criterion's counters, all plain Python numbers, so it survives checkpoints and
adds no tensor bytes to the optimizer state: GaLoreAdamW's state tensors are exactly galore-torch's
(moments and bases). Only the ``qgalore`` policy keeps a tensor, the window of its last
``qgalore_window`` leading-vector similarities. The history over training is the
:class:`~lowrank_optim.reporting.MetricsWriter` log, not optimizer state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from lowrank_optim.config import StabilityConfig

__all__ = [
    "CAPTURED_ENERGY",
    "LAST_OVERLAP",
    "LEADING_SIMILARITY",
    "LEADING_WINDOW",
    "STABILITY_FLOAT_KEYS",
    "STABLE_SINCE",
    "STABLE_STREAK",
    "FixedGapPolicy",
    "OverlapPolicy",
    "QGaLorePolicy",
    "RefreshPolicy",
    "captured_energy",
    "init_stability_state",
    "leading_vector_similarity",
    "make_policy",
    "record_captured_energy_",
    "record_refresh_metrics_",
    "subspace_overlap",
    "update_stability_",
    "upgrade_legacy_metrics",
]

LAST_OVERLAP = "last_overlap"  # float: overlap at the last refresh (nan before the second)
CAPTURED_ENERGY = "captured_energy"  # float: energy of the first gradient after a refresh
LEADING_SIMILARITY = "leading_similarity"  # float: Q-GaLore's signal at the last refresh
LEADING_WINDOW = "leading_similarity_window"  # fp32 tensor, qgalore policy only
STABLE_STREAK = "stable_streak"
STABLE_SINCE = "stable_since"
GROWTHS_PENDING = "refreshes_since_growth"

#: Float state that must stay fp32 whatever the parameter's dtype.
STABILITY_FLOAT_KEYS = frozenset({LEADING_WINDOW})


def subspace_overlap(old: torch.Tensor, new: torch.Tensor) -> float:
    """``||P_old^T P_new||_F^2 / r`` for orthonormal ``d x r`` bases; in ``[0, 1]``."""
    cross = old.float().T @ new.float()
    return float(cross.square().sum() / new.shape[1])


def leading_vector_similarity(old: torch.Tensor, new: torch.Tensor) -> float:
    """Q-GaLore's similarity, but sign-invariant: ``|cos|`` of the first basis vectors."""
    first_old, first_new = old[:, 0].float(), new[:, 0].float()
    cosine = torch.dot(first_old, first_new) / (first_old.norm() * first_new.norm()).clamp_min(
        1e-30
    )
    return float(cosine.abs())


def captured_energy(low_rank_grad: torch.Tensor, grad: torch.Tensor) -> float:
    """``||P^T G||_F^2 / ||G||_F^2`` (the projection is orthonormal, so this is in ``[0, 1]``)."""
    total = float(grad.float().square().sum())
    if total == 0.0:
        return math.nan
    return float(low_rank_grad.float().square().sum()) / total


def _push_(window: torch.Tensor, value: float) -> None:
    """Append ``value`` to a fixed-length window (newest last; unused slots hold NaN)."""
    window.copy_(torch.cat([window[1:], window.new_tensor([value])]))


def _new_window(length: int) -> torch.Tensor:
    return torch.full((length,), math.nan, dtype=torch.float32)


def init_stability_state(state: dict[str, Any], config: StabilityConfig) -> None:
    """Create the metrics and criterion counters of one projected parameter."""
    state[LAST_OVERLAP] = math.nan
    state[CAPTURED_ENERGY] = math.nan
    state[LEADING_SIMILARITY] = math.nan
    if config.policy == "qgalore":
        state[LEADING_WINDOW] = _new_window(config.qgalore_window)
    state[STABLE_STREAK] = 0
    state[STABLE_SINCE] = -1
    state[GROWTHS_PENDING] = 0


def record_refresh_metrics_(state: dict[str, Any], overlap: float, leading: float) -> None:
    """Store a refresh's overlap and leading-vector similarity (and window the latter)."""
    state[LAST_OVERLAP] = overlap
    state[LEADING_SIMILARITY] = leading
    if LEADING_WINDOW in state:
        _push_(state[LEADING_WINDOW], leading)


def record_captured_energy_(state: dict[str, Any], energy: float) -> None:
    """Store the captured energy; a zero gradient (energy undefined) keeps the last value."""
    if not math.isnan(energy):
        state[CAPTURED_ENERGY] = energy


#: Per-refresh metric histories of 0.1.0 development checkpoints -> today's latest-value keys.
_LEGACY_HISTORIES = {
    "overlap_history": LAST_OVERLAP,
    "energy_history": CAPTURED_ENERGY,
    "leading_similarity_history": LEADING_SIMILARITY,
}


def upgrade_legacy_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """A saved state entry with metric histories (older checkpoints) as latest values."""
    if not any(key in entry for key in _LEGACY_HISTORIES):
        return entry
    upgraded = {k: v for k, v in entry.items() if k not in _LEGACY_HISTORIES}
    for old, new in _LEGACY_HISTORIES.items():
        if old in entry:
            history = entry[old]
            finite = history[~torch.isnan(history)]
            upgraded[new] = float(finite[-1]) if finite.numel() else math.nan
    return upgraded


def update_stability_(state: dict[str, Any], config: StabilityConfig, step: int) -> bool:
    """Apply the stability criterion after a refresh; returns whether the layer is now stable.

    Stable means: the last ``patience`` overlaps were all ``>= threshold``. ``STABLE_SINCE`` is
    the refresh step at which that first became true (``-1`` while unstable). The criterion is
    the same under every refresh policy, so reports are comparable across policies.
    """
    overlap = state[LAST_OVERLAP]
    if math.isnan(overlap) or overlap < config.threshold:
        state[STABLE_STREAK] = 0
        state[STABLE_SINCE] = -1
        return False
    state[STABLE_STREAK] += 1
    if state[STABLE_STREAK] < config.patience:
        return False
    if state[STABLE_SINCE] < 0:
        state[STABLE_SINCE] = step
    return True


class RefreshPolicy(ABC):
    """Decides a layer's next refresh gap right after a refresh (criterion already applied)."""

    def __init__(self, config: StabilityConfig) -> None:
        self.config = config

    @abstractmethod
    def next_gap(self, state: dict[str, Any], gap: int, base_gap: int, stable: bool) -> int:
        """The number of steps until the next refresh."""


class FixedGapPolicy(RefreshPolicy):
    """GaLore's behaviour: always the base gap. Metrics and the criterion are still recorded."""

    def next_gap(self, state: dict[str, Any], gap: int, base_gap: int, stable: bool) -> int:
        return base_gap


class OverlapPolicy(RefreshPolicy):
    """A stable layer's gap grows by ``growth`` per refresh up to ``max_gap``; else base gap."""

    def next_gap(self, state: dict[str, Any], gap: int, base_gap: int, stable: bool) -> int:
        if not stable:
            return base_gap
        return min(max(int(gap * self.config.growth), gap), self.config.max_gap)


class QGaLorePolicy(RefreshPolicy):
    """Q-GaLore's lazy rule: mean leading-vector similarity over a window ``>= 0.4`` doubles T.

    After each doubling the window starts over, as in the reference; the gap never shrinks.
    The similarity is taken in absolute value, so a sign flip of the SVD is not a change.
    """

    def next_gap(self, state: dict[str, Any], gap: int, base_gap: int, stable: bool) -> int:
        state[GROWTHS_PENDING] += 1
        length = self.config.qgalore_window
        if state[GROWTHS_PENDING] < length:
            return gap
        window = state.get(LEADING_WINDOW)
        if window is None or window.numel() != length:
            # The policy or its window changed since this state was made: start a new window.
            state[LEADING_WINDOW] = _new_window(length)
            state[GROWTHS_PENDING] = 0
            return gap
        if bool(torch.isnan(window).any()) or float(window.mean()) < self.config.qgalore_threshold:
            return gap
        state[GROWTHS_PENDING] = 0
        return min(gap * 2, self.config.max_gap)


_POLICIES: dict[str, type[RefreshPolicy]] = {
    "fixed": FixedGapPolicy,
    "overlap": OverlapPolicy,
    "qgalore": QGaLorePolicy,
}


def make_policy(config: StabilityConfig) -> RefreshPolicy:
    return _POLICIES[config.policy](config)
