"""One basis refresh of one projected parameter: compute, check, carry moments, record metrics.

Called by the optimizer when ``step >= state[NEXT_REFRESH]``. The new bases come from the
group's refresh method (see :mod:`lowrank_optim.projection`) run in fp32; a method that raises
``LinAlgError`` is retried once in fp64 before the refresh counts as failed, because
ill-conditioned gradients that defeat LAPACK's fp32 driver usually succeed in double precision.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lowrank_optim import state_keys as keys
from lowrank_optim.basis_storage import read_basis, write_basis
from lowrank_optim.config import StabilityConfig
from lowrank_optim.errors import SubspaceRefreshError
from lowrank_optim.moment_storage import MomentStorage
from lowrank_optim.projection import get_refresh_method, refresh_target, rotate_moments_
from lowrank_optim.stability import (
    leading_vector_similarity,
    make_policy,
    record_refresh_metrics_,
    subspace_overlap,
    update_stability_,
)

__all__ = [
    "compute_bases",
    "install_bases_",
    "read_previous_bases",
    "record_refresh_",
    "refresh_failed_",
    "refresh_from_gradient",
]


def compute_bases(
    grad: torch.Tensor,
    basis_keys: tuple[str, ...],
    rank: int,
    previous: dict[str, torch.Tensor],
    group: dict[str, Any],
    step: int,
    name: str,
) -> dict[str, torch.Tensor]:
    """fp32 orthonormal bases for ``grad``; raises :class:`SubspaceRefreshError` on failure."""
    method = get_refresh_method(group["refresh"])
    generator = torch.Generator(device=grad.device)
    # Seeded by the step, not drawn from a running generator, so a resumed run draws the same.
    generator.manual_seed(int(group["seed"]) * 1_000_003 + step)
    bases = {}
    for key in basis_keys:
        target = refresh_target(grad, key)
        old = previous.get(key)
        options = {
            "power_iters": group["power_iters"],
            "oversample": group["oversample"],
            "generator": generator,
        }
        try:
            basis = method(target, rank, None if old is None else old.float(), **options)
        except torch.linalg.LinAlgError:
            try:
                old64 = None if old is None else old.double()
                basis = method(target.double(), rank, old64, **options).float()
            except torch.linalg.LinAlgError as error:
                raise SubspaceRefreshError(
                    f"Basis refresh ({group['refresh']}) of parameter {name} "
                    f"(shape {tuple(grad.shape)}) did not converge at step {step}: {error}"
                ) from error
        if basis.shape != (target.shape[0], rank) or not bool(torch.isfinite(basis).all()):
            raise SubspaceRefreshError(
                f"Basis refresh ({group['refresh']}) of parameter {name} returned an invalid basis "
                f"of shape {tuple(basis.shape)} at step {step}; expected {(target.shape[0], rank)}"
            )
        bases[key] = basis
    return bases


def refresh_from_gradient(
    grad: torch.Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    basis_keys: tuple[str, ...],
    rank: int,
    step: int,
    name: str,
    storage: MomentStorage,
    dtype: torch.dtype,
) -> bool:
    """Refresh the bases in ``state`` from the whole gradient ``grad`` (of a parameter of
    ``dtype``, the bases' stored dtype). Returns ``False`` if the refresh was skipped."""
    previous = read_previous_bases(state, basis_keys, group.get("proj_bits"))
    try:
        new_bases = compute_bases(grad, basis_keys, rank, previous, group, step, name)
    except SubspaceRefreshError as error:
        return refresh_failed_(state, group, error, step)
    install_bases_(state, group, previous, new_bases, step, storage, dtype)
    return True


def read_previous_bases(
    state: dict[str, Any], basis_keys: tuple[str, ...], bits: int | None
) -> dict[str, torch.Tensor]:
    """The bases stored under ``basis_keys`` as fp32 (none before the first refresh)."""
    previous = {}
    for key in basis_keys:
        basis = read_basis(state, key, bits, torch.float32)
        if basis is not None:
            previous[key] = basis
    return previous


def refresh_failed_(
    state: dict[str, Any], group: dict[str, Any], error: SubspaceRefreshError, step: int
) -> bool:
    """Raise ``error``, or (``on_bad_gradient="skip"``) keep the basis and retry later.

    ``step`` is the step number this call would take. With a previous basis the parameter still
    steps (in the old subspace), its count reaches ``step``, and the retries back off: a refresh
    due at ``d`` that keeps failing is tried at ``d``, ``d + 1``, ``d + 3``, ``d + 7``, ... (the
    delay doubles, up to the refresh gap), so a matrix whose decomposition never converges costs
    a few attempts per gap instead of one per step. The delay follows from the state alone (the
    last refresh and the gap), so a resumed run retries at the same steps. Without a basis (the
    first refresh failed) nothing can be projected, so the step is not taken and the count
    stays at ``step - 1``: the retry must be due at ``step`` itself, or the next call (again
    numbered ``step``) would find it not due, never refresh and never train.
    """
    if group["on_bad_gradient"] == "raise":
        raise error
    has_basis = state[keys.LAST_REFRESH] > 0
    if has_basis:
        gap = max(int(state[keys.REFRESH_GAP]), 1)
        overdue = max(step - (int(state[keys.LAST_REFRESH]) + gap), 0)
        retry = step + min(overdue + 1, gap)
        outcome = "keeping the previous basis"
    else:
        retry = step
        outcome = "the parameter has no basis yet and is not updated this step"
    warnings.warn(f"{error}; {outcome}; retrying at step {retry}", stacklevel=5)
    state[keys.REFRESHES_FAILED] += 1
    state[keys.NEXT_REFRESH] = retry
    return False


def install_bases_(
    state: dict[str, Any],
    group: dict[str, Any],
    previous: dict[str, torch.Tensor],
    new_bases: dict[str, torch.Tensor],
    step: int,
    storage: MomentStorage,
    dtype: torch.dtype,
) -> None:
    """Record the refresh metrics, carry the moments over, store the bases, book the refresh."""
    if previous:
        _record_metrics(state, group, previous, new_bases)
        if group["moment_transfer"] == "rotate":
            exp_avg, exp_avg_sq = storage.read(state)
            rotate_moments_(exp_avg, exp_avg_sq, previous, new_bases)
            storage.write(state, exp_avg, exp_avg_sq)
    for key, basis in new_bases.items():
        write_basis(state, key, basis, group.get("proj_bits"), dtype)
    record_refresh_(state, group, step)


def record_refresh_(state: dict[str, Any], group: dict[str, Any], step: int) -> None:
    """Bookkeeping after a refresh at ``step``: counts, stability, and the next refresh step."""
    base_gap = int(group["update_proj_gap"])
    last = state[keys.LAST_REFRESH]
    if last > 0:
        # Refreshes the base schedule would have done between the last refresh and this one.
        state[keys.REFRESHES_SKIPPED] += max((step - last) // base_gap - 1, 0)
    state[keys.REFRESHES] += 1
    state[keys.LAST_REFRESH] = step
    config = StabilityConfig.from_group(group)
    stable = update_stability_(state, config, step)
    gap = make_policy(config).next_gap(state, state[keys.REFRESH_GAP], base_gap, stable)
    state[keys.REFRESH_GAP] = gap
    state[keys.NEXT_REFRESH] = step + gap


def _record_metrics(
    state: dict[str, Any],
    group: dict[str, Any],
    old: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
) -> None:
    overlaps = [subspace_overlap(old[key], new[key]) for key in new]
    first = next(iter(new))
    leading = leading_vector_similarity(old[first], new[first])
    config = StabilityConfig.from_group(group)
    record_refresh_metrics_(state, config, sum(overlaps) / len(overlaps), leading)
