"""Layer-wise updates under FSDP2 (``fully_shard``): what each of 2 CPU ranks (gloo) runs.

One spawn plays every scenario and saves what each rank saw; ``test_layerwise_fsdp.py``
compares layer-wise FSDP2 (each parameter steps in the hook FSDP2 fires after its
reduce-scatter) with regular FSDP2 stepping (``optimizer.step()`` after the window's last
backward), checks that the ranks agree and that a mid-window resume is bit for bit. A scenario
that raises is recorded with its traceback, so one broken cell fails only its test.
"""

from __future__ import annotations

import datetime
import os
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import TinyNet, make_batches, roundtrip, spawn_ranks, split_groups
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lowrank_optim import (
    GaLoreAdamW,
    HandoffConfig,
    LayerwiseOptimizer,
    ProjectionConfig,
    StabilityConfig,
    WeLoreAdamW,
)
from lowrank_optim.factorize import LowRankLinear
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.train.models import build_llama, tiny_llama_config

__all__ = ["ACCUMULATION", "STEPS", "WORLD", "spawn"]

WORLD = 2
STEPS, ACCUMULATION = 7, 4
# Gap 3: refreshes at steps 1, 4, 7 (full sums), captured energy at 2 and 5 (full), low-rank
# (G_k Q, this rank's rows) accumulation in the windows of steps 3 and 6. ``right`` keeps the
# sharded rows local, the only side FSDP2 accepts.
PROJECTED = {"rank": 4, "update_proj_gap": 3, "scale": 0.5, "proj_type": "right"}
SPLIT = 2 * ACCUMULATION + 2  # resume two backward passes into step 3's (low-rank) window
TIMEOUT_S = 120
SPAWN_TIMEOUT_S = 600


def schedule(step: int) -> float:
    return 1.0 / (1.0 + step)


def _optimizer(module: nn.Module, projected: bool) -> GaLoreAdamW:
    if projected:
        return GaLoreAdamW(split_groups(module, **PROJECTED), lr=2e-2, weight_decay=0.1)
    return GaLoreAdamW(module.parameters(), lr=2e-2, weight_decay=0.1)


class Run:
    """A fully_shard-ed TinyNet, its optimizer, schedule and (layer-wise) wrapper.

    ``sync``: reduce-scatter every micro-batch (FSDP2's default) or only the window's last
    (``set_requires_gradient_sync(False)`` on the others).
    """

    def __init__(
        self,
        projected: bool,
        layerwise: bool,
        sync: bool = True,
        clip: float | None = None,
        mode: str = "parameter",
    ) -> None:
        self.module = TinyNet()
        fully_shard(self.module.up)
        fully_shard(self.module.down)
        fully_shard(self.module)  # the root holds the norm
        self.optimizer = _optimizer(self.module, projected)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.sync, self.clip = sync, clip
        self.mode = mode
        self._previous: float | None = None  # the reference's global norm of the last step
        self.wrapper = (
            LayerwiseOptimizer(
                self.optimizer,
                self.module,
                accumulation_steps=ACCUMULATION,
                max_grad_norm=clip,
                clip=mode,
            )
            if layerwise
            else None
        )
        # The order in which FSDP2 fired the parameters' hooks (after each reduce-scatter): the
        # steps inside them communicate, so every rank must see the same order.
        self.order: list[str] = []
        for name, param in self.module.named_parameters():
            param.register_post_accumulate_grad_hook(lambda _, name=name: self.order.append(name))
        self.losses: list[float] = []
        self.held: list[dict[str, int]] = []
        self.freed = True
        self._window = torch.zeros(())

    def backward(self, index: int, batches: list[tuple[torch.Tensor, ...]]) -> None:
        rank = dist.get_rank()
        inputs, targets = batches[index]
        rows = slice(rank * len(inputs) // WORLD, (rank + 1) * len(inputs) // WORLD)
        last = index % ACCUMULATION == ACCUMULATION - 1
        self.module.set_requires_gradient_sync(self.sync or last)
        loss = (self.module(inputs[rows]) - targets[rows]).square().mean() / ACCUMULATION
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
        return [p.full_tensor().detach().clone() for p in self.module.parameters()]

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
            "order": self.order,
            "freed": self.freed,
            "last_epoch": self.scheduler.last_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "steps": sorted({int(s["step"]) for s in self.optimizer.state.values()}),
        }


def _scenario_train(
    projected: bool,
    layerwise: bool,
    sync: bool = True,
    clip: float | None = None,
    mode: str = "parameter",
) -> dict[str, Any]:
    batches = make_batches(STEPS * ACCUMULATION, torch.float32)
    run = Run(projected, layerwise, sync, clip, mode)
    for index in range(len(batches)):
        run.backward(index, batches)
    return run.result()


def _scenario_resume() -> dict[str, Any]:
    """Each rank saves its own rows of the model, optimizer and window, mid-window."""
    batches = make_batches(5 * ACCUMULATION, torch.float32)
    straight = Run(projected=True, layerwise=True)
    for index in range(SPLIT):
        straight.backward(index, batches)
    assert straight.wrapper is not None
    saved = roundtrip(
        {
            "model": [p.to_local().detach() for p in straight.module.parameters()],
            "optimizer": straight.wrapper.state_dict(),
            "scheduler": straight.scheduler.state_dict(),
        }
    )
    resumed = Run(projected=True, layerwise=True)
    assert resumed.wrapper is not None
    with torch.no_grad():
        for param, rows in zip(resumed.module.parameters(), saved["model"], strict=True):
            param.to_local().copy_(rows)
    resumed.wrapper.load_state_dict(saved["optimizer"])
    resumed.scheduler.load_state_dict(saved["scheduler"])
    for index in range(SPLIT, len(batches)):
        straight.backward(index, batches)
        resumed.backward(index, batches)
    return {
        "low_rank_saved": bool(saved["optimizer"]["layerwise"]["low_rank"]),
        "straight": straight.weights(),
        "resumed": resumed.weights(),
        "optimizer_steps": resumed.wrapper.optimizer_steps,
    }


