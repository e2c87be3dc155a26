"""Where the model lives around a hand-off: DDP unwrap and re-wrap, FSDP2 refusal.

A hand-off changes the model's parameters, which ``DistributedDataParallel`` fixes at
construction (its buckets and hooks): the changed module is wrapped again with the old wrapper's
options, so gradients of the new factors are reduced. Every rank takes the same decisions,
because weights and optimizer state agree across ranks.

FSDP2 (``fully_shard``) parameters are ``DTensor`` shards; replacing a sharded ``Linear`` would
change FSDP's parameter groups, so a hand-off that would touch one is refused with an error
that says how to hand off between stages instead.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["HandoffOptimizer", "dtensor_type", "refuse_sharded_handoff", "rewrap", "unwrap"]


class HandoffOptimizer(Protocol):
    """What the sharding check asks of an optimizer (``WeLoreAdamW`` has all of it)."""

    param_groups: list[dict[str, Any]]

    def is_projected(self, group: dict[str, Any], param: torch.Tensor) -> bool: ...

    def ready_for_handoff(self, param: torch.Tensor, step: int) -> bool: ...

    def param_name(self, group: dict[str, Any], index: int) -> str: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, or ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def rewrap(old: nn.parallel.DistributedDataParallel, module: nn.Module) -> nn.Module:
    """A new DDP wrapper around the changed module, with the old wrapper's options."""
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=old.device_ids,
        output_device=old.output_device,
        broadcast_buffers=old.broadcast_buffers,
        find_unused_parameters=old.find_unused_parameters,
        gradient_as_bucket_view=old.gradient_as_bucket_view,
    )


def dtensor_type() -> type | None:
    """``DTensor``, or ``None`` when ``torch.distributed.tensor`` was never imported."""
    # A DTensor can exist only once torch.distributed.tensor has been imported, so when it is
    # not in sys.modules no parameter is sharded, and importing it here would only load
    # torch.distributed into every single-process run.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def refuse_sharded_handoff(optimizer: HandoffOptimizer, step: int) -> None:
    """Raise if a WeLore hand-off at ``step`` would factorize an FSDP2-sharded weight.

    Checked on the optimizer's parameters, not the model's modules: ``fully_shard`` changes a
    ``Linear``'s class, so a module walk would silently find nothing to hand off.
    """
    dtensor = dtensor_type()
    if dtensor is None:
        return
    for group in optimizer.param_groups:
        for index, param in enumerate(group["params"]):
            if not isinstance(param, dtensor) or not optimizer.is_projected(group, param):
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
