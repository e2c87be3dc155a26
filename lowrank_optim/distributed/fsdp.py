"""Refusing a WeLore hand-off of FSDP2-sharded weights (the hand-off package takes this over).

The FSDP2 optimizer step itself is a placement: :mod:`lowrank_optim.distributed.placement`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.distributed.tensor import DTensor

__all__ = ["HandoffOptimizer", "refuse_sharded_handoff"]


class HandoffOptimizer(Protocol):
    """What the refusal reads of an optimizer that hands layers off (``WeLoreAdamW``)."""

    param_groups: list[dict[str, Any]]

    def is_projected(self, group: dict[str, Any], param: torch.Tensor) -> bool: ...

    def ready_for_handoff(self, param: torch.Tensor, step: int) -> bool: ...

    def param_name(self, group: dict[str, Any], index: int) -> str: ...


def refuse_sharded_handoff(optimizer: HandoffOptimizer, step: int) -> None:
    """Raise if a WeLore hand-off at ``step`` would factorize an FSDP2-sharded weight.

    Checked on the optimizer's parameters, not the model's modules: ``fully_shard`` changes a
    ``Linear``'s class, so a module walk would silently find nothing to hand off.
    """
    for group in optimizer.param_groups:
        for index, param in enumerate(group["params"]):
            if not isinstance(param, DTensor) or not optimizer.is_projected(group, param):
                continue
            if optimizer.ready_for_handoff(param, step):
                raise NotImplementedError(
                    f"WeLore hand-off of {optimizer.param_name(group, index)} (stable, step "
                    f"{step}) is not supported on FSDP2-sharded parameters (fully_shard "
                    "DTensors): replacing a sharded Linear changes FSDP's parameter groups. Hand "
                    "off between stages instead: save with torch.distributed.checkpoint, load the "
                    "full model and optimizer in one process and call maybe_handoff there, then "
                    "apply fully_shard again and continue. To train on without hand-offs, set "
                    "HandoffConfig(start_step=...) beyond the run."
                )
