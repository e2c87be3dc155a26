"""Typed, self-validating configuration for the optimizers.

Hyper-parameters travel through ``torch.optim`` param groups as plain numbers and strings, so
that ``optimizer.state_dict()`` holds nothing but tensors, numbers and strings and loads with
``torch.load(weights_only=True)``. The dataclasses here are the typed front door: they validate
on construction and flatten into param-group keys with :meth:`ProjectionConfig.to_group`.

The group keys of ``galore-torch`` (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) are
accepted unchanged, so existing param-group code keeps working.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from lowrank_optim.projection.registry import available_refresh_methods

__all__ = [
    "FACTOR_STEPS",
    "HANDOFF_MOMENTS",
    "HANDOFF_TRIGGERS",
    "HandoffConfig",
    "MOMENT_TRANSFERS",
    "ON_BAD_GRADIENT",
    "PROJ_TYPES",
    "STABILITY_POLICIES",
    "ProjectionConfig",
    "StabilityConfig",
    "validate_adam_hyperparameters",
    "validate_on_bad_gradient",
]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
MOMENT_TRANSFERS = ("keep", "rotate")
ON_BAD_GRADIENT = ("raise", "skip")
STABILITY_POLICIES = ("fixed", "overlap", "qgalore")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"Invalid {name}: {value!r}; allowed: {', '.join(allowed)}")


def _require_positive_int(name: str, value: object) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    _require(ok, f"Invalid {name}: {value!r}; must be an integer > 0")


def _real_number_problem(value: object) -> str | None:
    """Why ``value`` is not a usable real hyper-parameter, or ``None`` if it is.

    ``bool`` is an ``int`` subclass and a 0-dim tensor or a numeric string would pass a bare
    ``float(...)``; NaN compares False with everything, so ``nan >= 0`` alone would not catch it.
    Each is named here instead of surfacing later as a silent cast or a NaN update.
    """
    if isinstance(value, bool) or not isinstance(value, float | int):
        kind = type(value).__name__
        hint = "; pass float(value)" if isinstance(value, str) or hasattr(value, "item") else ""
        return f"got a {kind}, expected a Python float or int (not a bool){hint}"
    if not math.isfinite(value):
        return "must be finite (not NaN or Inf)"
    return None


def _require_real(name: str, value: object, low: float, high: float | None = None) -> None:
    """``value`` is a finite real number in ``[low, high)`` (``[low, inf)`` without ``high``)."""
    allowed = f"in [{low:g}, {high:g})" if high is not None else f">= {low:g}"
    problem = _real_number_problem(value)
    if problem is None and not (value >= low and (high is None or value < high)):  # type: ignore[operator]
        problem = f"must be {allowed}"
    _require(problem is None, f"Invalid {name}: {value!r}; {problem} (allowed: a number {allowed})")


def validate_adam_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    """Check AdamW hyper-parameters, naming the bad value and what is allowed.

    Stricter than ``torch.optim.AdamW``: every value must be a finite Python ``float`` or
    ``int`` (no ``bool``, string or tensor; torch accepts a tensor ``lr`` in some optimizers, but
    the param groups here hold plain numbers so that state dicts load with ``weights_only``).
    """
    _require_real("learning rate", lr, 0.0)
    _require_real("epsilon value", eps, 0.0)
    _require(
        isinstance(betas, tuple | list) and len(betas) == 2,
        f"Invalid betas: {betas!r}; must be a pair (beta1, beta2)",
    )
    for index, beta in enumerate(betas):
        _require_real(f"beta parameter at index {index}", beta, 0.0, 1.0)
    _require_real("weight_decay value", weight_decay, 0.0)


def validate_on_bad_gradient(value: object) -> None:
    """``raise`` stops on a NaN/Inf gradient or a failed SVD; ``skip`` warns and skips it."""
    _require_choice("on_bad_gradient", value, ON_BAD_GRADIENT)


@dataclass(frozen=True)
class ProjectionConfig:
    """How a 2-D gradient is projected onto a low-rank subspace (GaLore, Zhao et al. 2024).

    For a weight ``W`` of shape ``m x n`` and gradient ``G``, GaLore keeps an orthonormal basis
    ``P`` with ``r`` columns and runs Adam on ``R = P^T G`` (left) or ``R = G Q`` (right); the
    update ``scale * P * Adam(R)`` is projected back. The basis is refreshed every
    ``update_proj_gap`` steps from the current gradient.

    Attributes:
        rank: target rank ``r``; clipped to ``min(m, n)`` per matrix.
        update_proj_gap: steps between basis refreshes ``T``.
        scale: GaLore's ``alpha``; the projected-back update is multiplied by it.
        proj_type: ``std`` projects the smaller side (as galore-torch), ``reverse_std`` the larger
            one, ``left``/``right`` always that side, ``full`` both sides (``r x r`` moments).
        refresh: ``svd`` is the exact fp32 truncated SVD (reference); ``randomized`` is subspace
            iteration warm-started from the previous basis, ``O(mnr)``.
        power_iters: subspace iterations per randomized refresh.
        oversample: extra columns used by a cold randomized start.
        moment_transfer: at a refresh, ``keep`` leaves the low-rank moments as they are
            (galore-torch behaviour); ``rotate`` carries them into the new basis with
            ``P_new^T P_old``.
        proj_bits: store the bases in 4 or 8 bits (Q-GaLore; group-wise min/max codes, 4-bit
            codes packed two per byte), or in the parameter's dtype (None).
        seed: seed of the random start of the randomized refresh (deterministic, so resuming is
            bit-for-bit).
    """

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    refresh: str = "randomized"
    power_iters: int = 1
    oversample: int = 8
    moment_transfer: str = "rotate"
    proj_bits: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _require_positive_int("rank", self.rank)
        _require_positive_int("update_proj_gap", self.update_proj_gap)
        _require(
            isinstance(self.scale, float | int) and math.isfinite(self.scale) and self.scale > 0,
            f"Invalid scale: {self.scale!r}; must be a finite number > 0",
        )
        _require_choice("proj_type", self.proj_type, PROJ_TYPES)
        _require_choice("refresh", self.refresh, available_refresh_methods())
        _require_positive_int("power_iters", self.power_iters)
        _require(
            isinstance(self.oversample, int) and self.oversample >= 0,
            f"Invalid oversample: {self.oversample!r}; must be an integer >= 0",
        )
        _require_choice("moment_transfer", self.moment_transfer, MOMENT_TRANSFERS)
        _require(
            self.proj_bits in (None, 4, 8),
            f"Invalid proj_bits: {self.proj_bits!r}; allowed: None (parameter dtype), 4, 8",
        )
        _require(isinstance(self.seed, int), f"Invalid seed: {self.seed!r}; must be an integer")

    def to_group(self) -> dict[str, Any]:
        """The param-group keys (plain numbers and strings) this config stands for."""
        return asdict(self)

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> ProjectionConfig:
        """Validate the projection keys of a param group, filling unset ones with defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in group.items() if k in names})


