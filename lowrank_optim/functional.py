"""The step math of the GaLore family as module-level functions (the torch.optim split).

The optimizer classes gather tensors and dispatch here; a placement
(:mod:`lowrank_optim.placement`) supplies each parameter's local view. No function takes an
optimizer. For a parameter ``W`` with gradient ``G`` and Adam moments ``m, v``:

* dense (AdamW, Loshchilov & Hutter 2019): ``W <- (1 - lr wd) W - lr/(1 - b1^t) m_t / den_t``
  (:func:`dense_step`), in torch's fused kernel where the moments are plain tensors, otherwise a
  ``WORKING_CHUNK`` of elements at a time (:func:`dense_update_in_chunks`);
* projected (GaLore, Zhao et al. ICML 2024): ``R = P^T G`` (or ``G Q``, ``P^T G Q``), the moments
  of ``R``, and ``W <- (1 - lr wd) W - lr scale / (1 - b1^t) * back(m_t / den_t)``
  (:func:`projected_step`), with the basis refreshed every ``update_proj_gap`` steps.

Non-finite gradients are raised on or dropped with a warning (:func:`drop_non_finite`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lowrank_optim import state_keys as keys
from lowrank_optim.basis_storage import read_basis
from lowrank_optim.config import StabilityConfig
from lowrank_optim.errors import NonFiniteGradientError
from lowrank_optim.moment_storage import WORKING_CHUNK, MomentStorage, as_fp32
from lowrank_optim.moments import (
    adam_denominators,
    adam_step_sizes,
    fused_adamw_,
    fused_kernel_applies,
    update_moments_,
)
from lowrank_optim.projection import basis_keys, effective_rank, project, project_back_
from lowrank_optim.stability import init_stability_state, record_captured_energy_

if TYPE_CHECKING:
    from lowrank_optim.placement import Placement

__all__ = [
    "ApplyUpdate",
    "ParamView",
    "adam_moments",
    "advance_steps",
    "bad_gradient",
    "dense_step",
    "dense_update_in_chunks",
    "drop_non_finite",
    "finite_flags",
    "fused_moments",
    "init_dense_state",
    "init_projected_state",
    "low_rank_directions",
    "project_back_update",
    "projected_step",
    "read_bases",
    "real_view",
]

#: ``apply(param, direction, bases, alpha, decay)``: ``param = decay param + alpha back(d)``.
ApplyUpdate = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float, float], None]


@dataclass
class ParamView:
    """One parameter as this process steps it (built by the optimizer from its placement).

    ``param`` is the optimizer's parameter (its state key), ``local`` the values this process
    updates (the parameter itself, or its FSDP2 rows), ``grad`` the matching gradient (``None``
    when a low-rank gradient is given), ``state`` the state with local tensors, ``shape`` the
    parameter's global shape, ``moment_shape`` the global and ``local_moment_shape`` the local
    shape of its moments.
    """

    index: int
    name: str
    param: torch.Tensor
    local: torch.Tensor
    grad: torch.Tensor | None
    state: dict[str, Any]
    shape: tuple[int, ...]
    moment_shape: tuple[int, ...]
    local_moment_shape: tuple[int, ...]


def real_view(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor as real ``(..., 2)`` pairs (a view); a real tensor as it is.

    ``torch.optim.AdamW`` steps a complex parameter as ``view_as_real``: Adam on the real and
    imaginary parts as independent real coordinates. Squaring a complex gradient instead
    (``g * g``, not ``|g|^2``) would mix the parts and move the wrong one.
    """
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _widened(bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """16-bit bases as fp32 copies (the working precision of a 16-bit parameter's projection)."""
    return {key: as_fp32(basis) for key, basis in bases.items()}


def _in_moment_dtype(grad: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """``grad`` in the dtype of the working moment it updates (a copy only where they differ).

    The working moments are fp32-or-wider (``MomentStorage.read``): the parameter's dtype for
    full-precision fp32/fp64 moments, fp32 for 16-bit and for quantized ones. A quantized
    moment is dequantized to fp32 whatever the parameter's dtype, so an fp64 gradient is
    narrowed to it (the stored codes hold far less than fp32 anyway); 16-bit gradients are
    widened. The ``torch._foreach_*`` kernels refuse mixed dtypes.
    """
    return grad if grad.dtype == moment.dtype else grad.to(moment.dtype)


def _present(grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """``grads``, each present (every step has a gradient, full or low-rank, per view)."""
    if any(grad is None for grad in grads):
        raise RuntimeError("a full-gradient step got a parameter without a gradient")
    return grads  # type: ignore[return-value]


def _grads(views: Sequence[ParamView]) -> list[torch.Tensor]:
    """The views' local gradients (present on every full-gradient step)."""
    return _present([view.grad for view in views])


# ------------------------------------------------------------------------------ state setup
def init_dense_state(view: ParamView, storage: MomentStorage) -> None:
    """Zero AdamW state for ``view`` (complex: moments of the real view, as torch's AdamW)."""
    view.state[keys.STEP] = 0
    real = real_view(view.local)
    storage.init(view.state, view.local_moment_shape, real, math.prod(view.moment_shape))


def init_projected_state(view: ParamView, group: dict[str, Any], storage: MomentStorage) -> None:
    """Zero low-rank moments, the refresh schedule (a refresh due at step 1) and metrics.

    The one copy of the projected state's setup, for every placement: the moments have this
    process's ``local_moment_shape``; whether they are quantized is decided on the whole
    ``moment_shape``, so that every rank keeps the same keys.
    """
    state = view.state
    state[keys.STEP] = 0
    storage.init(state, view.local_moment_shape, view.local, math.prod(view.moment_shape))
    state[keys.REFRESH_GAP] = int(group["update_proj_gap"])
    state[keys.NEXT_REFRESH] = 1
    state[keys.LAST_REFRESH] = 0
    state[keys.REFRESHES] = 0
    state[keys.REFRESHES_SKIPPED] = 0
    state[keys.REFRESHES_FAILED] = 0
    init_stability_state(state, StabilityConfig.from_group(group))


def read_bases(
    state: Mapping[str, Any], group: dict[str, Any], shape: Sequence[int], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A projected parameter's current bases in ``dtype`` (empty before the first refresh)."""
    bases = {}
    for key in basis_keys(group["proj_type"], tuple(shape)):
        basis = read_basis(state, key, group.get("proj_bits"), dtype)
        if basis is None:
            return {}
        bases[key] = basis
    return bases


# --------------------------------------------------------------------------- bad gradients
def finite_flags(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Whether each tensor is all finite: one fused kernel and a single host sync.

    Uses the max-norm ``max |g|``: it is an element of ``g`` (never overflows, unlike the
    2-norm of a finite fp16 gradient of 300s on 256 x 256, which is 76800 > 65504) and is
    NaN or Inf exactly when some element is.
    """
    if not tensors:
        return []
    norms = torch._foreach_norm(list(tensors), math.inf)
    device = norms[0].device
    stacked = torch.stack([norm.to(device=device, dtype=torch.float32) for norm in norms])
    return torch.isfinite(stacked).tolist()


def bad_gradient(group: dict[str, Any], names: Sequence[str]) -> None:
    """Raise :class:`NonFiniteGradientError` (``raise`` mode) or warn that ``names`` skip."""
    message = f"Non-finite (NaN or Inf) gradient in {', '.join(names)}"
    if group["on_bad_gradient"] == "raise":
        raise NonFiniteGradientError(
            f"{message}; no update was applied. Pass on_bad_gradient='skip' to skip such "
            "updates with a warning instead."
        )
    warnings.warn(f"{message}; skipping its update this step", stacklevel=5)


def drop_non_finite(
    group: dict[str, Any], views: list[ParamView], flags: Sequence[bool]
) -> list[ParamView]:
    """The views whose flag is true; raises or warns (:func:`bad_gradient`) about the others."""
    if all(flags):
        return views
    bad = [view.name for view, ok in zip(views, flags, strict=True) if not ok]
    bad_gradient(group, bad)
    return [view for view, ok in zip(views, flags, strict=True) if ok]


# -------------------------------------------------------------------------------- Adam math
def advance_steps(states: Sequence[dict[str, Any]]) -> list[int]:
    """Count one more step in each state; returns the new step numbers ``t``."""
    steps = []
    for state in states:
        state[keys.STEP] = int(state[keys.STEP]) + 1
        steps.append(state[keys.STEP])
    return steps


def fused_moments(
    storage: MomentStorage,
    states: Sequence[dict[str, Any]],
    updated: list[torch.Tensor],
    grads: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """``(exp_avgs, exp_avg_sqs)`` if torch's fused AdamW kernel can update ``updated`` (the
    parameters, or low-rank buffers of their moments' shape) with ``grads``; ``None`` otherwise
    (quantized moments, mixed dtypes, tensor subclasses)."""
    if not storage.plain_tensors:  # the storage says whether its moments are plain tensors
        return None
    exp_avgs = [state[keys.EXP_AVG] for state in states]
    exp_avg_sqs = [state[keys.EXP_AVG_SQ] for state in states]
    if any(m.dtype != u.dtype for m, u in zip(exp_avgs, updated, strict=True)):
        return None
    if not fused_kernel_applies(updated, grads, exp_avgs, exp_avg_sqs):
        return None
    return exp_avgs, exp_avg_sqs


def adam_moments(
    group: dict[str, Any],
    states: Sequence[dict[str, Any]],
    grads: list[torch.Tensor],
    storage: MomentStorage,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], float]:
    """Advance the moments; returns ``(m, denominators, step sizes, decay)``.

    The update is ``param = decay * param - step_size * back(m / denominator)`` with
    ``decay = 1 - lr * wd`` (decoupled weight decay, in full space) and
    ``step_size = lr / (1 - beta1^t)``; see :mod:`lowrank_optim.moments`.
    """
    beta1, beta2 = group["betas"]
    steps = advance_steps(states)
    # Working moments are fp32 (or wider): eps = 1e-8 underflows to 0 in fp16, and 0/0 would
    # turn into NaN updates. The storage decides how they are kept between steps.
    working = [storage.read(state) for state in states]
    exp_avgs = [exp_avg for exp_avg, _ in working]
    exp_avg_sqs = [exp_avg_sq for _, exp_avg_sq in working]
    grads = [_in_moment_dtype(g, m) for g, m in zip(grads, exp_avgs, strict=True)]
    update_moments_(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
    for state, exp_avg, exp_avg_sq in zip(states, exp_avgs, exp_avg_sqs, strict=True):
        storage.write(state, exp_avg, exp_avg_sq)
    denominators = adam_denominators(exp_avg_sqs, steps, beta2, group["eps"])
    lr = float(group["lr"])
    return (
        exp_avgs,
        denominators,
        adam_step_sizes(lr, steps, beta1),
        1.0 - lr * group["weight_decay"],
    )


def low_rank_directions(
    group: dict[str, Any],
    states: Sequence[dict[str, Any]],
    lows: list[torch.Tensor],
    storage: MomentStorage,
) -> tuple[list[torch.Tensor], list[float], float]:
    """Advance the low-rank moments; returns ``(directions, step sizes, decay)``.

    The update is ``param = decay * param - step_size * scale * back(direction)``.
    """
    fused = fused_moments(storage, states, lows, lows)
    if fused is None:
        exp_avgs, denominators, step_sizes, decay = adam_moments(group, states, lows, storage)
        return torch._foreach_div(exp_avgs, denominators), step_sizes, decay
    # The fused kernel applied with lr = 1 and no decay to zero buffers leaves exactly
    # -(m_t / (1 - beta1^t)) / denominator_t in them: the whole Adam direction in one pass.
    directions = [torch.zeros_like(low) for low in lows]
    beta1, beta2 = group["betas"]
    fused_adamw_(
        directions,
        lows,
        *fused,
        advance_steps(states),
        lr=1.0,
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=0.0,
    )
    lr = float(group["lr"])
    return directions, [-lr] * len(directions), 1.0 - lr * group["weight_decay"]


def dense_update_in_chunks(
    group: dict[str, Any],
    target: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    step: int,
    storage: MomentStorage,
    chunk: int = WORKING_CHUNK,
) -> None:
    """AdamW on one (real) tensor ``target``, about ``chunk`` elements at a time.

    Quantized (or 16-bit) moments are widened to fp32 to be updated; taking them a chunk at
    a time bounds those working copies, and so the step's peak memory, by one chunk instead
    of a whole group (an embedding's fp32 copies alone can exceed its 8-bit state).
    """
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    decay = 1.0 - lr * group["weight_decay"]
    (step_size,) = adam_step_sizes(lr, [step], beta1)
    contiguous = target.is_contiguous()
    flat_param = target.view(-1) if contiguous else target.reshape(-1)
    flat_grad = grad.reshape(-1)
    for start, stop in storage.ranges(state, target.numel(), chunk):
        exp_avg, exp_avg_sq = storage.read_range(state, start, stop)
        piece_grad = _in_moment_dtype(flat_grad[start:stop], exp_avg)
        update_moments_([piece_grad], [exp_avg], [exp_avg_sq], beta1, beta2)
        storage.write_range(state, start, stop, exp_avg, exp_avg_sq)
        (denominator,) = adam_denominators([exp_avg_sq], [step], beta2, group["eps"])
        piece = flat_param[start:stop]
        if decay != 1.0:
            piece.mul_(decay)
        piece.add_((exp_avg / denominator).to(piece.dtype), alpha=-step_size)
    if not contiguous:
        target.copy_(flat_param.view_as(target))


# ------------------------------------------------------------------------------- the steps
def dense_step(
    group: dict[str, Any],
    views: list[ParamView],
    storage: MomentStorage,
    placement: Placement,
    chunk: int = WORKING_CHUNK,
) -> None:
    """AdamW on every view (parameters outside projected groups, and non-2-D tensors).

    Where the fused kernel does not apply, ``chunk`` bounds the elements widened at once.
    """
    if placement.checks_before_step:
        views = drop_non_finite(group, views, placement.finite_flags(views, _grads(views)))
    for view in views:
        if not view.state:
            init_dense_state(view, storage)
    if group["on_bad_gradient"] != "raise" and not placement.checks_before_step:
        # raise mode: every gradient was checked before any update (the optimizer's step())
        views = drop_non_finite(group, views, finite_flags(_grads(views)))
    if not views:
        return
    states = [view.state for view in views]
    reals = [real_view(view.local) for view in views]
    grads = [real_view(grad) for grad in _grads(views)]
    fused = fused_moments(storage, states, reals, grads)
    if fused is not None:
        beta1, beta2 = group["betas"]
        fused_adamw_(
            reals,
            grads,
            *fused,
            advance_steps(states),
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        return
    for real, grad, state, step in zip(reals, grads, states, advance_steps(states), strict=True):
        dense_update_in_chunks(group, real, grad, state, step, storage, chunk)


def _raise_missing_basis(view: ParamView, group: dict[str, Any]) -> None:
    """A parameter with GaLore state but not the basis its shape needs cannot step: raise,
    since skipping it would freeze it silently (its state belongs to another parameter)."""
    wanted = basis_keys(group["proj_type"], view.shape)
    raise RuntimeError(
        f"{view.name} (shape {tuple(view.shape)}) cannot step: its optimizer state holds no "
        f"{' and '.join(wanted)} basis for proj_type={group['proj_type']!r}, although it is "
        "not due for a refresh. The state was made for another parameter (a checkpoint loaded "
        "into param groups in another order?); load the checkpoint into the optimizer that "
        "saved it"
    )


def project_back_update(
    param: torch.Tensor,
    direction: torch.Tensor,
    bases: dict[str, torch.Tensor],
    alpha: float,
    decay: float,
) -> None:
    """``param = decay * param + alpha * back(direction)``: the default :data:`ApplyUpdate`."""
    project_back_(param, direction, bases, alpha, decay)


def projected_step(
    group: dict[str, Any],
    views: list[ParamView],
    low_rank_grads: Mapping[int, torch.Tensor],
    storage: MomentStorage,
    placement: Placement,
    apply_update: ApplyUpdate = project_back_update,
) -> None:
    """GaLore on every view: refresh where due, project, Adam in low rank, project back.

    ``low_rank_grads[view.index]``, where given, is the gradient already projected with the
    current bases (layer-wise accumulation); ``view.grad`` is then not read.
    """
    if placement.checks_before_step:
        # A layer-wise step's gradient may be its low-rank sum (FSDP2: this rank's G_k Q).
        grads = [low_rank_grads.get(view.index, view.grad) for view in views]
        views = drop_non_finite(group, views, placement.finite_flags(views, _present(grads)))
    kept: list[ParamView] = []
    lows: list[torch.Tensor] = []
    bases_of: dict[int, dict[str, torch.Tensor]] = {}
    energy: list[tuple[ParamView, torch.Tensor]] = []
    for view in views:
        state = view.state
        if not state:
            init_projected_state(view, group, storage)
        step = int(state[keys.STEP]) + 1
        refreshing = step >= state[keys.NEXT_REFRESH]
        if refreshing:
            # raise mode: every gradient was checked before any update (the optimizer's step())
            checked = group["on_bad_gradient"] == "raise" or placement.checks_before_step
            if not checked and not finite_flags(_grads([view]))[0]:
                bad_gradient(group, [view.name])
                continue
            keys_used = basis_keys(group["proj_type"], view.shape)
            rank = effective_rank(group["rank"], view.shape)
            placement.refresh(view, group, keys_used, rank, step, storage)
        bases = read_bases(state, group, view.shape, view.param.dtype)
        if not bases:
            if refreshing:
                continue  # the refresh failed and was skipped (warned): nothing to project with
            _raise_missing_basis(view, group)
        bases_of[id(view)] = bases
        # Working precision fp32 for 16-bit parameters: P^T G of an fp16 gradient overflows
        # (entries add up over a whole side), and the Adam math on fp16 low-rank buffers
        # loses eps (1e-8 is 0 in fp16) and small second moments. The moments are still
        # stored in the parameter's dtype; the update is applied in it.
        low = low_rank_grads.get(view.index)
        if low is None:
            low = project(as_fp32(view.grad), _widened(bases))
        low = as_fp32(low)
        if step == state[keys.LAST_REFRESH] + 1:
            energy.append((view, low))
        kept.append(view)
        lows.append(low)
    if energy:
        config = StabilityConfig.from_group(group)
        values = placement.captured_energies([v for v, _ in energy], [low for _, low in energy])
        for (view, _), value in zip(energy, values, strict=True):
            record_captured_energy_(view.state, config, value)
    low_of = {id(view): low for view, low in zip(kept, lows, strict=True)}
    if not placement.checks_before_step:
        kept = drop_non_finite(group, kept, finite_flags(lows))
    if not kept:
        return
    scale = float(group["scale"])
    # Quantized moments are widened to fp32 to be updated: one parameter at a time keeps
    # those copies to one layer's worth (plain moments go through the fused kernel at once).
    batch = len(kept) if storage.plain_tensors else 1
    for first in range(0, len(kept), batch):
        chunk = kept[first : first + batch]
        directions, step_sizes, decay = low_rank_directions(
            group, [view.state for view in chunk], [low_of[id(view)] for view in chunk], storage
        )
        for view, direction, step_size in zip(chunk, directions, step_sizes, strict=True):
            apply_update(
                view.local,
                direction.to(view.local.dtype),
                bases_of[id(view)],
                -step_size * scale,
                decay,
            )
