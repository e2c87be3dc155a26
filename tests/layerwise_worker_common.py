"""What the layer-wise DDP and FSDP2 workers share: the training driver and the scenario runner.

:class:`LayerwiseRun` trains a TinyNet with accumulation windows, either layer-wise (a
:class:`~lowrank_optim.LayerwiseOptimizer` steps each parameter as its gradient is final) or
regularly (``optimizer.step()`` after the window's last backward, with the same clipping
reference). The workers differ only in how the model is wrapped and how a micro-batch that is
not the window's last skips the gradient sync (DDP's ``no_sync()``, FSDP2's
``set_requires_gradient_sync(False)``): they pass that in as ``micro_batch``.

:func:`play_scenarios` runs a worker's scenarios on one gloo rank and saves what it saw; a
scenario that raises is recorded with its traceback, so one broken cell fails only its test.
"""

from __future__ import annotations

import datetime
import os
import traceback
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowrank_optim import GaLoreAdamW, LayerwiseOptimizer

__all__ = [
    "ACCUMULATION",
    "SPAWN_TIMEOUT_S",
    "SPLIT",
    "STEPS",
    "TIMEOUT_S",
    "WORLD",
    "LayerwiseRun",
    "error_of",
    "play_scenarios",
    "schedule",
]

WORLD = 2
STEPS, ACCUMULATION = 7, 4
SPLIT = 2 * ACCUMULATION + 2  # resume two backward passes into step 3's (low-rank) window
TIMEOUT_S = 120
SPAWN_TIMEOUT_S = 600


def schedule(step: int) -> float:
    return 1.0 / (1.0 + step)


class LayerwiseRun:
    """A wrapped model, its optimizer, schedule and (layer-wise) wrapper.

    ``module``: the TinyNet (its parameters); ``model``: what runs forward and what the
    layer-wise wrapper is given (the DDP wrapper, or the ``fully_shard``-ed module itself).
    ``micro_batch(last)``: the context a micro-batch's forward and backward run in, given whether
    it is the window's last (where the gradient sync is skipped or not).
    """

    def __init__(
        self,
        module: nn.Module,
        model: nn.Module,
        optimizer: GaLoreAdamW,
        micro_batch: Callable[[bool], AbstractContextManager[Any]],
        *,
        layerwise: bool,
        clip: float | None = None,
        mode: str = "parameter",
    ) -> None:
        self.module, self.model, self.optimizer = module, model, optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.micro_batch = micro_batch
        self.clip = clip
        self.mode = mode
        self._previous: float | None = None  # the reference's global norm of the last step
        self.wrapper = (
            LayerwiseOptimizer(
                self.optimizer,
                self.model,
                accumulation_steps=ACCUMULATION,
                max_grad_norm=clip,
                clip=mode,
            )
            if layerwise
            else None
        )
        self.losses: list[float] = []
        self.held: list[dict[str, int]] = []
        self.freed = True
        self._window = torch.zeros(())

    def backward(self, index: int, batches: list[tuple[torch.Tensor, ...]]) -> None:
        """Micro-batch ``index``: this rank's rows; the step after a window's last."""
        rank = dist.get_rank()
        inputs, targets = batches[index]
        rows = slice(rank * len(inputs) // WORLD, (rank + 1) * len(inputs) // WORLD)
        last = index % ACCUMULATION == ACCUMULATION - 1
        with self.micro_batch(last):
            loss = (self.model(inputs[rows]) - targets[rows]).square().mean() / ACCUMULATION
            loss.backward()
        self._window += loss.detach()
        if self.wrapper is not None:
            self.freed &= all(p.grad is None for p in self.module.parameters())
            self.held.append(self.wrapper.accumulator_numel())
        if not last:
            return
        if self.wrapper is None:
            if self.clip is not None and self.mode == "previous_global":
                self._clip_by_previous_norm(self.clip)
            elif self.clip is not None:
                for param in self.module.parameters():
                    torch.nn.utils.clip_grad_norm_([param], self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.wrapper.step()
        self.scheduler.step()
        dist.all_reduce(self._window)
        self.losses.append(float(self._window) / WORLD)
        self._window = torch.zeros(())

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.module.parameters()]

    def _clip_by_previous_norm(self, clip: float) -> None:
        """The reference of ``clip="previous_global"``: scale by the last step's total norm."""
        grads = [param.grad for param in self.module.parameters()]
        norm = float(torch.nn.utils.get_total_norm(grads))
        if self._previous is not None:
            coefficient = min(1.0, clip / (self._previous + 1e-6))
            for grad in grads:
                grad.mul_(coefficient)
        self._previous = norm

    def result(self) -> dict[str, Any]:
        return {
            "losses": self.losses,
            "weights": self.weights(),
            "held": self.held,
            "freed": self.freed,
            "last_epoch": self.scheduler.last_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "steps": sorted({int(s["step"]) for s in self.optimizer.state.values()}),
        }


def error_of(action: Callable[[], object]) -> str:
    """``"Type: message"`` of what ``action`` raises, or ``"no error"``."""
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the test reads it
        return f"{type(error).__name__}: {error}"
    return "no error"


def play_scenarios(
    rank: int,
    world: int,
    port: int,
    directory: str,
    scenarios: Mapping[str, Callable[[], Any]],
) -> None:
    """Join the gloo group, run every scenario in order, save the results as ``rank{rank}.pt``.

    A scenario that raises is recorded as ``{"failure": traceback}`` and the others still run.
    """
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    results: dict[str, Any] = {}
    for name, scenario in scenarios.items():
        try:
            results[name] = scenario()
        except Exception:  # noqa: BLE001 - recorded for the test to report
            results[name] = {"failure": traceback.format_exc()}
    dist.barrier()  # no rank tears gloo down while a peer is still in a collective
    dist.destroy_process_group()
    torch.save(results, Path(directory) / f"rank{rank}.pt")
