"""Layer-wise updates under FSDP2 (``fully_shard``): what each of 2 CPU ranks (gloo) runs.

One spawn plays every scenario and saves what each rank saw; ``test_layerwise_fsdp.py``
compares layer-wise FSDP2 (each parameter steps in the hook FSDP2 fires after its
reduce-scatter) with regular FSDP2 stepping (``optimizer.step()`` after the window's last
backward), checks that the ranks agree and that a mid-window resume is bit for bit. The driver
(:class:`Run`, FSDP2's ``set_requires_gradient_sync`` passed in) and the scenario runner are in
``layerwise_worker_common.py``, shared with the DDP worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

__all__ = ["ACCUMULATION", "STEPS", "WORLD", "schedule", "spawn"]

# Gap 3: refreshes at steps 1, 4, 7 (full sums), captured energy at 2 and 5 (full), low-rank
# (G_k Q, this rank's rows) accumulation in the windows of steps 3 and 6. ``right`` keeps the
# sharded rows local, the only side FSDP2 accepts.
PROJECTED = {"rank": 4, "update_proj_gap": 3, "scale": 0.5, "proj_type": "right"}


def _optimizer(module: nn.Module, projected: bool) -> GaLoreAdamW:
    if projected:
        return GaLoreAdamW(split_groups(module, **PROJECTED), lr=2e-2, weight_decay=0.1)
    return GaLoreAdamW(module.parameters(), lr=2e-2, weight_decay=0.1)


class Run(LayerwiseRun):
    """A fully_shard-ed TinyNet (its own root unit, the norm, and ``up`` and ``down``).

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
        module = TinyNet()
        fully_shard(module.up)
        fully_shard(module.down)
        fully_shard(module)  # the root holds the norm
        self.sync = sync
        super().__init__(
            module,
            module,
            _optimizer(module, projected),
            self._gradient_sync,
            layerwise=layerwise,
            clip=clip,
            mode=mode,
        )
        # The order in which FSDP2 fired the parameters' hooks (after each reduce-scatter): the
        # steps inside them communicate, so every rank must see the same order.
        self.order: list[str] = []
        for name, param in self.module.named_parameters():
            param.register_post_accumulate_grad_hook(lambda _, name=name: self.order.append(name))

    @contextmanager
    def _gradient_sync(self, last: bool) -> Iterator[None]:
        """FSDP2 reduce-scatters this micro-batch if ``sync`` or it is the window's last (the
        setting stays until the next micro-batch sets it)."""
        self.module.set_requires_gradient_sync(self.sync or last)
        yield

    def weights(self) -> list[torch.Tensor]:
        return [p.full_tensor().detach().clone() for p in self.module.parameters()]

    def result(self) -> dict[str, Any]:
        return {**super().result(), "order": self.order}


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


def _scenarios() -> dict[str, Callable[[], Any]]:
    scenarios: dict[str, Callable[[], Any]] = {}
    for projected in (True, False):
        name = "projected" if projected else "plain"
        scenarios[f"train/{name}/regular"] = partial(_scenario_train, projected, False)
        scenarios[f"train/{name}/layerwise"] = partial(_scenario_train, projected, True)
    scenarios["train/projected/nosync"] = partial(_scenario_train, True, True, False)
    for layerwise in (False, True):
        mode = "layerwise" if layerwise else "regular"
        scenarios[f"clip/{mode}"] = partial(_scenario_train, False, layerwise, True, 0.05)
        scenarios[f"clip_global/{mode}"] = partial(
            _scenario_train, False, layerwise, True, 0.05, "previous_global"
        )
    scenarios["resume"] = _scenario_resume
    scenarios["refused"] = _scenario_refused
    for layerwise in (False, True):
        mode = "layerwise" if layerwise else "regular"
        scenarios[f"handoff/{mode}"] = partial(_scenario_handoff, layerwise)
    return scenarios


def _run(rank: int, world: int, port: int, directory: str) -> None:
    play_scenarios(rank, world, port, directory, _scenarios())


def spawn(directory: Path) -> list[dict[str, Any]]:
    """Run every scenario on ``WORLD`` processes; each rank's results, by scenario name."""
    return spawn_ranks(_run, WORLD, directory, SPAWN_TIMEOUT_S, with_world=True)
