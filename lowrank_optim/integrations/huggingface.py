"""Hugging Face Trainer: our optimizers as ``Trainer(optimizers=(opt, sched))``, plus hand-offs.

``Trainer`` saves ``optimizer.state_dict()`` with ``torch.save`` and loads it back with
``torch.load(weights_only=True)``; our state is plain tensors and numbers, so resuming from
``checkpoint-N`` just works. Hand-offs change the model's structure, so a checkpoint taken
after them needs the structure back before the Trainer loads its weights: call
:func:`prepare_resume` before ``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from lowrank_optim.optim.welore_adamw import WeLoreAdamW

__all__ = ["OPTIMIZER_FILE", "WeLoreHandoffCallback", "prepare_resume", "unwrap_optimizer"]

OPTIMIZER_FILE = "optimizer.pt"


def unwrap_optimizer(optimizer: Any) -> Any:
    """Our optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself).

    ``AcceleratedOptimizer`` is itself a ``torch.optim.Optimizer`` holding the real one under
    ``.optimizer``, so unwrapping follows that attribute, not the type.
    """
    while True:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            return optimizer
        optimizer = inner


class WeLoreHandoffCallback(TrainerCallback):
    """Runs ``WeLoreAdamW.maybe_handoff`` after every optimizer step of a ``Trainer``.

    The surgery is in place on the model the Trainer holds, so nothing needs re-wrapping in a
    single process. Under multi-process DDP the Trainer's wrapper cannot be replaced from a
    callback; that combination is refused at the start of training (use
    ``examples/torchrun_pretrain.py``, whose loop re-wraps DDP, instead).
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(args, "world_size", 1) > 1:
            raise RuntimeError(
                "WeLoreHandoffCallback supports single-process Trainer runs only: hand-offs "
                "change parameters, and the Trainer's DDP wrapper cannot be rebuilt from a "
                "callback. Use examples/torchrun_pretrain.py for multi-process hand-offs."
            )

    def on_step_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        inner = unwrap_optimizer(optimizer)
        if not isinstance(inner, WeLoreAdamW) or model is None:
            return
        before = len(inner.handoffs)
        inner.maybe_handoff(model)
        for record in inner.handoffs[before:]:
            state.log_history.append({"step": state.global_step, "welore_handoff": record})


def prepare_resume(
    model: nn.Module, optimizer: Any, checkpoint_dir: str | os.PathLike[str]
) -> None:
    """Re-apply the hand-offs recorded in ``checkpoint_dir/optimizer.pt`` to ``model``.

    Call it before ``trainer.train(resume_from_checkpoint=checkpoint_dir)`` so that the Trainer
    loads the factor weights into factor layers. Nothing happens for other optimizers or for
    checkpoints without hand-offs.
    """
    inner = unwrap_optimizer(optimizer)
    path = Path(checkpoint_dir) / OPTIMIZER_FILE
    if not isinstance(inner, WeLoreAdamW) or not path.is_file():
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if inner.model is None:
        inner.model = model
    inner.load_state_dict(saved)
