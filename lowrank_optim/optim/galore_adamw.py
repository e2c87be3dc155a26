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

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from lowrank_optim import functional as F
from lowrank_optim import state_keys as keys
from lowrank_optim.basis_storage import basis_fixed_dtype_keys
from lowrank_optim.config import (
    ProjectionConfig,
    StabilityConfig,
    validate_adam_hyperparameters,
    validate_on_bad_gradient,
)
from lowrank_optim.moment_storage import WORKING_CHUNK, FullPrecisionMoments, MomentStorage
from lowrank_optim.optim.checkpoints import check_compatible, split_fixed_dtype
from lowrank_optim.optim.groups import (
    check_projected_params,
    expand_group,
    validate_group,
    validate_step_hyperparameters,
)
from lowrank_optim.placement import Placement, StepContext, placement_for
from lowrank_optim.projection import LEFT, RIGHT, effective_rank, low_rank_shape
from lowrank_optim.reporting import SubspaceRow, subspace_report

__all__ = ["GaLoreAdamW"]

Item = tuple[int, torch.Tensor]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package and torch: a warning from a
    constructor then points at the user's line, whatever the depth of subclass ``__init__``s
    (Python 3.12's ``skip_file_prefixes`` does this; 3.10 lacks it)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


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
    #: True while :meth:`step_parameters` steps (layer-wise updates), for the placements.
    _layerwise_step: bool = False

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
        if not any(group.get("rank") is not None for group in self.param_groups):
            warnings.warn(
                f"{type(self).__name__} has no projected param group (none sets `rank` or "
                "`projection`), so it steps every parameter as plain AdamW, with AdamW's "
                "memory. Build the groups with "
                "lowrank_optim.factory.lowrank_param_groups(model, ...) or give a group "
                "`projection=ProjectionConfig(...)`",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )

    # ----------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(expand_group(param_group, self._default_projection))
        group = self.param_groups[-1]
        validate_group(group)
        check_projected_params(group, self.param_name)

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
        validate_step_hyperparameters(self.param_groups)
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
        validate_step_hyperparameters([group])
        self._raise_before_update([(group, indices, low_rank_grads or {})])
        # Placements are told: FSDP2 refuses a step whose gradient shard is not all there.
        self._layerwise_step = True
        try:
            self._step_group(group, indices, low_rank_grads or {})
        finally:
            self._layerwise_step = False

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
        return F.read_bases(state, group, param.shape, param.dtype) or None

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
            self._dispatch(group, dense, low_rank_grads, projected=False)
        if projected:
            self._dispatch(group, projected, low_rank_grads, projected=True)

    def _dispatch(
        self,
        group: dict[str, Any],
        items: list[Item],
        low_rank_grads: Mapping[int, torch.Tensor],
        projected: bool,
    ) -> None:
        """Step ``items`` placement by placement on the local views each placement gives."""
        by_placement: dict[Placement, list[Item]] = {}
        for item in items:
            by_placement.setdefault(placement_for(item[1]), []).append(item)
        for placement, part in by_placement.items():
            views = [self._view(group, index, param, placement, projected) for index, param in part]
            try:
                if projected:
                    F.projected_step(
                        group,
                        views,
                        low_rank_grads,
                        self.moment_storage,
                        placement,
                        self._apply_projected_update,
                    )
                else:
                    # The module's WORKING_CHUNK at call time (tests patch it).
                    F.dense_step(group, views, self.moment_storage, placement, WORKING_CHUNK)
            finally:
                for view in views:
                    placement.close_state(
                        self.state[view.param],
                        view.state,
                        view.param,
                        view.moment_shape,
                        self.moment_storage,
                    )

    def _view(
        self,
        group: dict[str, Any],
        index: int,
        param: torch.Tensor,
        placement: Placement,
        projected: bool,
    ) -> F.ParamView:
        """``param`` as ``placement`` lays it out here, after its refusals are checked."""
        name = self.param_name(group, index)
        state = self.state[param]
        context = StepContext(
            layerwise=self._layerwise_step, int8_weight=self.updates_int8_weight(param)
        )
        placement.check(
            param, name, group, state, self.moment_storage, projected=projected, context=context
        )
        shape = tuple(param.shape)
        if projected:
            rank = effective_rank(group["rank"], shape)
            moment_shape = low_rank_shape(group["proj_type"], shape, rank)
        else:
            moment_shape = tuple(F.real_view(param).shape)
        grad = None if param.grad is None else placement.local(param.grad)
        return F.ParamView(
            index=index,
            name=name,
            param=param,
            local=placement.local(param),
            grad=grad,
            state=placement.open_state(state, param, moment_shape, self.moment_storage),
            shape=shape,
            moment_shape=moment_shape,
            local_moment_shape=placement.local_shape(param, moment_shape),
        )

    def updates_int8_weight(self, param: torch.Tensor) -> bool:
        """Whether this optimizer updates ``param``'s INT8 codes itself (QGaLoreAdamW)."""
        return False

    def _apply_projected_update(
        self,
        param: torch.Tensor,
        direction: torch.Tensor,
        bases: dict[str, torch.Tensor],
        alpha: float,
        decay: float,
    ) -> None:
        """``param = decay * param + alpha * back(direction)``; QGaLoreAdamW overrides it."""
        F.project_back_update(param, direction, bases, alpha, decay)

    def param_name(self, group: dict[str, Any], index: int) -> str:
        """The parameter's name if the optimizer was given names, else ``group[g].params[i]``."""
        names = group.get("param_names")
        if names is not None:
            return str(names[index])
        # By identity: list.index compares dicts with ==, which compares their tensors.
        position = next(i for i, g in enumerate(self.param_groups) if g is group)
        return f"param_groups[{position}].params[{index}]"

    # ----------------------------------------------------------------------- bad gradients
    def _raise_before_update(
        self, work: Sequence[tuple[dict[str, Any], Sequence[int], Mapping[int, torch.Tensor]]]
    ) -> None:
        """In ``raise`` mode, check every gradient of the step before anything is updated.

        :class:`NonFiniteGradientError` promises that no update was applied, so the check cannot
        be group by group (the groups, and the dense half of a group, stepped before the bad
        parameter would already have moved) nor follow a basis refresh. ``work`` holds
        ``(group, indices, low_rank_grads)``; a given low-rank gradient is checked in place of
        ``.grad``. Placements that check across ranks (FSDP2) do so at the start of the group.
        """
        where, grads = [], []
        for group, indices, low_rank_grads in work:
            if group["on_bad_gradient"] != "raise":
                continue
            for index in indices:
                param = group["params"][index]
                grad = low_rank_grads.get(index, param.grad)
                if grad is None or grad.is_sparse or placement_for(param).checks_before_step:
                    continue
                where.append((group, index))
                grads.append(grad)
        flags = F.finite_flags(grads)
        if all(flags):
            return
        bad = [self.param_name(g, i) for (g, i), ok in zip(where, flags, strict=True) if not ok]
        F.bad_gradient(where[flags.index(False)][0], bad)

    # ------------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, refusing one saved for other shapes, another rank/proj_type or
        another moment storage (:mod:`lowrank_optim.optim.checkpoints`).

        Entries whose dtype is fixed by design (metric histories, integer and quantized state)
        bypass torch's cast to the parameter's dtype and are only moved to its device.
        """
        check_compatible(
            state_dict, self.param_groups, self.moment_storage, self.is_projected, self.param_name
        )
        held, rest = split_fixed_dtype(state_dict.get("state", {}), self._fixed_dtype_keys)
        super().load_state_dict({**state_dict, "state": rest})
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for param_id, param in zip(saved_ids, params, strict=True):
            for key, value in held.get(param_id, {}).items():
                self.state[param][key] = value.to(device=param.device)
