"""GaLoreAdamW: AdamW whose moments for 2-D weights live in a periodically refreshed subspace.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024.
For a projected weight ``W`` (``m x n``) with gradient ``G`` and orthonormal basis ``P``:

    R_t = P^T G_t                              (or G_t Q, or P^T G_t Q; see ``proj_type``)
    m_t, v_t = Adam moments of R_t             (shape of R_t, not of W)
    W_t = (1 - lr * wd) W_{t-1} - lr * scale * P d_t,   d_t = Adam direction (moments.py)

and ``P`` is recomputed from the current gradient every ``update_proj_gap`` steps (or on the
adaptive schedule of :mod:`lowrank_optim.stability`). Weight decay acts in full space.
Parameters in groups without ``rank``, and every tensor that is not 2-D, get plain AdamW.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lowrank_optim import state_keys as keys
from lowrank_optim.basis_storage import basis_fixed_dtype_keys, read_basis
from lowrank_optim.config import (
    ProjectionConfig,
    StabilityConfig,
    validate_adam_hyperparameters,
    validate_on_bad_gradient,
)
from lowrank_optim.distributed import fsdp  # FSDP2 DTensor parameters
from lowrank_optim.errors import CheckpointMismatchError, NonFiniteGradientError
from lowrank_optim.moment_storage import (
    WORKING_CHUNK,
    FullPrecisionMoments,
    MomentStorage,
    _as_fp32,
)
from lowrank_optim.moments import (
    adam_denominators,
    adam_step_sizes,
    fused_adamw_,
    fused_kernel_applies,
    update_moments_,
)
from lowrank_optim.optim.refresh import refresh_parameter
from lowrank_optim.projection import (
    LEFT,
    RIGHT,
    basis_keys,
    effective_rank,
    low_rank_shape,
    project,
    project_back_,
)
from lowrank_optim.reporting import SubspaceRow, subspace_report
from lowrank_optim.stability import (
    captured_energy,
    init_stability_state,
    record_captured_energy_,
    upgrade_legacy_metrics,
)

__all__ = ["GaLoreAdamW"]

#: Group keys that fix the shapes (or the stored form) of the state; a checkpoint must agree.
_STRUCTURAL_KEYS = ("rank", "proj_type", "proj_bits")


def _real_view(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor as real ``(..., 2)`` pairs (a view); a real tensor as it is.

    ``torch.optim.AdamW`` steps a complex parameter as ``view_as_real``: Adam on the real and
    imaginary parts as independent real coordinates. Squaring a complex gradient instead
    (``g * g``, not ``|g|^2``) would mix the parts and move the wrong one.
    """
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _widened(bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """16-bit bases as fp32 copies (the working precision of a 16-bit parameter's projection)."""
    return {key: _as_fp32(basis) for key, basis in bases.items()}


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection for param groups that set ``rank``.

    Args:
        params: tensors, ``(name, tensor)`` pairs (e.g. ``model.named_parameters()``), or param
            groups. A group with a ``rank`` key (galore-torch's convention, together with
            ``update_proj_gap``, ``scale`` and ``proj_type``) or a ``projection`` entry holding a
            :class:`ProjectionConfig` is projected; others get plain AdamW.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        projection: defaults for the projection keys of projected groups (its ``rank`` is used
            only for groups that set ``projection=True``).
        stability: metrics and adaptive-gap policy (:class:`StabilityConfig`).
        on_bad_gradient: ``raise`` (default) or ``skip`` on a NaN/Inf gradient or a failed SVD.

    Example:
        >>> groups = [{"params": other}, {"params": matrices, "rank": 128,
        ...            "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]
        >>> optimizer = GaLoreAdamW(groups, lr=1e-3)
    """

    #: How moments are kept between steps (full precision here; 8-bit in GaLoreAdamW8bit).
    moment_storage: MomentStorage = FullPrecisionMoments()

    @property
    def _fixed_dtype_keys(self) -> frozenset[str]:
        """State entries whose dtype is fixed by design (not cast to the parameter's on load)."""
        return self.moment_storage.fixed_dtype_keys | basis_fixed_dtype_keys((LEFT, RIGHT))

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        projection: ProjectionConfig | None = None,
        stability: StabilityConfig | None = None,
        on_bad_gradient: str = "raise",
    ) -> None:
        validate_adam_hyperparameters(lr, betas, eps, weight_decay)
        validate_on_bad_gradient(on_bad_gradient)
        self._default_projection = projection or ProjectionConfig()
        projection_defaults = self._default_projection.to_group()
        del projection_defaults["rank"]  # a group is projected only if it sets a rank itself
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "on_bad_gradient": on_bad_gradient,
            **projection_defaults,
            **(stability or StabilityConfig()).to_group(),
        }
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        projection = group.pop("projection", None)
        if projection is True:
            projection = self._default_projection
        if isinstance(projection, ProjectionConfig):
            group = {**projection.to_group(), **group}  # keys the group sets itself win
        elif projection not in (None, False):
            raise ValueError(
                f"Invalid projection: {projection!r}; expected a ProjectionConfig, True or None"
            )
        stability = group.pop("stability", None)
        if isinstance(stability, StabilityConfig):
            group.update(stability.to_group())
        elif stability is not None:
            raise ValueError(f"Invalid stability: {stability!r}; expected a StabilityConfig")
        super().add_param_group(group)
        self._validate_group(self.param_groups[-1])
        self._check_group_params(self.param_groups[-1])

    def _check_group_params(self, group: dict[str, Any]) -> None:
        """Refuse complex projected parameters; warn once per layer about a clipped rank.

        GaLore's bases are real singular vectors of a real gradient: a complex matrix would need
        a complex SVD and conjugate projections, so it is refused here rather than stepped
        wrongly (complex parameters outside projected groups get AdamW on their real view, as
        in ``torch.optim.AdamW``). A rank above ``min(m, n)`` is clipped to it, which leaves
        low-rank moments the size of a full side of the matrix plus an ``m x m`` (or ``n x n``)
        basis: at least as much state as AdamW's.
        """
        if group.get("rank") is None:
            return
        rank = group["rank"]
        for index, param in enumerate(group["params"]):
            if param.dim() != 2:
                continue
            name = self.param_name(group, index)
            if param.is_complex():
                raise ValueError(
                    f"Invalid parameter {name}: complex dtype {param.dtype} in a projected group "
                    f"(rank={rank}); GaLore projection supports real parameters only. Put it in "
                    "a group without `rank` (stepped as AdamW on its real view, as "
                    "torch.optim.AdamW does) or train its real and imaginary parts as real tensors"
                )
            size = min(param.shape)
            if rank > size:
                warnings.warn(
                    f"rank={rank} exceeds the size of {name} (shape {tuple(param.shape)}); it is "
                    f"clipped to {size}, so its optimizer state is at least as large as AdamW's "
                    "(moments of a full side plus the basis). Lower the rank or leave this "
                    "parameter unprojected",
                    UserWarning,
                    stacklevel=5,  # the line that built the optimizer
                )

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        validate_adam_hyperparameters(
            group["lr"], group["betas"], group["eps"], group["weight_decay"]
        )
        validate_on_bad_gradient(group["on_bad_gradient"])
        StabilityConfig.from_group(group)
        if group.get("rank") is not None:
            ProjectionConfig.from_group(group)

    @staticmethod
    def _validate_step_hyperparameters(groups: Sequence[dict[str, Any]]) -> None:
        """Re-check lr, betas, eps and weight decay before a step updates anything.

        A scheduler or user code may have set a tensor, a string or NaN since construction, and
        ``float(group["lr"])`` would silently accept a string or a 1-element tensor.
        """
        for group in groups:
            validate_adam_hyperparameters(
                group["lr"], group["betas"], group["eps"], group["weight_decay"]
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Checkpoints from older versions lack newer keys: fill them with today's defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def subspace_report(self) -> list[SubspaceRow]:
        """One row per projected layer: name, shape, rank, gap, last overlap, captured energy,
        whether it is stable and since which step, and its refresh counts."""
        return subspace_report(self)

    @staticmethod
    def is_projected(group: dict[str, Any], param: torch.Tensor) -> bool:
        """Whether ``param`` is stepped in a low-rank subspace under ``group``."""
        return group.get("rank") is not None and param.dim() == 2

    # ------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [
            (group, [i for i, param in enumerate(group["params"]) if param.grad is not None])
            for group in self.param_groups
        ]
        self._validate_step_hyperparameters(self.param_groups)
        self._raise_before_update([(group, indices, {}) for group, indices in work])
        for group, with_grad in work:
            self._step_group(group, with_grad, {})
        return loss

    @torch.no_grad()
    def step_parameters(
        self,
        group_index: int,
        indices: Sequence[int],
        low_rank_grads: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        """Step only ``param_groups[group_index]["params"][i]`` for ``i`` in ``indices``.

        The entry point of layer-wise updates (:mod:`lowrank_optim.layerwise`), which step each
        parameter inside backward. ``low_rank_grads[i]``, where given, is that parameter's
        gradient already in low-rank coordinates (``R = P^T G``, summed over micro-batches,
        projected with :meth:`next_step_bases`); its ``.grad`` is then not read.
        """
        group = self.param_groups[group_index]
        for index in low_rank_grads or {}:
            if self.next_step_bases(group, group["params"][index]) is None:
                raise ValueError(
                    f"Invalid low-rank gradient for {self.param_name(group, index)}: its next "
                    "step needs the full gradient (it is not projected, refreshes its basis, "
                    "records captured energy or has no basis yet)"
                )
        self._validate_step_hyperparameters([group])
        self._raise_before_update([(group, indices, low_rank_grads or {})])
        self._step_group(group, indices, low_rank_grads or {})

    def next_step_bases(
        self, group: dict[str, Any], param: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """The bases ``param``'s next step will project its gradient with, if known now.

        ``None`` when that step needs the full gradient ``G``: the parameter is not projected,
        has no basis yet, refreshes its basis (the SVD runs on ``G``) or records the captured
        energy ``||P^T G||^2 / ||G||^2`` (the step after a refresh).
        """
        state = self.state.get(param)
        if not state or not self.is_projected(group, param):
            return None
        step = int(state[keys.STEP]) + 1
        if step >= state[keys.NEXT_REFRESH] or step == state[keys.LAST_REFRESH] + 1:
            return None
        return self._bases(group, param) or None

    def _step_group(
        self,
        group: dict[str, Any],
        indices: Sequence[int],
        low_rank_grads: Mapping[int, torch.Tensor],
    ) -> None:
        dense, projected = [], []
        for index in indices:
            param = group["params"][index]
            if index in low_rank_grads:
                projected.append((index, param))
                continue
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            target = projected if self.is_projected(group, param) else dense
            target.append((index, param))
        if dense:
            self._dense_step(group, dense)
        if projected:
            self._projected_step(group, projected, low_rank_grads)

    def _dense_step(self, group: dict[str, Any], items: list[tuple[int, torch.Tensor]]) -> None:
        items = fsdp.step_sharded(self, group, items, projected=False)  # steps DTensors
        for _, param in items:
            state = self.state[param]
            if not state:
                state[keys.STEP] = 0
                real = _real_view(param)  # complex: moments of the real view, as torch's AdamW
                self.moment_storage.init(state, tuple(real.shape), real)
        if group["on_bad_gradient"] != "raise":  # raise: checked before any update (step())
            items = self._drop_non_finite(group, items, [param.grad for _, param in items])
        if not items:
            return
        params = [param for _, param in items]
        reals = [_real_view(param) for param in params]
        grads = [_real_view(param.grad) for param in params]
        fused = self._fused_state(params, reals, grads)
        if fused is not None:
            beta1, beta2 = group["betas"]
            fused_adamw_(
                reals,
                grads,
                *fused,
                self._advance_steps(params),
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
            return
        for param, step in zip(params, self._advance_steps(params), strict=True):
            self._dense_update_in_chunks(group, param, step)

    def _dense_update_in_chunks(
        self, group: dict[str, Any], param: torch.Tensor, step: int
    ) -> None:
        """AdamW on one parameter, ``WORKING_CHUNK`` elements at a time.

        Quantized (or 16-bit) moments are widened to fp32 to be updated; taking them a chunk at
        a time bounds those working copies, and so the step's peak memory, by one chunk instead
        of a whole group (an embedding's fp32 copies alone can exceed its 8-bit state).
        """
        state = self.state[param]
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        decay = 1.0 - lr * group["weight_decay"]
        (step_size,) = adam_step_sizes(lr, [step], beta1)
        target = _real_view(param)
        contiguous = target.is_contiguous()
        flat_param = target.view(-1) if contiguous else target.reshape(-1)
        flat_grad = _real_view(param.grad).reshape(-1)
        for start, stop in self.moment_storage.ranges(state, target.numel(), WORKING_CHUNK):
            exp_avg, exp_avg_sq = self.moment_storage.read_range(state, start, stop)
            grad = _as_fp32(flat_grad[start:stop])
            update_moments_([grad], [exp_avg], [exp_avg_sq], beta1, beta2)
            self.moment_storage.write_range(state, start, stop, exp_avg, exp_avg_sq)
            (denominator,) = adam_denominators([exp_avg_sq], [step], beta2, group["eps"])
            piece = flat_param[start:stop]
            if decay != 1.0:
                piece.mul_(decay)
            piece.add_((exp_avg / denominator).to(piece.dtype), alpha=-step_size)
        if not contiguous:
            target.copy_(flat_param.view_as(target))

    def _projected_step(
        self,
        group: dict[str, Any],
        items: list[tuple[int, torch.Tensor]],
        low_rank_grads: Mapping[int, torch.Tensor],
    ) -> None:
        items = fsdp.step_sharded(self, group, items, projected=True)  # steps DTensors
        kept, lows = [], []
        bases_of: dict[int, dict[str, torch.Tensor]] = {}
        for index, param in items:
            state = self.state[param]
            if not state:
                self._init_projected_state(group, param)
            name = self.param_name(group, index)
            step = int(state[keys.STEP]) + 1
            if step >= state[keys.NEXT_REFRESH]:
                # raise mode: every gradient was checked before any update (step())
                if group["on_bad_gradient"] != "raise" and not self._grad_is_finite(
                    group, param, name
                ):
                    continue
                keys_used = basis_keys(group["proj_type"], param.shape)
                rank = effective_rank(group["rank"], param.shape)
                refresh_parameter(
                    param, state, group, keys_used, rank, step, name, self.moment_storage
                )
            bases = self._bases(group, param)
            if not bases:
                continue  # the first refresh failed and was skipped: nothing to project with
            bases_of[index] = bases
            # Working precision fp32 for 16-bit parameters: P^T G of an fp16 gradient overflows
            # (entries add up over a whole side), and the Adam math on fp16 low-rank buffers
            # loses eps (1e-8 is 0 in fp16) and small second moments. The moments are still
            # stored in the parameter's dtype; the update is applied in it.
            low = low_rank_grads.get(index)
            if low is None:
                low = project(_as_fp32(param.grad), _widened(bases))
            low = _as_fp32(low)
            if step == state[keys.LAST_REFRESH] + 1:
                record_captured_energy_(
                    state, StabilityConfig.from_group(group), captured_energy(low, param.grad)
                )
            kept.append((index, param))
            lows.append(low)
        kept_lows = dict(zip([i for i, _ in kept], lows, strict=True))
        kept = self._drop_non_finite(group, kept, lows)
        if not kept:
            return
        scale = float(group["scale"])
        # Quantized moments are widened to fp32 to be updated: one parameter at a time keeps
        # those copies to one layer's worth (plain moments go through the fused kernel at once).
        batch = len(kept) if self.moment_storage.plain_tensors else 1
        for first in range(0, len(kept), batch):
            chunk = kept[first : first + batch]
            directions, step_sizes, decay = self._low_rank_directions(
                group, [param for _, param in chunk], [kept_lows[index] for index, _ in chunk]
            )
            for (index, param), direction, step_size in zip(
                chunk, directions, step_sizes, strict=True
            ):
                self._apply_projected_update(
                    param, direction.to(param.dtype), bases_of[index], -step_size * scale, decay
                )

    def _fused_state(
        self,
        params: list[torch.Tensor],
        updated: list[torch.Tensor],
        grads: list[torch.Tensor],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """``(exp_avgs, exp_avg_sqs)`` of ``params`` if torch's fused AdamW kernel can update
        ``updated`` (the parameters, or low-rank buffers of their moments' shape) with
        ``grads``; ``None`` otherwise (quantized moments, mixed dtypes, DTensors)."""
        if not self.moment_storage.plain_tensors:
            return None
        states = [self.state[param] for param in params]
        if any(keys.EXP_AVG not in state for state in states):
            return None
        exp_avgs = [state[keys.EXP_AVG] for state in states]
        exp_avg_sqs = [state[keys.EXP_AVG_SQ] for state in states]
        if any(m.dtype != u.dtype for m, u in zip(exp_avgs, updated, strict=True)):
            return None
        if not fused_kernel_applies(updated, grads, exp_avgs, exp_avg_sqs):
            return None
        return exp_avgs, exp_avg_sqs

    def _advance_steps(self, params: list[torch.Tensor]) -> list[int]:
        """Count one more step for each parameter; returns the new step numbers ``t``."""
        steps = []
        for param in params:
            state = self.state[param]
            state[keys.STEP] = int(state[keys.STEP]) + 1
            steps.append(state[keys.STEP])
        return steps

    def _low_rank_directions(
        self, group: dict[str, Any], params: list[torch.Tensor], lows: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[float], float]:
        """Advance the low-rank moments; returns ``(directions, step sizes, decay)``.

        The update is ``param = decay * param - step_size * scale * back(direction)``.
        """
        fused = self._fused_state(params, lows, lows)
        if fused is None:
            exp_avgs, denominators, step_sizes, decay = self._adam_moments(group, params, lows)
            return torch._foreach_div(exp_avgs, denominators), step_sizes, decay
        # The fused kernel applied with lr = 1 and no decay to zero buffers leaves exactly
        # -(m_t / (1 - beta1^t)) / denominator_t in them: the whole Adam direction in one pass.
        directions = [torch.zeros_like(low) for low in lows]
        beta1, beta2 = group["betas"]
        fused_adamw_(
            directions,
            lows,
            *fused,
            self._advance_steps(params),
            lr=1.0,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=0.0,
        )
        lr = float(group["lr"])
        return directions, [-lr] * len(directions), 1.0 - lr * group["weight_decay"]

    def _adam_moments(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], float]:
        """Advance the moments; returns ``(m, denominators, step sizes, decay)``.

        The update is ``param = decay * param - step_size * back(m / denominator)`` with
        ``decay = 1 - lr * wd`` (decoupled weight decay, in full space) and
        ``step_size = lr / (1 - beta1^t)``; see :mod:`lowrank_optim.moments`.
        """
        beta1, beta2 = group["betas"]
        steps = self._advance_steps(params)
        states = [self.state[param] for param in params]
        # Working moments are fp32 (or wider): eps = 1e-8 underflows to 0 in fp16, and 0/0 would
        # turn into NaN updates. The storage decides how they are kept between steps.
        working = [self.moment_storage.read(state) for state in states]
        exp_avgs = [exp_avg for exp_avg, _ in working]
        exp_avg_sqs = [exp_avg_sq for _, exp_avg_sq in working]
        update_moments_([_as_fp32(g) for g in grads], exp_avgs, exp_avg_sqs, beta1, beta2)
        for state, exp_avg, exp_avg_sq in zip(states, exp_avgs, exp_avg_sqs, strict=True):
            self.moment_storage.write(state, exp_avg, exp_avg_sq)
        denominators = adam_denominators(exp_avg_sqs, steps, beta2, group["eps"])
        lr = float(group["lr"])
        return (
            exp_avgs,
            denominators,
            adam_step_sizes(lr, steps, beta1),
            1.0 - lr * group["weight_decay"],
        )

    # ------------------------------------------------------------------------------ state
    def _init_projected_state(self, group: dict[str, Any], param: torch.Tensor) -> None:
        state = self.state[param]
        rank = effective_rank(group["rank"], param.shape)
        shape = low_rank_shape(group["proj_type"], param.shape, rank)
        state[keys.STEP] = 0
        self.moment_storage.init(state, shape, param)
        state[keys.REFRESH_GAP] = int(group["update_proj_gap"])
        state[keys.NEXT_REFRESH] = 1
        state[keys.LAST_REFRESH] = 0
        state[keys.REFRESHES] = 0
        state[keys.REFRESHES_SKIPPED] = 0
        state[keys.REFRESHES_FAILED] = 0
        init_stability_state(state, StabilityConfig.from_group(group))

    def _bases(self, group: dict[str, Any], param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameter's current bases in its dtype (empty before the first refresh)."""
        state = self.state[param]
        bases = {}
        for key in basis_keys(group["proj_type"], param.shape):
            basis = read_basis(state, key, group.get("proj_bits"), param.dtype)
            if basis is None:
                return {}
            bases[key] = basis
        return bases

    def _apply_projected_update(
        self,
        param: torch.Tensor,
        direction: torch.Tensor,
        bases: dict[str, torch.Tensor],
        alpha: float,
        decay: float,
    ) -> None:
        """``param = decay * param + alpha * back(direction)``; QGaLoreAdamW overrides it."""
        project_back_(param, direction, bases, alpha, decay)

    def param_name(self, group: dict[str, Any], index: int) -> str:
        """The parameter's name if the optimizer was given names, else ``group[g].params[i]``."""
        names = group.get("param_names")
        if names is not None:
            return str(names[index])
        # By identity: list.index compares dicts with ==, which compares their tensors.
        position = next(i for i, g in enumerate(self.param_groups) if g is group)
        return f"param_groups[{position}].params[{index}]"

    # ----------------------------------------------------------------------- bad gradients
    def _grad_is_finite(self, group: dict[str, Any], param: torch.Tensor, name: str) -> bool:
        if self._finite_flags([param.grad])[0]:
            return True
        self._bad_gradient(group, [name])
        return False

    @staticmethod
    def _finite_flags(grads: list[torch.Tensor]) -> list[bool]:
        """Whether each tensor is all finite: one fused kernel and a single host sync.

        Uses the max-norm ``max |g|``: it is an element of ``g`` (never overflows, unlike the
        2-norm of a finite fp16 gradient of 300s on 256 x 256, which is 76800 > 65504) and is
        NaN or Inf exactly when some element is.
        """
        if not grads:
            return []
        norms = torch._foreach_norm(grads, math.inf)
        device = norms[0].device
        stacked = torch.stack([norm.to(device=device, dtype=torch.float32) for norm in norms])
        return torch.isfinite(stacked).tolist()

    def _raise_before_update(
        self, work: Sequence[tuple[dict[str, Any], Sequence[int], Mapping[int, torch.Tensor]]]
    ) -> None:
        """In ``raise`` mode, check every gradient of the step before anything is updated.

        :class:`NonFiniteGradientError` promises that no update was applied, so the check cannot
        be group by group (the groups, and the dense half of a group, stepped before the bad
        parameter would already have moved) nor follow a basis refresh. ``work`` holds
        ``(group, indices, low_rank_grads)``; a given low-rank gradient is checked in place of
        ``.grad``. FSDP2 ``DTensor`` gradients are checked across ranks by
        :mod:`lowrank_optim.distributed.fsdp` instead.
        """
        where, grads = [], []
        for group, indices, low_rank_grads in work:
            if group["on_bad_gradient"] != "raise":
                continue
            for index in indices:
                grad = low_rank_grads.get(index, group["params"][index].grad)
                if grad is None or grad.is_sparse or isinstance(grad, DTensor):
                    continue
                where.append((group, index))
                grads.append(grad)
        flags = self._finite_flags(grads)
        if all(flags):
            return
        bad = [self.param_name(g, i) for (g, i), ok in zip(where, flags, strict=True) if not ok]
        self._bad_gradient(where[flags.index(False)][0], bad)

    def _drop_non_finite(
        self,
        group: dict[str, Any],
        items: list[tuple[int, torch.Tensor]],
        grads: list[torch.Tensor],
    ) -> list[tuple[int, torch.Tensor]]:
        """Items whose gradient is finite; raises or warns about the others.

        One fused max-norm over the list and a single host sync (see :meth:`_finite_flags`).
        """
        if not items:
            return items
        finite = self._finite_flags(grads)
        if all(finite):
            return items
        bad = [
            self.param_name(group, index)
            for (index, _), ok in zip(items, finite, strict=True)
            if not ok
        ]
        self._bad_gradient(group, bad)
        return [item for item, ok in zip(items, finite, strict=True) if ok]

    def _bad_gradient(self, group: dict[str, Any], names: list[str]) -> None:
        message = f"Non-finite (NaN or Inf) gradient in {', '.join(names)}"
        if group["on_bad_gradient"] == "raise":
            raise NonFiniteGradientError(
                f"{message}; no update was applied. Pass on_bad_gradient='skip' to skip such "
                "updates with a warning instead."
            )
        warnings.warn(f"{message}; skipping its update this step", stacklevel=4)

    # ------------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, refusing one saved for other shapes or another rank/proj_type.

        torch casts every loaded floating tensor, and every tensor of a floating parameter, to
        the parameter's dtype. Metric histories must stay fp32 and integer or quantized state
        must keep its dtype, so those entries bypass that cast and are only moved to the
        parameter's device.
        """
        self._check_compatible(state_dict)
        held: dict[Any, dict[str, torch.Tensor]] = {}
        stripped_state = {}
        for param_id, entry in state_dict.get("state", {}).items():
            entry = upgrade_legacy_metrics(entry)
            keep = {
                key: value
                for key, value in entry.items()
                if isinstance(value, torch.Tensor)
                and (key in self._fixed_dtype_keys or not value.is_floating_point())
            }
            held[param_id] = keep
            stripped_state[param_id] = {k: v for k, v in entry.items() if k not in keep}
        super().load_state_dict({**state_dict, "state": stripped_state})
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for param_id, param in zip(saved_ids, params, strict=True):
            for key, value in held.get(param_id, {}).items():
                self.state[param][key] = value.to(device=param.device)

    def _check_compatible(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise CheckpointMismatchError(
                f"Checkpoint has {len(saved_groups)} param groups; this optimizer has "
                f"{len(self.param_groups)}"
            )
        saved_state = state_dict.get("state", {})
        for group_index, (saved, group) in enumerate(
            zip(saved_groups, self.param_groups, strict=True)
        ):
            for key in _STRUCTURAL_KEYS:
                if saved.get(key) != group.get(key):
                    raise CheckpointMismatchError(
                        f"Checkpoint param group {group_index} was saved with {key}="
                        f"{saved.get(key)!r}; this optimizer has {key}={group.get(key)!r}"
                    )
            if len(saved["params"]) != len(group["params"]):
                continue  # torch's own check reports this with its usual message
            for index, (saved_id, param) in enumerate(
                zip(saved["params"], group["params"], strict=True)
            ):
                entry = saved_state.get(saved_id)
                if entry is None:
                    continue
                projected = self.is_projected(group, param)
                if projected:
                    rank = effective_rank(group["rank"], param.shape)
                    expected = low_rank_shape(group["proj_type"], param.shape, rank)
                    numel: int | None = math.prod(expected)
                else:
                    numel = _real_view(param).numel()
                # A sharded parameter's moments follow its local rows: size unknown here.
                problem = self.moment_storage.layout_problem(
                    entry, None if isinstance(param, DTensor) else numel
                )
                if problem is not None:
                    raise CheckpointMismatchError(
                        f"Checkpoint state of {self.param_name(group, index)} (param group "
                        f"{group_index}) {problem}. It was saved by an optimizer with another "
                        "moment storage (GaLoreAdamW keeps full-precision moments, "
                        "GaLoreAdamW8bit and QGaLoreAdamW quantized ones); load it into the "
                        "class (and moment_bits) that saved it"
                    )
                if not projected:
                    continue
                found = self.moment_storage.numel(entry)
                if found != math.prod(expected):
                    raise CheckpointMismatchError(
                        f"Checkpoint moments of param group {group_index} have {found} elements; "
                        f"a parameter of shape {tuple(param.shape)} at rank {rank} needs {expected}"
                    )
