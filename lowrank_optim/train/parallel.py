"""Where the model being trained lives: one process, DDP, or FSDP2 (``fully_shard``).

A small strategy used by :func:`lowrank_optim.train.loop.train_steps`: it wraps the model,
decides when gradients are synchronised during accumulation, averages the loss over ranks and
says which ranks evaluate. ``torch.distributed`` is imported only by the distributed ones.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

__all__ = ["DataParallel", "FullyShardedParallel", "Parallel", "dcp_state", "load_dcp_state"]


class Parallel:
    """One process: nothing to wrap, synchronise or reduce."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this rank writes logs and prints (rank 0)."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train (wrapped for the placement)."""
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module inside what :meth:`wrap` returned."""
        return model

    def gradient_sync(self, model: nn.Module, last: bool) -> AbstractContextManager[Any]:
        """Context of one micro-batch's forward and backward; ``last`` ends the step."""
        return nullcontext()

    def mean_loss(self, losses: list[torch.Tensor]) -> float:
        """The step's loss: the sum of its micro-batch losses (each already divided by their
        number), averaged over ranks. One process sums them as Python floats."""
        return sum(float(loss) for loss in losses)

    def evaluate(self, model: nn.Module, batches: list[torch.Tensor]) -> float | None:
        """Validation loss on the ranks that compute one (None elsewhere)."""
        from lowrank_optim.train.loop import evaluate

        return evaluate(self.unwrap(model), batches) if self.is_main else None


class DataParallel(Parallel):
    """DDP: a full replica per rank; gradients all-reduced on the last micro-batch only.

    Only rank 0 evaluates, on the unwrapped module (no collective in its forward).
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def gradient_sync(self, model: nn.Module, last: bool) -> AbstractContextManager[Any]:
        # no_sync skips the all-reduce; the last micro-batch's backward reduces the sum.
        return nullcontext() if last else model.no_sync()

    def mean_loss(self, losses: list[torch.Tensor]) -> float:
        # One all-reduce of the rank's summed loss; no host sync per micro-batch.
        import torch.distributed as dist

        total = torch.zeros((), device=losses[0].device)
        for loss in losses:
            total += loss
        dist.all_reduce(total)
        return float(total / self.world_size)


class FullyShardedParallel(DataParallel):
    """FSDP2: every decoder layer and then the root get ``fully_shard`` (``Shard(0)`` rows).

    Gradients are reduce-scattered after the last micro-batch only. Every rank evaluates: the
    forward all-gathers each layer, which needs all ranks.
    """

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # one all-gather / reduce-scatter unit per layer
            fully_shard(layer)
        fully_shard(model)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def gradient_sync(self, model: nn.Module, last: bool) -> AbstractContextManager[Any]:
        model.set_requires_gradient_sync(last)
        return nullcontext()

    def evaluate(self, model: nn.Module, batches: list[torch.Tensor]) -> float | None:
        from lowrank_optim.train.loop import evaluate

        return evaluate(model, batches)


def dcp_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Any,
) -> dict[str, Any]:
    """What a DCP checkpoint of an FSDP2 run holds: sharded model and optimizer state, the
    hand-off plan (WeLoreAdamW), the schedule and the data position
    (:func:`lowrank_optim.distributed.sharded_checkpoint_state`; ``dcp.save`` saves it)."""
    from lowrank_optim.distributed import sharded_checkpoint_state

    return sharded_checkpoint_state(
        model, optimizer, scheduler=scheduler.state_dict(), data=batches.state_dict()
    )


def load_dcp_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Any,
    checkpoint_id: str,
) -> None:
    """Load a :func:`dcp_state` checkpoint into a freshly built, sharded run: the saved
    hand-offs are re-applied to ``model`` first
    (:func:`lowrank_optim.distributed.load_sharded_checkpoint`), then everything is loaded."""
    from lowrank_optim.distributed import load_sharded_checkpoint

    extra = {"scheduler": scheduler.state_dict(), "data": batches.state_dict()}
    state = load_sharded_checkpoint(model, optimizer, checkpoint_id=checkpoint_id, extra=extra)
    scheduler.load_state_dict(state["scheduler"])
    batches.load_state_dict(state["data"])