def _scenario_handoff(layerwise: bool) -> dict[str, Any]:
    """WeLore hand-offs on FSDP2, in place: the factors join the weight's FSDP2 group as
    sharded DTensors; the layer-wise wrapper moves its post-accumulate-grad hooks onto them."""
    vocab, window, steps = 64, 2, 8
    config = tiny_llama_config(vocab, hidden=32, layers=1, heads=4, intermediate=64)
    model: nn.Module = build_llama(config, seed=0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    groups = lowrank_param_groups(
        model, "attn-mlp", ProjectionConfig(rank=4, update_proj_gap=2, scale=1.0, proj_type="right")
    )
    optimizer = WeLoreAdamW(
        groups,
        lr=3e-3,
        model=model,
        stability=StabilityConfig(policy="fixed", threshold=0.01, patience=1),
        handoff=HandoffConfig(start_step=4, target_reduction=0.7, min_ratio=0.4, check_every=2),
    )
    wrapper = LayerwiseOptimizer(optimizer, model, accumulation_steps=window) if layerwise else None
    generator = torch.Generator().manual_seed(3)
    data = [torch.randint(0, vocab, (4, 8), generator=generator) for _ in range(steps * window)]
    rows = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
    roots, losses, freed, hooked = {id(model)}, [], True, True
    total = torch.zeros(())
    for index, ids in enumerate(data):
        loss = model(input_ids=ids[rows], labels=ids[rows]).loss / window
        loss.backward()
        total += loss.detach()
        if wrapper is not None:
            freed &= all(p.grad is None for p in model.parameters())
        if index % window != window - 1:
            continue
        if wrapper is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model = optimizer.maybe_handoff(model)
        else:
            model = wrapper.maybe_handoff(model)
            # Hooks on exactly the parameters the optimizer (and FSDP2) now hold.
            held = {p for group in optimizer.param_groups for p in group["params"]}
            hooked &= set(wrapper._hooks) == held == set(model.parameters())
        roots.add(id(model))
        dist.all_reduce(total)
        losses.append(float(total) / WORLD)
        total = torch.zeros(())
    return {
        "records": [(r["step"], r["layer"], r["rank"]) for r in optimizer.handoff_report()],
        "factored": sum(isinstance(m, LowRankLinear) for m in model.modules()),
        "in_place": len(roots) == 1,
        "losses": losses,
        "weights": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
        "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
        "freed": freed,
        "hooked": hooked,
        "optimizer_steps": None if wrapper is None else wrapper.optimizer_steps,
    }


def error_of(action: Callable[[], object]) -> str:
    """``"Type: message"`` of what ``action`` raises, or ``"no error"``."""
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the test reads it
        return f"{type(error).__name__}: {error}"
    return "no error"


def _scenario_refused() -> dict[str, str]:
    def without_model() -> None:
        run = Run(projected=True, layerwise=False)
        LayerwiseOptimizer(run.optimizer)

    def last_without_sync() -> None:
        run = Run(projected=True, layerwise=False)
        LayerwiseOptimizer(run.optimizer, run.module, accumulation_steps=1)
        run.module.set_requires_gradient_sync(False)
        inputs, targets = make_batches(1, torch.float32)[0]
        try:
            (run.module(inputs) - targets).square().mean().backward()
        finally:
            run.module.set_requires_gradient_sync(True)

    return {
        "without_model": error_of(without_model),
        "last_without_sync": error_of(last_without_sync),
    }


def _attempt(results: dict[str, Any], name: str, scenario: Callable[[], Any]) -> None:
    try:
        results[name] = scenario()
    except Exception:  # noqa: BLE001 - recorded for the test to report
        results[name] = {"failure": traceback.format_exc()}


def _run(rank: int, world: int, port: int, directory: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    results: dict[str, Any] = {}
    for projected in (True, False):
        name = "projected" if projected else "plain"
        _attempt(results, f"train/{name}/regular", partial(_scenario_train, projected, False))
        _attempt(results, f"train/{name}/layerwise", partial(_scenario_train, projected, True))
    _attempt(results, "train/projected/nosync", partial(_scenario_train, True, True, False))
    for layerwise in (False, True):
        mode = "layerwise" if layerwise else "regular"
        _attempt(results, f"clip/{mode}", partial(_scenario_train, False, layerwise, True, 0.05))
        scenario = partial(_scenario_train, False, layerwise, True, 0.05, "previous_global")
        _attempt(results, f"clip_global/{mode}", scenario)
    _attempt(results, "resume", _scenario_resume)
    _attempt(results, "refused", _scenario_refused)
    for layerwise in (False, True):
        mode = "layerwise" if layerwise else "regular"
        _attempt(results, f"handoff/{mode}", partial(_scenario_handoff, layerwise))
    dist.barrier()  # no rank tears gloo down while a peer is still in a collective
    dist.destroy_process_group()
    torch.save(results, Path(directory) / f"rank{rank}.pt")


def spawn(directory: Path) -> list[dict[str, Any]]:
    """Run every scenario on ``WORLD`` processes; each rank's results, by scenario name."""
    return spawn_ranks(_run, WORLD, directory, SPAWN_TIMEOUT_S, with_world=True)
