"""Layer-wise updates under DDP: what each of 2 CPU ranks (gloo) runs.

One spawn plays every scenario and saves what each rank saw; ``test_layerwise_ddp.py`` compares
layer-wise DDP with regular DDP stepping (``optimizer.step()`` after the window's last backward,
``no_sync`` on the others), checks that the ranks agree, and that a mid-window resume is bit for
bit. The driver (:class:`Run`, DDP's ``no_sync()`` passed in) and the scenario runner are in
``layerwise_worker_common.py``, shared with the FSDP2 worker.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import TinyNet, make_batches, roundtrip, spawn_ranks, split_groups
from layerwise_worker_common import (
    ACCUMULATION,
    SPAWN_TIMEOUT_S,
    SPLIT,
    STEPS,
    WORLD,
    LayerwiseRun,
    error_of,
    play_scenarios,
    schedule,
)
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

__all__ = ["ACCUMULATION", "SPLIT", "STEPS", "WORLD", "schedule", "spawn"]

# Gap 3 (as test_layerwise.py): refreshes at steps 1, 4, 7 (full sums), captured energy at 2
# and 5 (full), low-rank accumulation in the windows of steps 3 and 6.
PROJECTED = {"rank": 4, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"}


def galore(model: nn.Module) -> GaLoreAdamW:
    return GaLoreAdamW(split_groups(model, **PROJECTED), lr=2e-2, weight_decay=0.1)


def plain(model: nn.Module) -> GaLoreAdamW:
    return GaLoreAdamW(model.parameters(), lr=2e-2, weight_decay=0.1)


OPTIMIZERS: dict[str, Callable[[nn.Module], GaLoreAdamW]] = {"projected": galore, "plain": plain}


class Run(LayerwiseRun):
    """A DDP TinyNet; micro-batches other than a window's last run under ``no_sync()``."""

    def __init__(
        self, name: str, layerwise: bool, clip: float | None = None, mode: str = "parameter"
    ) -> None:
        module = TinyNet()
        optimizer = OPTIMIZERS[name](module)
        # Buckets of ~100 bytes: several per backward, so updates overlap later all-reduces.
        model = DistributedDataParallel(module, bucket_cap_mb=1e-4)
        super().__init__(
            module,
            model,
            optimizer,
            lambda last: nullcontext() if last else model.no_sync(),
            layerwise=layerwise,
            clip=clip,
            mode=mode,
        )


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
        "straight": straight.weights(),
        "resumed": resumed.weights(),
        "optimizer_steps": resumed.wrapper.optimizer_steps,
    }


def _welore_llama() -> tuple[nn.Module, WeLoreAdamW, list[torch.Tensor]]:
    """A 1-layer LLaMA, a WeLoreAdamW that hands off from step 4, and 16 batches of ids."""
    vocab = 64
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
    generator = torch.Generator().manual_seed(3)
    data = [torch.randint(0, vocab, (4, 8), generator=generator) for _ in range(16)]
    return module, optimizer, data


def _scenario_stale_wrapper() -> dict[str, Any]:
    """``optimizer.maybe_handoff(model)`` without ``model = ...``, find_unused_parameters=True:
    the replaced wrapper would not reduce the factors' gradients; its next forward must raise."""
    module, optimizer, data = _welore_llama()
    model = DistributedDataParallel(module, find_unused_parameters=True)
    steps = 0

    def careless_loop() -> None:
        nonlocal steps
        for ids in data:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            optimizer.maybe_handoff(model)  # the new wrapper is dropped
            steps += 1

    error = error_of(careless_loop)
    released = not hasattr(model, "reducer")  # its buckets and autograd hooks are freed
    return {"error": error, "steps": steps, "handoffs": len(optimizer.handoff_report()),
            "released": released}


def _scenario_handoff(layerwise: bool) -> dict[str, Any]:
    """WeLore hand-offs on DDP: factors replace converged weights and DDP is re-wrapped; the
    layer-wise wrapper moves its hooks to the factors and its comm hook to the new wrapper."""
    window = 2
    module, optimizer, data = _welore_llama()
    model: nn.Module = DistributedDataParallel(module, bucket_cap_mb=1e-3)
    wrapper = LayerwiseOptimizer(optimizer, model, accumulation_steps=window) if layerwise else None
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


def _scenarios() -> dict[str, Callable[[], Any]]:
    scenarios: dict[str, Callable[[], Any]] = {}
    for name in OPTIMIZERS:
        for layerwise in (False, True):
            mode = "layerwise" if layerwise else "regular"
            scenarios[f"train/{name}/{mode}"] = partial(_scenario_train, name, layerwise)
    for layerwise in (False, True):
        mode = "layerwise" if layerwise else "regular"
        scenarios[f"clip/{mode}"] = partial(_scenario_train, "plain", layerwise, 0.05)
        scenarios[f"clip_global/{mode}"] = partial(
            _scenario_train, "plain", layerwise, 0.05, "previous_global"
        )
    scenarios["resume"] = _scenario_resume
    for layerwise in (False, True):
        mode = "layerwise" if layerwise else "regular"
        scenarios[f"handoff/{mode}"] = partial(_scenario_handoff, layerwise)
    scenarios["refused"] = _scenario_refused
    scenarios["stale_wrapper"] = _scenario_stale_wrapper
    return scenarios


def _run(rank: int, world: int, port: int, directory: str) -> None:
    play_scenarios(rank, world, port, directory, _scenarios())


def spawn(directory: Path) -> list[dict[str, Any]]:
    """Run every scenario on ``WORLD`` processes; each rank's results, by scenario name."""
    return spawn_ranks(_run, WORLD, directory, SPAWN_TIMEOUT_S, with_world=True)
