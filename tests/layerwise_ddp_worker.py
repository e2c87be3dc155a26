"""Layer-wise updates under DDP: what each of 2 CPU ranks (gloo) runs.

One spawn plays every scenario and saves what each rank saw; ``test_layerwise_ddp.py`` compares
layer-wise DDP with regular DDP stepping (``optimizer.step()`` after the window's last backward,
``no_sync`` on the others), checks that the ranks agree, and that a mid-window resume is bit for
bit. A scenario that raises is recorded with its traceback, so one broken cell fails only its
test.
"""

from __future__ import annotations

import datetime
import os
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import TinyNet, make_batches, roundtrip, spawn_ranks, split_groups
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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

__all__ = ["ACCUMULATION", "SPLIT", "STEPS", "WORLD", "spawn"]

WORLD = 2
STEPS, ACCUMULATION = 7, 4
# Gap 3 (as test_layerwise.py): refreshes at steps 1, 4, 7 (full sums), captured energy at 2
# and 5 (full), low-rank accumulation in the windows of steps 3 and 6.
PROJECTED = {"rank": 4, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"}
SPLIT = 2 * ACCUMULATION + 2  # resume two backward passes into step 3's (low-rank) window
TIMEOUT_S = 120
SPAWN_TIMEOUT_S = 600


def galore(model: nn.Module) -> GaLoreAdamW:
    return GaLoreAdamW(split_groups(model, **PROJECTED), lr=2e-2, weight_decay=0.1)


def plain(model: nn.Module) -> GaLoreAdamW:
    return GaLoreAdamW(model.parameters(), lr=2e-2, weight_decay=0.1)


OPTIMIZERS: dict[str, Callable[[nn.Module], GaLoreAdamW]] = {"projected": galore, "plain": plain}


def schedule(step: int) -> float:
    return 1.0 / (1.0 + step)


class Run:
    """A DDP model, its optimizer, schedule and (layer-wise) wrapper."""

    def __init__(
        self, name: str, layerwise: bool, clip: float | None = None, mode: str = "parameter"
    ) -> None:
        self.module = TinyNet()
        self.optimizer = OPTIMIZERS[name](self.module)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        # Buckets of ~100 bytes: several per backward, so updates overlap later all-reduces.
        self.model = DistributedDataParallel(self.module, bucket_cap_mb=1e-4)
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
        """Micro-batch ``index``: this rank's rows, ``no_sync`` except on a window's last."""
        rank = dist.get_rank()
        inputs, targets = batches[index]
        rows = slice(rank * len(inputs) // WORLD, (rank + 1) * len(inputs) // WORLD)
        last = index % ACCUMULATION == ACCUMULATION - 1
        with nullcontext() if last else self.model.no_sync():
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
            "weights": [p.detach().clone() for p in self.module.parameters()],
            "held": self.held,
            "freed": self.freed,
            "last_epoch": self.scheduler.last_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "steps": sorted({int(s["step"]) for s in self.optimizer.state.values()}),
        }


def _scenario_train(
    name: str, layerwise: bool, clip: float | None = None, mode: str = "parameter"
) -> dict[str, Any]:
    batches = make_batches(STEPS * ACCUMULATION, torch.float32)
    run = Run(name, layerwise, clip, mode)
    for index in range(len(batches)):
        run.backward(index, batches)
    return run.result()


def _scenario_resume() -> dict[str, Any]:
    """Each rank saves its own state mid-window (its accumulators are local sums)."""
    batches = make_batches(5 * ACCUMULATION, torch.float32)
    straight = Run("projected", layerwise=True)
    for index in range(SPLIT):
        straight.backward(index, batches)
    assert straight.wrapper is not None
    saved = roundtrip(
        {
            "model": straight.module.state_dict(),
            "optimizer": straight.wrapper.state_dict(),
            "scheduler": straight.scheduler.state_dict(),
        }
    )
    resumed = Run("projected", layerwise=True)
    assert resumed.wrapper is not None
    resumed.module.load_state_dict(saved["model"])
    resumed.wrapper.load_state_dict(saved["optimizer"])
    resumed.scheduler.load_state_dict(saved["scheduler"])
    for index in range(SPLIT, len(batches)):
        straight.backward(index, batches)
        resumed.backward(index, batches)
    return {
        "low_rank_saved": bool(saved["optimizer"]["layerwise"]["low_rank"]),
        "straight": [p.detach().clone() for p in straight.module.parameters()],
        "resumed": [p.detach().clone() for p in resumed.module.parameters()],
        "optimizer_steps": resumed.wrapper.optimizer_steps,
    }


def _scenario_handoff(layerwise: bool) -> dict[str, Any]:
    """WeLore hand-offs on DDP: factors replace converged weights and DDP is re-wrapped; the
    layer-wise wrapper moves its hooks to the factors and its comm hook to the new wrapper."""
    vocab, window = 64, 2
    config = tiny_llama_config(vocab, hidden=32, layers=1, heads=4, intermediate=64)
    module = build_llama(config, seed=0)
    groups = lowrank_param_groups(
        module, "attn-mlp", ProjectionConfig(rank=4, update_proj_gap=2, scale=1.0)
    )
    optimizer = WeLoreAdamW(
        groups,
        lr=3e-3,
        model=module,
        stability=StabilityConfig(policy="fixed", threshold=0.01, patience=1),
        handoff=HandoffConfig(start_step=4, target_reduction=0.7, min_ratio=0.4, check_every=2),
    )
    model: nn.Module = DistributedDataParallel(module, bucket_cap_mb=1e-3)
    wrapper = LayerwiseOptimizer(optimizer, model, accumulation_steps=window) if layerwise else None
    generator = torch.Generator().manual_seed(3)
    data = [torch.randint(0, vocab, (4, 8), generator=generator) for _ in range(16)]
    rows = slice(2 * dist.get_rank(), 2 * dist.get_rank() + 2)
    wrappers = {id(model)}
    for index, ids in enumerate(data):
        last = index % window == window - 1
        with nullcontext() if last else model.no_sync():  # type: ignore[operator]
            (model(input_ids=ids[rows], labels=ids[rows]).loss / window).backward()
        if not last:
            continue
        if wrapper is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model = optimizer.maybe_handoff(model)
        else:
            model = wrapper.maybe_handoff(model)
        wrappers.add(id(model))
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {
        "layers": [report["layer"] for report in optimizer.handoff_report()],
        "factored": sum(isinstance(m, LowRankLinear) for m in inner.modules()),
        "rewrapped": len(wrappers) > 1 and isinstance(model, DistributedDataParallel),
        "weights": {name: p.detach().clone() for name, p in inner.named_parameters()},
        "freed": all(p.grad is None for p in inner.parameters()) if layerwise else True,
    }


def error_of(action: Callable[[], object]) -> str:
    """``"Type: message"`` of what ``action`` raises, or ``"no error"``."""
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the test reads it
        return f"{type(error).__name__}: {error}"
    return "no error"


def _scenario_refused() -> dict[str, str]:
    def second_hook() -> None:
        model = DistributedDataParallel(TinyNet())
        model.register_comm_hook(None, lambda state, bucket: _noop(bucket))
        LayerwiseOptimizer(galore(model.module), model)

    def unwrapped() -> None:
        module = TinyNet()
        LayerwiseOptimizer(galore(module), module)

    def last_under_no_sync() -> None:
        model = DistributedDataParallel(TinyNet())
        LayerwiseOptimizer(galore(model.module), model, accumulation_steps=1)
        inputs, targets = make_batches(1, torch.float32)[0]
        with model.no_sync():
            (model(inputs) - targets).square().mean().backward()

    return {
        "second_hook": error_of(second_hook),
        "unwrapped": error_of(unwrapped),
        "last_under_no_sync": error_of(last_under_no_sync),
    }


def _noop(bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


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
    for name in OPTIMIZERS:
        for layerwise in (False, True):
            mode = "layerwise" if layerwise else "regular"
            scenario = partial(_scenario_train, name, layerwise)
            _attempt(results, f"train/{name}/{mode}", scenario)
    for layerwise in (False, True):
        mode = "layerwise" if layerwise else "regular"
        _attempt(results, f"clip/{mode}", partial(_scenario_train, "plain", layerwise, 0.05))
        scenario = partial(_scenario_train, "plain", layerwise, 0.05, "previous_global")
        _attempt(results, f"clip_global/{mode}", scenario)
    _attempt(results, "resume", _scenario_resume)
    for layerwise in (False, True):
        mode = "layerwise" if layerwise else "regular"
        _attempt(results, f"handoff/{mode}", partial(_scenario_handoff, layerwise))
    _attempt(results, "refused", _scenario_refused)
    dist.barrier()  # no rank tears gloo down while a peer is still in a collective
    dist.destroy_process_group()
    torch.save(results, Path(directory) / f"rank{rank}.pt")


def spawn(directory: Path) -> list[dict[str, Any]]:
    """Run every scenario on ``WORLD`` processes; each rank's results, by scenario name."""
    return spawn_ranks(_run, WORLD, directory, SPAWN_TIMEOUT_S, with_world=True)