@dataclass(frozen=True)
class StabilityConfig:
    """When a layer's gradient subspace counts as stable, and what that does to its refresh gap.

    At each refresh the overlap ``||P_old^T P_new||_F^2 / r`` (mean squared cosine of the
    principal angles; 1 = same subspace, about ``r/n`` = unrelated) is recorded. Under the
    ``overlap`` policy a layer is stable once the overlap has been ``>= threshold`` for
    ``patience`` consecutive refreshes; each further stable refresh multiplies its gap by
    ``growth`` up to ``max_gap``, and a refresh below the threshold resets it to the base gap.
    ``qgalore`` is Q-GaLore's rule (Zhang et al. 2024): cosine similarity of the first singular
    vector (here taken in absolute value, so a sign flip is not a change), averaged over the last
    ``qgalore_window`` refreshes; at or above ``qgalore_threshold`` the gap doubles.
    ``fixed`` (the default, GaLore's behaviour) records the metrics and applies the criterion
    but never changes the gap.

    Attributes:
        policy: ``fixed``, ``overlap`` or ``qgalore``.
        threshold: overlap at or above which a refresh counts as stable.
        patience: consecutive stable refreshes before the layer is stable (``k``).
        growth: factor applied to a stable layer's gap at each stable refresh.
        max_gap: cap on the gap, in steps.
        history: how many past values of each metric the optimizer state keeps per layer.
        qgalore_threshold: Q-GaLore's similarity threshold.
        qgalore_window: Q-GaLore's averaging window.
    """

    policy: str = "fixed"
    threshold: float = 0.9
    patience: int = 2
    growth: float = 2.0
    max_gap: int = 2000
    history: int = 16
    qgalore_threshold: float = 0.4
    qgalore_window: int = 5

    def __post_init__(self) -> None:
        _require_choice("policy", self.policy, STABILITY_POLICIES)
        _require(
            isinstance(self.threshold, float | int) and 0.0 < self.threshold <= 1.0,
            f"Invalid threshold: {self.threshold!r}; must be in (0, 1]",
        )
        _require_positive_int("patience", self.patience)
        _require(
            isinstance(self.growth, float | int) and self.growth >= 1.0,
            f"Invalid growth: {self.growth!r}; must be >= 1",
        )
        _require_positive_int("max_gap", self.max_gap)
        _require(
            isinstance(self.qgalore_threshold, float | int) and 0.0 < self.qgalore_threshold <= 1,
            f"Invalid qgalore_threshold: {self.qgalore_threshold!r}; must be in (0, 1]",
        )
        _require_positive_int("qgalore_window", self.qgalore_window)
        _require_positive_int("history", self.history)
        _require(
            self.history >= self.qgalore_window,
            f"Invalid history: {self.history!r}; must be >= qgalore_window ({self.qgalore_window})",
        )

    def to_group(self) -> dict[str, Any]:
        """Param-group keys, prefixed ``stability_`` so they cannot clash with others."""
        return {f"stability_{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> StabilityConfig:
        names = {f.name for f in fields(cls)}
        prefix = "stability_"
        values = {k[len(prefix) :]: v for k, v in group.items() if k.startswith(prefix)}
        return cls(**{k: v for k, v in values.items() if k in names})


HANDOFF_MOMENTS = ("project", "fresh")
#: What decides when a layer is handed off: its own subspace stability, or one fixed step.
HANDOFF_TRIGGERS = ("stable", "step")
#: How the factors' lr is set per layer: their group's lr for all, or a matched first step.
FACTOR_STEPS = ("fixed", "matched", "matched-each", "capped")


@dataclass(frozen=True)
class HandoffConfig:
    """When WeLoreAdamW replaces a converged layer by low-rank factors, and how.

    A projected layer is handed off at a check step ``t`` when ``t >= start_step`` and its
    gradient subspace has met the stability criterion (:class:`StabilityConfig`) for at least
    ``min_stable_steps`` steps. Its rank comes from WeLore's data-free selection (Jaiswal et al.,
    ICML 2025): singular values of every projected weight are min/max normalized, one global
    threshold is solved so that ``target_reduction`` of the total rank would be removed, and a
    layer is factorized only if its own reduction exceeds ``min_ratio`` and the factors are
    smaller than the dense matrix (``k < mn / (m + n)``).

    Attributes:
        start_step: earliest step at which a hand-off may happen.
        min_stable_steps: how long a layer must have been stable.
        target_reduction: overall fraction of rank to remove, in (0, 1). The default, 0.8,
            removes about two thirds of the projected-matrix parameters of a LLaMA (68% in
            ``benchmarks/handoff_study.py``, where it cost 1-2% eval loss).
        min_ratio: a layer's own rank reduction must exceed this to be factorized.
        check_every: steps between hand-off checks (each check takes the spectra of the
            projected weights, so it is kept off the per-step path).
        moments: ``project`` carries the layer's low-rank Adam moments onto the factors;
            ``fresh`` starts the factors' AdamW from zero.
        trigger: ``stable`` hands a layer off once its own subspace has been stable for
            ``min_stable_steps`` (at a check step at or after ``start_step``); ``step`` hands
            every qualifying layer off at the first check step at or after ``start_step``,
            without looking at stability (the one-shot baseline).
        factor_lr_scale: the factor groups' learning rate is their source group's ``lr`` times
            this; ``None`` (default) uses the source group's GaLore ``scale``, the step size
            ``lr * scale`` the projected weights were trained with. Inheriting ``lr`` itself
            (``1.0``) makes the factors step ``1 / scale`` times too far: +39% eval loss with
            GaLore's ``lr 1e-2, scale 0.25`` recipe in issue #14's first experiment. The ratio
            is a group key of its own (``LR_SCALE``), applied in the step: a factor group's
            ``lr`` is its source group's, so any scheduler, including one that *sets* every
            group's ``lr`` (``OneCycleLR``, a hand-written loop), drives the factors at
            ``lr * ratio``.
        factor_step: how each layer's factors scale their group's lr at the hand-off
            (:mod:`lowrank_optim.handoff.factor_step`). Adam's lr sets how far each entry of
            ``U`` and ``D`` moves, so how far ``W = U D`` moves (``dU D + U dD``) depends on the
            layer's singular values, rank and shape. ``matched-each`` (default): ``U`` and ``D``
            get their own multipliers, so that each factor's own term moves ``W`` by the
            Frobenius norm of the layer's last GaLore step (``||P N|| / ||N_U D||`` and
            ``||P N|| / ||U N_D||``, from the carried moments). ``fixed``: no multiplier, every
            factor at its group's lr. ``capped``: ``matched-each``'s multipliers, each at most
            1. ``matched``: one multiplier for both, so that ``dU D + U dD`` together match it.
        factor_step_relax: the steps over which a ``factor_step`` multiplier ``mu`` returns
            linearly to 1 after the hand-off: a factor that has taken ``j`` steps since (this one
            included) steps with ``mu + (1 - mu) min(1, (j - 1) / R)`` (0: ``mu`` for good).
            The matched step avoids the jump in loss right after a hand-off; the group's own lr
            does better later, in every setting measured. Eval loss against dense GaLoreAdamW
            (3 seeds; ``benchmarks/handoff_study.py --long``: 20m LLaMA, GaLore's recipe, 1000
            steps, 64% of projected parameters removed; ``benchmarks/main_job_factor_lr.py``:
            the 9m main job on BPE and on byte-level tokens, 67% removed):

            ======================  ===============  ===============  ===============
            rule                    ``--long``       main job         bytes
            ======================  ===============  ===============  ===============
            default (relax 100)     +0.94% +- 0.44%  +0.92% +- 0.21%  +3.43% +- 1.02%
            ``matched-each``, 0     +0.95% +- 0.30%  +0.94% +- 0.23%  +3.80% +- 0.98%
            ``fixed``               +1.21% +- 0.45%  +0.92% +- 0.22%  +3.35% +- 1.02%
            ======================  ===============  ===============  ===============

            Paired against ``fixed``, the default is 0.26 +- 0.13 points better in ``--long``
            (every seed), level on the main job (+0.01) and 0.08 +- 0.01 worse on bytes: the
            smallest worst case of the rules measured.
        taper_steps: ``0`` swaps a selected layer for its rank-``k`` truncated factors at once.
            ``T > 0`` first tapers it: for ``T`` steps the layer keeps training dense while the
            part of ``W`` outside its top-``k`` singular subspace (taken when it was selected)
            is scaled down linearly to zero; then the factorization is exact. Gradual removal
            lets the rest of the network adapt, as gradual pruning does; the cost is one
            ``k x min(m, n)`` basis per tapering layer and one ``O(mnk)`` product per step.
        end_step: with ``trigger="stable"``, the step by which every layer that is still
            dense and qualifies goes anyway, at the first check step at or after it (``None``:
            no deadline). Stability then decides the order and timing of hand-offs inside the
            window ``[start_step, end_step]``, and the target is reached by the window's end
            even for layers whose subspace keeps moving.
        rewarmup_steps: after its hand-off, a layer's factors ramp their learning rate linearly
            from ``1 / (rewarmup_steps + 1)`` to 1 of the group's over this many steps (0: no
            ramp).
    """

    start_step: int = 0
    min_stable_steps: int = 0
    target_reduction: float = 0.8
    min_ratio: float = 0.5
    check_every: int = 50
    moments: str = "project"
    trigger: str = "stable"
    factor_lr_scale: float | None = None
    factor_step: str = "matched-each"
    factor_step_relax: int = 100
    rewarmup_steps: int = 0
    end_step: int | None = None
    taper_steps: int = 0

    def __post_init__(self) -> None:
        _require(
            isinstance(self.start_step, int) and self.start_step >= 0,
            f"Invalid start_step: {self.start_step!r}; must be an integer >= 0",
        )
        _require(
            isinstance(self.min_stable_steps, int) and self.min_stable_steps >= 0,
            f"Invalid min_stable_steps: {self.min_stable_steps!r}; must be an integer >= 0",
        )
        _require(
            isinstance(self.target_reduction, float | int) and 0.0 < self.target_reduction < 1.0,
            f"Invalid target_reduction: {self.target_reduction!r}; must be in (0, 1)",
        )
        _require(
            isinstance(self.min_ratio, float | int) and 0.0 <= self.min_ratio < 1.0,
            f"Invalid min_ratio: {self.min_ratio!r}; must be in [0, 1)",
        )
        _require_positive_int("check_every", self.check_every)
        _require_choice("moments", self.moments, HANDOFF_MOMENTS)
        _require_choice("trigger", self.trigger, HANDOFF_TRIGGERS)
        _require_choice("factor_step", self.factor_step, FACTOR_STEPS)
        _require(
            self.factor_lr_scale is None
            or (
                isinstance(self.factor_lr_scale, float | int)
                and not isinstance(self.factor_lr_scale, bool)
                and math.isfinite(self.factor_lr_scale)
                and self.factor_lr_scale > 0
            ),
            f"Invalid factor_lr_scale: {self.factor_lr_scale!r}; must be None (use the "
            "projection scale) or a finite number > 0",
        )
        _require(
            isinstance(self.factor_step_relax, int)
            and not isinstance(self.factor_step_relax, bool)
            and self.factor_step_relax >= 0,
            f"Invalid factor_step_relax: {self.factor_step_relax!r}; must be an integer >= 0",
        )
        _require(
            isinstance(self.rewarmup_steps, int)
            and not isinstance(self.rewarmup_steps, bool)
            and self.rewarmup_steps >= 0,
            f"Invalid rewarmup_steps: {self.rewarmup_steps!r}; must be an integer >= 0",
        )
        _require(
            isinstance(self.taper_steps, int)
            and not isinstance(self.taper_steps, bool)
            and self.taper_steps >= 0,
            f"Invalid taper_steps: {self.taper_steps!r}; must be an integer >= 0",
        )
        _require(
            self.end_step is None
            or (
                isinstance(self.end_step, int)
                and not isinstance(self.end_step, bool)
                and self.end_step >= self.start_step
            ),
            f"Invalid end_step: {self.end_step!r}; must be None or an integer >= start_step "
            f"({self.start_step})",
        )
