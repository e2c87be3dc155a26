"""The FSDP2 column of the optimizer matrix: what each of 2 CPU ranks (gloo) runs.

One spawn plays every (optimizer, storage) case of ``optimizer_cases.CASES`` on ``MatrixNet``
with every layer under ``fully_shard``, and saves what each rank saw; ``test_matrix_fsdp.py``
compares that with single-process runs of the same global batches. After the 2-rank group is
torn down, rank 0 starts a 1-rank group and loads each 2-rank checkpoint (another rank count).
A scenario that raises is recorded with its traceback, so one broken cell fails only its test.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import MatrixNet, matrix_batches, matrix_groups, spawn_ranks
from optimizer_cases import CASES, OptimizerCase, is_quantized
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lowrank_optim import HandoffConfig, LayerwiseOptimizer, StabilityConfig, WeLoreAdamW
from lowrank_optim.distributed import load_sharded_state

__all__ = ["BATCH", "LR", "SAVE_AT", "STEPS", "WORLD", "error_of", "spawn", "train"]

WORLD = 2
BATCH = 16  # global batch; each rank takes BATCH / world rows
STEPS = 10  # update_proj_gap 4: refreshes at steps 1, 5 and 9
SAVE_AT = 4
DCP_STEPS = 7  # saved at 4, resumed through the refresh at 5
LR = 2e-3
TIMEOUT_S = 120  # a collective that waits longer raises in the worker
SPAWN_TIMEOUT_S = 600  # the whole run (generous: the CI machine may be loaded)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, ...]],
    rows: slice = slice(None),
) -> None:
    for inputs, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        (model(inputs[rows]) - targets[rows]).square().mean().backward()
        optimizer.step()


def error_of(action: Callable[[], object]) -> str:
    """``"Type: message"`` of what ``action`` raises, or ``"no error"``."""
    try:
        action()
    # torch.distributed.checkpoint raises a BaseException, not an Exception
    except (Exception, dcp.CheckpointException) as error:  # noqa: BLE001 - the test reads it
        return f"{type(error).__name__}: {error}"
    return "no error"


def _shard(model: nn.Module) -> nn.Module:
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _sharded(case: OptimizerCase) -> tuple[nn.Module, torch.optim.Optimizer, slice]:
    model = _shard(MatrixNet())
    world, me = dist.get_world_size(), dist.get_rank()
    per = BATCH // world
    return model, case.build(matrix_groups(model), lr=LR), slice(me * per, (me + 1) * per)


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _all_ranks_equal(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(gathered[0], other) for other in gathered)


def _checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }


def _load(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    state = _checkpoint(model, optimizer)
    load_sharded_state(state, checkpoint_id=str(path))  # dcp.load, refusing what cannot fit
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


# ------------------------------------------------------------------------ per-case scenarios
def _scenario_train(case: OptimizerCase) -> dict[str, Any]:
    """10 steps with refreshes at 1, 5, 9; what each parameter's state looks like after."""
    model, optimizer, rows = _sharded(case)
    train(model, optimizer, matrix_batches(STEPS, batch=BATCH), rows)
    names = {param: name for name, param in model.named_parameters()}
    states = {names[param]: state for param, state in optimizer.state.items()}
    return {
        "weights": _full(model),
        "quantized": {name: is_quantized(state) for name, state in states.items()},
        "sharded": {
            name: sorted(k for k, v in state.items() if isinstance(v, DTensor))
            for name, state in states.items()
        },
        "placements": {
            str(v.placements)
            for state in states.values()
            for v in state.values()
            if isinstance(v, DTensor)
        },
        # bases and counters are replicated: every rank must hold the same values
        "replicated_equal": all(
            _all_ranks_equal(v)
            for _, state in sorted(states.items())
            for _, v in sorted(state.items())
            if isinstance(v, torch.Tensor) and not isinstance(v, DTensor)
        ),
    }


def _scenario_dcp(case: OptimizerCase, directory: Path) -> dict[str, Any]:
    """Save at step 4 (torch.distributed.checkpoint), resume in a new model and optimizer."""
    batches = matrix_batches(DCP_STEPS, batch=BATCH)
    model, optimizer, rows = _sharded(case)
    train(model, optimizer, batches[:SAVE_AT], rows)
    dcp.save(_checkpoint(model, optimizer), checkpoint_id=str(directory / f"ckpt_{case.id}"))
    train(model, optimizer, batches[SAVE_AT:], rows)
    straight = _full(model)

    model, optimizer, rows = _sharded(case)
    _load(model, optimizer, directory / f"ckpt_{case.id}")
    train(model, optimizer, batches[SAVE_AT:], rows)
    return {"straight": straight, "resumed": _full(model)}


