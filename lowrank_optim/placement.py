"""Where a parameter lives, as a strategy object: the optimizer asks it, never the reverse.

Distributed Shampoo's distributor pattern: the optimizer class gathers a group's parameters,
asks the placement of each one for its local view (values, gradient, state laid out for this
process), and runs the step math of :mod:`lowrank_optim.functional` on those views. What
differs between placements is small and lives here:

* the local view of a parameter, its gradient and its state, and how state is written back;
* the basis refresh (one process: the registry's method on ``G``; FSDP2: a Gram all-reduce or
  an all-gather of row blocks);
* whether a gradient is finite (FSDP2: agreed across ranks before anything communicates);
* the captured energy ``||P^T G||^2 / ||G||^2`` (FSDP2: sums over ranks);
* refusals of what it cannot do, and the checkpoint layout of its state.

:class:`SingleProcessPlacement` is the identity. The FSDP2 ``Shard(0)`` placement lives in
:mod:`lowrank_optim.distributed.placement` and is loaded only when a parameter is a ``DTensor``
(:func:`placement_for`), so ``import lowrank_optim`` imports neither ``lowrank_optim.distributed``
nor ``torch.distributed.tensor``. A layer-wise placement (steps inside backward on DDP or FSDP2)
would be a third implementation.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowrank_optim.functional import ParamView, finite_flags
from lowrank_optim.moment_storage import MomentStorage
from lowrank_optim.projection.refresh import refresh_from_gradient
from lowrank_optim.stability import captured_energy

__all__ = [
    "SINGLE_PROCESS",
    "Placement",
    "SingleProcessPlacement",
    "StepContext",
    "placement_for",
]

_DTENSOR_MODULE = "torch.distributed.tensor"


@dataclass(frozen=True)
class StepContext:
    """What the optimizer tells a placement about the step it is about to take.

    ``layerwise``: the step runs through ``step_parameters`` (inside backward, or with a
    low-rank gradient in place of ``.grad``). ``int8_weight``: the optimizer updates this
    parameter's INT8 codes itself (QGaLoreAdamW's ``QuantizedLinear`` weights).
    """

    layerwise: bool = False
    int8_weight: bool = False


class Placement(ABC):
    """How one parameter is laid out over processes (one short subclass per layout)."""

    #: Whether the gradients' finiteness is decided by :meth:`finite_flags` at the start of a
    #: group's step (all ranks must agree before a collective) instead of by the optimizer.
    checks_before_step: bool = False

    @abstractmethod
    def check(
        self,
        param: torch.Tensor,
        name: str,
        group: dict[str, Any],
        state: dict[str, Any],
        storage: MomentStorage,
        *,
        projected: bool,
        context: StepContext,
    ) -> None:
        """Raise if this placement cannot step ``param`` (with ``state`` kept by ``storage``)
        as asked."""

    @abstractmethod
    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` (a parameter or gradient) this process updates."""

    @abstractmethod
    def local_shape(self, param: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The local shape of a state tensor of global ``shape`` belonging to ``param``."""

    @abstractmethod
    def open_state(
        self,
        state: dict[str, Any],
        param: torch.Tensor,
        shape: tuple[int, ...],
        storage: MomentStorage,
    ) -> dict[str, Any]:
        """``state`` with local tensors (its moments have the global ``shape``)."""

    @abstractmethod
    def close_state(
        self,
        state: dict[str, Any],
        view: dict[str, Any],
        param: torch.Tensor,
        shape: tuple[int, ...],
        storage: MomentStorage,
    ) -> None:
        """Write a view from :meth:`open_state` back into ``state``, in its checkpoint layout."""

    @abstractmethod
    def finite_flags(
        self, views: Sequence[ParamView], tensors: Sequence[torch.Tensor]
    ) -> list[bool]:
        """Whether each whole tensor (given by its local part) is finite."""

    @abstractmethod
    def refresh(
        self,
        view: ParamView,
        group: dict[str, Any],
        basis_keys: tuple[str, ...],
        rank: int,
        step: int,
        storage: MomentStorage,
    ) -> bool:
        """Refresh the bases in ``view.state`` from ``view.grad``; ``False`` if skipped."""

    @abstractmethod
    def captured_energies(
        self, views: Sequence[ParamView], lows: Sequence[torch.Tensor]
    ) -> list[float]:
        """``||P^T G||^2 / ||G||^2`` of each view's whole gradient (``lows``: ``P^T G``)."""

    @abstractmethod
    def checkpoint_numel(self, param: torch.Tensor, numel: int) -> int | None:
        """Values a checkpoint holds for a moment of ``numel`` values (``None``: not known)."""


class SingleProcessPlacement(Placement):
    """Every value of the parameter is here: views are the tensors and the state themselves."""

    def check(
        self,
        param: torch.Tensor,
        name: str,
        group: dict[str, Any],
        state: dict[str, Any],
        storage: MomentStorage,
        *,
        projected: bool,
        context: StepContext,
    ) -> None:
        return None  # one process steps every layout

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def local_shape(self, param: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def open_state(
        self,
        state: dict[str, Any],
        param: torch.Tensor,
        shape: tuple[int, ...],
        storage: MomentStorage,
    ) -> dict[str, Any]:
        return state

    def close_state(
        self,
        state: dict[str, Any],
        view: dict[str, Any],
        param: torch.Tensor,
        shape: tuple[int, ...],
        storage: MomentStorage,
    ) -> None:
        return None  # the view is the state

    def finite_flags(
        self, views: Sequence[ParamView], tensors: Sequence[torch.Tensor]
    ) -> list[bool]:
        return finite_flags(tensors)

    def refresh(
        self,
        view: ParamView,
        group: dict[str, Any],
        basis_keys: tuple[str, ...],
        rank: int,
        step: int,
        storage: MomentStorage,
    ) -> bool:
        """The group's refresh method (registry) on the whole gradient."""
        if view.grad is None:
            raise RuntimeError(f"a basis refresh of {view.name} needs its full gradient")
        return refresh_from_gradient(
            view.grad,
            view.state,
            group,
            basis_keys,
            rank,
            step,
            view.name,
            storage,
            view.param.dtype,
        )

    def captured_energies(
        self, views: Sequence[ParamView], lows: Sequence[torch.Tensor]
    ) -> list[float]:
        return [captured_energy(low, view.grad) for view, low in zip(views, lows, strict=True)]

    def checkpoint_numel(self, param: torch.Tensor, numel: int) -> int | None:
        return numel


SINGLE_PROCESS = SingleProcessPlacement()


def _dtensor_type() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` is loaded (without it none can exist)."""
    module = sys.modules.get(_DTENSOR_MODULE)
    return None if module is None else module.DTensor


def placement_for(param: torch.Tensor) -> Placement:
    """The placement of ``param``: FSDP2 ``Shard(0)`` for a ``DTensor``, else one process."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(param, dtensor):
        from lowrank_optim.distributed.placement import ROW_SHARDED

        return ROW_SHARDED
    return SINGLE_PROCESS
