"""The one training loop, shared by ``lowrank-optim pretrain`` and the torchrun/FSDP2 examples.

A step takes one global batch, splits this rank's rows into ``accumulation`` micro-batches
(gradients synchronised across ranks only on the last one), averages the loss over micro-batches
and ranks, clips the gradient norm, steps the optimizer and the schedule, and lets a
``WeLoreAdamW`` hand converged layers off (re-wrapping the model where it must). With a
:class:`~lowrank_optim.LayerwiseOptimizer` every parameter already stepped inside backward, so
the step only checks that it did. Where the parameters live (one process, DDP, FSDP2) is the
:class:`~lowrank_optim.train.parallel.Parallel` strategy; what a caller records (metrics,
evaluations, checkpoints, a progress bar) are its :class:`LoopHooks`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_optim.memory import optimizer_state_bytes
from lowrank_optim.train.parallel import Parallel

__all__ = [
    "LoopHooks",
    "StepResult",
    "cosine_with_warmup",
    "evaluate",
    "train_steps",
    "training_bytes",
]


def training_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights + gradients of the trainable parameters + optimizer state, in bytes."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + grads + optimizer_state_bytes(optimizer)


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR factor: linear warm-up to 1, then cosine decay to ``min_ratio`` (GaLore's recipe)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean causal-LM loss of ``model`` over ``batches`` (eval mode, back to train mode after)."""
    model.eval()
    losses = [float(model(input_ids=batch, labels=batch).loss) for batch in batches]
    model.train()
    return sum(losses) / len(losses)


@dataclass(frozen=True)
class StepResult:
    """One finished optimizer step, as the hooks see it."""

    step: int
    #: mean training loss of the step: over its micro-batches and over the ranks
    loss: float
    #: wall time of the whole step (batch, forward/backward, step, hand-off)
    seconds: float
    #: time spent in ``optimizer.step()`` alone (0 with layer-wise updates)
    optimizer_seconds: float


class LoopHooks:
    """What a caller of :func:`train_steps` does around each step; every hook does nothing here.

    ``model`` is the model as trained (DDP- or FSDP-wrapped where the strategy wraps it); use
    ``parallel.unwrap(model)`` for the module itself.
    """

    def before_handoff(self, step: int, model: nn.Module) -> None:
        """Called before ``maybe_handoff`` (WeLoreAdamW only), e.g. to evaluate the model."""

    def after_handoff(self, step: int, model: nn.Module, records: list[dict[str, Any]]) -> None:
        """Called after ``maybe_handoff`` with the hand-offs it made (often none)."""

    def after_step(self, result: StepResult, model: nn.Module) -> None:
        """Called at the end of every step: log, evaluate, checkpoint."""


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[torch.Tensor],
    *,
    first_step: int,
    last_step: int,
    accumulation: int = 1,
    grad_clip: float = 0.0,
    parallel: Parallel | None = None,
    layerwise: Any | None = None,
    device: torch.device | None = None,
    hooks: LoopHooks | None = None,
) -> nn.Module:
    """Run steps ``first_step + 1 .. last_step``; returns the model to keep using.

    ``batches`` yields this rank's rows of each global batch (``TokenBatches`` with ``rank`` and
    ``world_size``). The returned model differs from ``model`` after a hand-off that re-wrapped
    DDP. ``grad_clip`` > 0 clips the global gradient norm; with ``layerwise`` (a
    ``LayerwiseOptimizer`` built with the same ``accumulation``) the optimizer stepped inside
    backward and clipping is the layer-wise optimizer's own.
    """
    parallel = parallel if parallel is not None else Parallel()
    hooks = hooks if hooks is not None else LoopHooks()
    hands_off = hasattr(optimizer, "maybe_handoff")
    for step in range(first_step + 1, last_step + 1):
        tick = time.perf_counter()
        batch = next(batches)
        if device is not None:
            batch = batch.to(device)
        losses = []
        for index, micro in enumerate(batch.chunk(accumulation)):
            with parallel.gradient_sync(model, last=index == accumulation - 1):
                loss = model(input_ids=micro, labels=micro).loss / accumulation
                loss.backward()
            losses.append(loss.detach())
        step_loss = parallel.mean_loss(losses)
        optimizer_seconds = 0.0
        if layerwise is not None:
            layerwise.step()  # the last backward stepped every parameter; this checks it did
        else:
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer_tick = time.perf_counter()
            optimizer.step()
            optimizer_seconds = time.perf_counter() - optimizer_tick
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if hands_off:
            done = len(getattr(optimizer, "handoffs", []))
            hooks.before_handoff(step, model)
            # The one extra line of a training loop; it re-wraps DDP (and, layer-wise, moves
            # the hooks onto the new factors).
            owner = layerwise if layerwise is not None else optimizer
            model = owner.maybe_handoff(model)
            hooks.after_handoff(step, model, list(getattr(optimizer, "handoffs", []))[done:])
        result = StepResult(step, step_loss, time.perf_counter() - tick, optimizer_seconds)
        hooks.after_step(result, model)
    return model
