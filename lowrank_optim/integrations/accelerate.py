"""accelerate: WeLore hand-offs through ``accelerator.prepare``, and ``save_state`` folders
taken after them.

``accelerator.prepare`` wraps the optimizer in ``AcceleratedOptimizer``, which forwards
``step`` and the state dict but not ``maybe_handoff``: :func:`maybe_handoff` reaches the
``WeLoreAdamW`` inside. ``accelerator.load_state`` loads the weights strictly, then the
optimizer state: on a model that does not have the folder's hand-offs yet the weights do not
fit. :func:`register_handoff_resume` makes ``load_state`` re-apply them first
(:func:`~lowrank_optim.integrations.huggingface.prepare_resume`, which may also be called on
the folder directly); the run then continues bit for bit.

One process only: a hand-off changes the parameters, and accelerate's DDP wrapper, fixed at
``prepare``, cannot be rebuilt (``examples/torchrun_pretrain.py`` re-wraps DDP itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lowrank_optim.integrations.huggingface import prepare_resume, unwrap_optimizer
from lowrank_optim.optim.welore_adamw import WeLoreAdamW

__all__ = ["maybe_handoff", "register_handoff_resume"]


def maybe_handoff(optimizer: Any, model: nn.Module) -> nn.Module:
    """``WeLoreAdamW.maybe_handoff(model)`` for an ``AcceleratedOptimizer`` (or the optimizer
    itself); returns the model to keep training.

    Call it after every ``optimizer.step()``. Between the micro-steps of
    ``accelerator.accumulate`` (no real step) it does nothing, so that a hand-off never drops a
    partly accumulated gradient.
    """
    inner = _welore(optimizer)
    _refuse_processes(_world_size())
    gradient_state = getattr(optimizer, "gradient_state", None)
    if gradient_state is not None and not gradient_state.sync_gradients:
        return model
    return inner.maybe_handoff(model)


def register_handoff_resume(accelerator: Any, model: nn.Module, optimizer: Any) -> RemovableHandle:
    """Make ``accelerator.load_state(folder)`` re-apply the folder's hand-offs to ``model``
    before it loads the weights (an ``accelerator.register_load_state_pre_hook``).

    Call it once after ``accelerator.prepare``, in every run (a fresh one before its first
    ``load_state``); returns the hook's handle.
    """
    _welore(optimizer)
    _refuse_processes(int(accelerator.num_processes))

    def reapply(models: list[nn.Module], input_dir: str) -> None:
        prepare_resume(model, optimizer, input_dir)

    return accelerator.register_load_state_pre_hook(reapply)


def _welore(optimizer: Any) -> WeLoreAdamW:
    """The WeLoreAdamW inside ``optimizer``; TypeError naming what it is otherwise."""
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, WeLoreAdamW):
        raise TypeError(
            f"Hand-offs need a WeLoreAdamW (prepared by accelerate or not), got "
            f"{type(inner).__name__}"
        )
    return inner


def _world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 without one)."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def _refuse_processes(count: int) -> None:
    """RuntimeError for more than one process, saying why and what to use instead."""
    if count > 1:
        raise RuntimeError(
            f"Hand-offs through accelerate support one process only, got {count}: a hand-off "
            "changes the parameters and accelerate's DDP wrapper, fixed at prepare(), cannot be "
            "rebuilt; use examples/torchrun_pretrain.py for multi-process hand-offs"
        )