def _scenario_layerwise(case: OptimizerCase) -> dict[str, Any]:
    """The train scenario layer-wise: each parameter steps in the hook FSDP2 fires after its
    reduce-scatter (``optimizer.step()`` of the loop then only checks the window closed)."""
    model, optimizer, rows = _sharded(case)
    wrapper = LayerwiseOptimizer(optimizer, model)
    train(model, wrapper, matrix_batches(STEPS, batch=BATCH), rows)  # type: ignore[arg-type]
    return {"weights": _full(model), "freed": all(p.grad is None for p in model.parameters())}


# ----------------------------------------------------- variants refused on FSDP2 on purpose
def _scenario_refused() -> dict[str, str]:
    batches = matrix_batches(STEPS, batch=BATCH)
    per = BATCH // dist.get_world_size()
    rows = slice(dist.get_rank() * per, (dist.get_rank() + 1) * per)

    def qgalore_int8() -> None:
        from lowrank_optim import QGaLoreAdamW
        from lowrank_optim.quant import quantize_model

        model = quantize_model(MatrixNet(), include=lambda name: True)
        for layer in model.children():
            fully_shard(layer)
        fully_shard(model)
        optimizer = QGaLoreAdamW(matrix_groups(model), lr=LR, model=model)
        train(model, optimizer, batches[:1], rows)

    def welore_handoff() -> None:
        model = MatrixNet()
        fully_shard(model)  # one unit: its linears can be handed off, but not tapered
        optimizer = WeLoreAdamW(
            matrix_groups(model),
            lr=LR,
            model=model,
            stability=StabilityConfig(threshold=1e-6, patience=1),
            handoff=HandoffConfig(start_step=1, check_every=1, target_reduction=0.5, taper_steps=2),
        )
        for step in range(STEPS):
            train(model, optimizer, batches[step : step + 1], rows)
            optimizer.maybe_handoff(model)

    return {"qgalore_int8": error_of(qgalore_int8), "welore_handoff": error_of(welore_handoff)}


def _reshard(case: OptimizerCase, directory: Path) -> dict[str, Any]:
    """On 1 rank: load the 2-rank checkpoint of ``case`` and continue."""
    model, optimizer, rows = _sharded(case)
    error = error_of(lambda: _load(model, optimizer, directory / f"ckpt_{case.id}"))
    if error == "no error":
        batches = matrix_batches(DCP_STEPS, batch=BATCH)[SAVE_AT:]
        error = error_of(lambda: train(model, optimizer, batches, rows))
    return {"error": error, "weights": _full(model)}


# ----------------------------------------------------------------------------- the run
def _attempt(results: dict[str, Any], name: str, scenario: Callable[[], Any]) -> None:
    start = time.monotonic()
    try:
        results[name] = scenario()
    except (Exception, dcp.CheckpointException):  # noqa: BLE001 - reported by its test
        results[name] = {"failure": traceback.format_exc()}
    results.setdefault("seconds", {})[name] = time.monotonic() - start


def _run(rank: int, world: int, port: int, directory: str) -> None:
    folder = Path(directory)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    results: dict[str, Any] = {}
    for case in CASES:
        _attempt(results, f"train/{case.id}", lambda c=case: _scenario_train(c))
        _attempt(results, f"dcp/{case.id}", lambda c=case: _scenario_dcp(c, folder))
        _attempt(results, f"layerwise/{case.id}", lambda c=case: _scenario_layerwise(c))
    _attempt(results, "refused", _scenario_refused)
    dist.barrier()  # no rank tears gloo down while a peer is still in a collective
    dist.destroy_process_group()
    if rank == 0:  # the same checkpoints on another number of ranks
        store = f"file://{folder / 'reshard_store'}"
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1, timeout=timeout)
        for case in CASES:
            _attempt(results, f"reshard/{case.id}", lambda c=case: _reshard(c, folder))
        dist.destroy_process_group()
    torch.save(results, folder / f"rank{rank}.pt")


def spawn(directory: Path) -> list[dict[str, Any]]:
    """Run every scenario on ``WORLD`` processes; each rank's results, by scenario name."""
    return spawn_ranks(_run, WORLD, directory, SPAWN_TIMEOUT_S, with_world=True)
