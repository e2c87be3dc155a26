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

A refresh policy turns these into the next refresh gap. Each metric keeps a short history (the
last ``StabilityConfig.history`` values, newest last) as a list of Python floats in the optimizer
state, beside the criterion's int counters: it survives checkpoints (``weights_only`` loading
included) and adds no tensor bytes, so GaLoreAdamW's state tensors are exactly galore-torch's
(moments and bases) and nothing of it sits in accelerator memory. The values are host numbers
already (each is read with ``float()`` to decide the gap), so keeping them there costs no sync.
The whole history over training is the :class:`~lowrank_optim.reporting.MetricsWriter` log.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from lowrank_optim.config import StabilityConfig
from lowrank_optim.state_keys import (
    ENERGY_HISTORY,
    GROWTHS_PENDING,
    LEADING_HISTORY,
    OVERLAP_HISTORY,
    STABLE_SINCE,
    STABLE_STREAK,
)

__all__ = [
    "ENERGY_HISTORY",
    "LEADING_HISTORY",
    "OVERLAP_HISTORY",
    "STABLE_SINCE",
    "STABLE_STREAK",
    "FixedGapPolicy",
    "OverlapPolicy",
    "QGaLorePolicy",
    "RefreshPolicy",
    "captured_energy",
    "init_stability_state",
    "latest",
    "leading_vector_similarity",
    "make_policy",
    "record_captured_energy_",
    "record_refresh_metrics_",
    "subspace_overlap",
    "update_stability_",
    "upgrade_legacy_metrics",
]

_HISTORIES = (OVERLAP_HISTORY, ENERGY_HISTORY, LEADING_HISTORY)


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


def _push(state: dict[str, Any], key: str, value: float, length: int) -> None:
    # A new list each time: a state_dict() taken earlier shares the old one and must not change.
    state[key] = [*state[key], float(value)][-length:]


def latest(state: dict[str, Any], key: str) -> float:
    """The newest value of the history ``key`` (``nan`` while it is empty)."""
    history = state.get(key) or [math.nan]
    return float(history[-1])


def init_stability_state(state: dict[str, Any], config: StabilityConfig) -> None:
    """Create the metric histories and criterion counters of one projected parameter."""
    for key in _HISTORIES:
        state[key] = []
    state[STABLE_STREAK] = 0
    state[STABLE_SINCE] = -1
    state[GROWTHS_PENDING] = 0


def record_refresh_metrics_(
    state: dict[str, Any], config: StabilityConfig, overlap: float, leading: float
) -> None:
    """Append a refresh's overlap and leading-vector similarity to their histories."""
    _push(state, OVERLAP_HISTORY, overlap, config.history)
    _push(state, LEADING_HISTORY, leading, config.history)


def record_captured_energy_(state: dict[str, Any], config: StabilityConfig, energy: float) -> None:
    """Append the captured energy; a zero gradient (energy undefined) records nothing."""
    if not math.isnan(energy):
        _push(state, ENERGY_HISTORY, energy, config.history)


def upgrade_legacy_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """A saved state entry whose histories are NaN-padded fp32 tensors (0.1.0 development
    checkpoints) with them as lists of their finite values instead."""
    if not any(isinstance(entry.get(key), torch.Tensor) for key in _HISTORIES):
        return entry
    upgraded = dict(entry)
    for key in _HISTORIES:
        history = entry.get(key)
        if isinstance(history, torch.Tensor):
            upgraded[key] = [float(v) for v in history[~torch.isnan(history)].tolist()]
    return upgraded


def update_stability_(state: dict[str, Any], config: StabilityConfig, step: int) -> bool:
    """Apply the stability criterion after a refresh; returns whether the layer is now stable.

    Stable means: the last ``patience`` overlaps were all ``>= threshold``. ``STABLE_SINCE`` is
    the refresh step at which that first became true (``-1`` while unstable). The criterion is
    the same under every refresh policy, so reports are comparable across policies.
    """
    overlap = latest(state, OVERLAP_HISTORY)
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
        window = self.config.qgalore_window
        if state[GROWTHS_PENDING] < window:
            return gap
        recent = state[LEADING_HISTORY][-window:]
        if len(recent) < window or sum(recent) / window < self.config.qgalore_threshold:
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
