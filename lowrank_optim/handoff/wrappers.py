"""Where the model lives around a hand-off: DDP unwrap and re-wrap, FSDP2 checks.

A hand-off changes the model's parameters, which ``DistributedDataParallel`` fixes at
construction (its buckets and hooks): the changed module is wrapped again with the old wrapper's
options, so gradients of the new factors are reduced. Every rank takes the same decisions,
because weights and optimizer state agree across ranks.

FSDP2 (``fully_shard``) parameters are ``DTensor`` shards: an ``nn.Linear`` among them is handed
off in place by :mod:`lowrank_optim.distributed.handoff`; what that does not do (a sharded
``Conv1D``, tapering) is refused before anything changes, with an error that says what to do
instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "RETIRED_AT",
    "HandoffOptimizer",
    "dtensor_type",
    "is_sharded_weight",
    "refuse_sharded_handoff",
    "retire",
    "retired_wrapper_error",
    "rewrap",
    "unwrap",
]


class HandoffOptimizer(Protocol):
    """What the hand-off asks of an optimizer (``WeLoreAdamW`` has all of it)."""

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


#: Attribute set on a DDP wrapper that a hand-off replaced: the step it was replaced at.
RETIRED_AT = "_welore_retired_at"


def retired_wrapper_error(wrapper: nn.Module) -> RuntimeError:
    """The error for training through (or handing off with) a DDP wrapper a hand-off replaced."""
    step = getattr(wrapper, RETIRED_AT)
    return RuntimeError(
        f"This DistributedDataParallel wrapper was replaced at the WeLore hand-off of step "
        f"{step}: it does not reduce the gradients of the new factors, so the ranks' weights "
        "would drift apart. Keep the model maybe_handoff returns: "
        "model = optimizer.maybe_handoff(model)"
    )


def retire(old: nn.parallel.DistributedDataParallel, step: int) -> None:
    """Make ``old`` (a wrapper :func:`rewrap` replaced) refuse every later forward.

    DDP fixes its parameters at construction: the old wrapper still runs the model, but never
    all-reduces the factors a hand-off added, and with ``find_unused_parameters=True`` nothing
    complains while the ranks drift apart. Its next forward raises instead, before anything
    trains.

    Its reducer is released too: it holds a bucket buffer the size of every gradient of the
    model (freed here, not at the end of the run) and autograd hooks on the parameters the new
    wrapper now reduces; a reducer left alive until interpreter exit is also destroyed after
    its process group.
    """
    setattr(old, RETIRED_AT, step)
    if getattr(old, "reducer", None) is not None:
        old._remove_autograd_hooks()
        for name in ("logger", "reducer"):  # the logger holds the reducer too
            if hasattr(old, name):
                delattr(old, name)

    def refuse(module: nn.Module, args: Any) -> None:
        raise retired_wrapper_error(module)

    old.register_forward_pre_hook(refuse)


def dtensor_type() -> type | None:
    """``DTensor``, or ``None`` when ``torch.distributed.tensor`` was never imported."""
    # A DTensor can exist only once torch.distributed.tensor has been imported, so when it is
    # not in sys.modules no parameter is sharded, and importing it here would only load
    # torch.distributed into every single-process run.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_sharded_weight(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ``DTensor`` (an FSDP2 shard), without importing DTensor."""
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(param, dtensor)


def refuse_sharded_handoff(candidates: Iterable[Any], taper_steps: int) -> None:
    """Raise, before anything changes, if a hand-off of ``candidates`` (``HandoffCandidate`` s
    about to go) would need what the FSDP2 hand-off does not do.

    FSDP2-sharded ``nn.Linear`` weights are handed off in place
    (:mod:`lowrank_optim.distributed.handoff`). Refused: a sharded transformers ``Conv1D``
    (stored ``in x out``, so FSDP2 shards its input side, which the sharded factorization does not
    take) and tapering (``taper_steps > 0``: the taper shrinks the weight's tail with an SVD of
    the whole weight).
    """
    for candidate in candidates:
        if not is_sharded_weight(candidate.module.weight):
            continue
        if type(candidate.module) is not nn.Linear:
            raise NotImplementedError(
                f"WeLore hand-off of {candidate.name} ({type(candidate.module).__name__}) is not "
                "supported on FSDP2-sharded parameters: only nn.Linear weights (stored out x in) "
                "are factorized shard by shard. Hand it off in one process, or train without "
                "fully_shard"
            )
        if taper_steps > 0:
            raise NotImplementedError(
                f"WeLore hand-off of {candidate.name} with taper_steps={taper_steps} is not "
                "supported on FSDP2-sharded parameters: the taper shrinks the whole weight's "
                "tail. Use HandoffConfig(taper_steps=0) under fully_shard"
            )
