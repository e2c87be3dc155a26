"""Focused FSDP2 (``fully_shard``) tests, 2 CPU processes over gloo: the sharded refresh
strategies (Gram all-reduce, all-gather), the bytes they communicate, checkpoint resume and
resharding per moment storage, and the input checks of the FSDP2 path.

Every (optimizer, storage) case on FSDP2 against one process, and the combinations FSDP2
refuses on purpose, are the FSDP2 column of the optimizer matrix (``test_matrix_fsdp.py``).

One 2-rank run (a module fixture) plays every scenario and saves what each rank saw; the tests
compare that with single-process runs of the same global batches. Rank 0 then loads the 2-rank
checkpoints alone, in a 1-rank group (a different number of ranks).
"""

from __future__ import annotations

import datetime
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import spawn_ranks
from optimizer_cases import FULL, INT4, INT8, OptimizerCase, find_case
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lowrank_optim import CheckpointMismatchError, GaLoreAdamW
from lowrank_optim.distributed import (
    CollectiveCounter,
    gather_refresh_bytes,
    gram_refresh_bytes,
    load_sharded_state,
)
from lowrank_optim.projection import RIGHT
from lowrank_optim.stability import ENERGY_HISTORY, OVERLAP_HISTORY

WORLD = 2
BATCH = 16  # global batch; each rank takes BATCH / world rows
STEPS = 10  # update_proj_gap 4: refreshes at steps 1, 5 and 9
SAVE_AT = 4
TIMEOUT_S = 120  # a collective that waits longer raises in the worker
SPAWN_TIMEOUT_S = 900  # a whole run (generous: the CI machine may be loaded)


# --------------------------------------------------------------------------- shared set-up
def _model(wide: int) -> nn.Sequential:
    """Three linears: tall (32 x 8, Gram all-reduce), ``wide x 32`` and ``5 x wide`` (uneven
    shards of 5 rows: 3 + 2)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, wide), nn.Tanh(), nn.Linear(wide, 5)
    )


def _groups(model: nn.Module, rank: int) -> list[dict[str, Any]]:
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    common = {
        "rank": rank,
        "update_proj_gap": 4,
        "scale": 0.5,
        "proj_type": "right",
        "refresh": "gram_eigh",
    }
    return [
        {"params": rest},
        {"params": [mats[0], mats[2]], **common},  # auto: gram (32 x 8), gather (5 x wide)
        {"params": [mats[1]], **common, "fsdp_refresh": "gram"},  # forced Gram on wide x 32
    ]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 8, generator=generator), torch.randn(BATCH, 5, generator=generator))
        for _ in range(STEPS)
    ]


CASES: dict[str, tuple[OptimizerCase, int, int]] = {
    # name: the matrix's case (optimizer_cases.py), width of the middle layer, rank
    "galore": (find_case("GaLoreAdamW", FULL), 16, 4),
    # 768 x 32 at rank 8: 6144-element moments, quantized (a 3072-element shard alone is not)
    "galore8bit": (find_case("GaLoreAdamW8bit", INT8), 768, 8),
    # the same in torchao's 4-bit format: blocks of 128, two codes per byte
    "galore4bit": (find_case("GaLoreAdamW8bit", INT4), 768, 8),
    # rank 9: a projected row of 9 codes is 4.5 bytes, so the codes are stored flat, each
    # rank's padded to whole bytes (770 rows: 385 x 9 = 3465 codes per rank, 1733 bytes)
    "galore4bit_odd": (find_case("GaLoreAdamW8bit", INT4), 770, 9),
}


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    rows: slice,
) -> None:
    for inputs, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        (model(inputs[rows]) - targets[rows]).square().mean().backward()
        optimizer.step()


def _single_process(case: str, steps: int = STEPS) -> tuple[nn.Module, GaLoreAdamW]:
    registered, wide, rank = CASES[case]
    model = _model(wide)
    optimizer = registered.build(_groups(model, rank), lr=1e-2)
    _train(model, optimizer, _batches()[:steps], slice(None))
    return model, optimizer


# ------------------------------------------------------------------------------ the workers
def _sharded(case: str) -> tuple[nn.Module, GaLoreAdamW, slice]:
    registered, wide, rank = CASES[case]
    model = _model(wide)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    world, me = dist.get_world_size(), dist.get_rank()
    per = BATCH // world
    return model, registered.build(_groups(model, rank), lr=1e-2), slice(me * per, (me + 1) * per)


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _all_ranks_equal(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(gathered[0], other) for other in gathered)


def _scenario_train(case: str) -> dict[str, Any]:
    model, optimizer, rows = _sharded(case)
    batches = _batches()
    counters = {}  # step 8: plain; step 9: refresh; step 10: captured-energy record
    for step, (inputs, targets) in enumerate(batches, start=1):
        optimizer.zero_grad(set_to_none=True)
        (model(inputs[rows]) - targets[rows]).square().mean().backward()
        with CollectiveCounter() as counters[step]:
            optimizer.step()
    projected = [p for group in optimizer.param_groups[1:] for p in group["params"]]
    states = [optimizer.state[p] for p in projected]
    return {
        "weights": _full(model),
        "bases": [state[RIGHT].clone() for state in states],
        "bases_equal": all(_all_ranks_equal(state[RIGHT]) for state in states),
        "overlap": [state[OVERLAP_HISTORY] for state in states],
        "energy": [state[ENERGY_HISTORY] for state in states],
        "sharded_moments": [
            sorted(k for k, v in state.items() if isinstance(v, DTensor)) for state in states
        ],
        "placements": [
            v.placements for state in states for v in state.values() if isinstance(v, DTensor)
        ],
        "calls": {step: dict(counter.calls) for step, counter in counters.items()},
        "bytes": {step: dict(counter.bytes) for step, counter in counters.items()},
        "sharded_params": sum(1 for p in model.parameters() if isinstance(p, DTensor)),
    }


def _checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }


def _scenario_dcp(case: str, directory: Path) -> dict[str, Any]:
    batches = _batches()
    model, optimizer, rows = _sharded(case)
    _train(model, optimizer, batches[:SAVE_AT], rows)
    dcp.save(_checkpoint(model, optimizer), checkpoint_id=str(directory / f"ckpt_{case}"))
    _train(model, optimizer, batches[SAVE_AT:], rows)
    straight = _full(model)

    model, optimizer, rows = _sharded(case)
    state = _checkpoint(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory / f"ckpt_{case}"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    _train(model, optimizer, batches[SAVE_AT:], rows)
    resumed = _full(model)
    return {"straight": straight, "resumed": resumed}


def _error_of(action: Callable[[], object]) -> str:
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the test inspects type and message
        return f"{type(error).__name__}: {error}"
    return "no error"


def _scenario_errors() -> dict[str, str]:
    errors = {}
    batches = _batches()
    mesh = dist.init_device_mesh("cpu", (dist.get_world_size(),))

    # a weight sharded on its columns (tensor parallelism), not FSDP2's rows
    weight = nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)]))
    weight.grad = distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)])
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2, "proj_type": "right"}])
    errors["shard1"] = _error_of(optimizer.step)

    def left_projection() -> None:
        model, _, rows = _sharded("galore")
        groups = _groups(model, 4)
        for group in groups[1:]:
            group["proj_type"] = "std"  # the wide 16 x 32 layer would project on the left
        _train(model, GaLoreAdamW(groups, lr=1e-2), batches[:1], rows)

    errors["proj_type"] = _error_of(left_projection)

    def bad_strategy() -> None:
        model, _, rows = _sharded("galore")
        groups = _groups(model, 4)
        groups[2]["fsdp_refresh"] = "broadcast"
        _train(model, GaLoreAdamW(groups, lr=1e-2), batches[:1], rows)

    errors["fsdp_refresh"] = _error_of(bad_strategy)

    # Layer-wise stepping, QGaLoreAdamW's INT8 weights and WeLore hand-offs are refused on
    # FSDP2 on purpose: test_matrix_fsdp.py asserts those refusals for every case.
    return errors


def _play(results: dict[str, Any], scenarios: dict[str, Callable[[], Any]]) -> None:
    for name, scenario in scenarios.items():
        try:
            results[name] = scenario()
        except Exception:  # noqa: BLE001 - reported by the test that reads this scenario
            results[name] = {"failure": traceback.format_exc()}


def _run(rank: int, world: int, port: int, directory: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    results: dict[str, Any] = {}
    scenarios: dict[str, Callable[[], Any]] = {"train_galore": lambda: _scenario_train("galore")}
    scenarios |= {
        f"dcp_{case}": (lambda c=case: _scenario_dcp(c, Path(directory))) for case in CASES
    }
    scenarios["errors"] = _scenario_errors
    _play(results, scenarios)
    dist.barrier()  # no rank tears gloo down while a peer is still in a collective
    dist.destroy_process_group()
    if rank == 0:  # the 2-rank checkpoints, loaded by one rank alone
        store = f"file://{Path(directory) / 'reshard_store'}"
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1, timeout=timeout)
        reshard = {
            f"reshard_{case}": (lambda c=case: _reshard(c, Path(directory))) for case in CASES
        }
        _play(results, reshard)
        dist.destroy_process_group()
    torch.save(results, Path(directory) / f"rank{rank}.pt")


def _reshard(case: str, directory: Path) -> dict[str, Any]:
    """Load a 2-rank checkpoint on this (1-rank) run and continue. Padded flat codes change
    their global size with the number of ranks, so plain ``dcp.load`` would fail with DCP's own
    size error (a BaseException); ``load_sharded_state`` refuses them first, by name."""
    model, optimizer, rows = _sharded(case)
    state = _checkpoint(model, optimizer)
    load = load_sharded_state if case == "galore4bit_odd" else dcp.load

    def resume() -> None:
        load(state, checkpoint_id=str(directory / f"ckpt_{case}"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        _train(model, optimizer, _batches()[SAVE_AT:], rows)

    return {"error": _error_of(resume), "weights": _full(model)}


def _spawn(world: int, directory: Path) -> list[dict[str, Any]]:
    return spawn_ranks(_run, world, directory, SPAWN_TIMEOUT_S, with_world=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    ranks = _spawn(WORLD, tmp_path_factory.mktemp("fsdp"))
    return {"main": ranks, "reshard": ranks[:1]}  # rank 0 alone loaded the checkpoints


def _result(runs: dict[str, list[dict[str, Any]]], run: str, name: str) -> list[Any]:
    per_rank = [results[name] for results in runs[run]]
    for result in per_rank:
        if isinstance(result, dict) and "failure" in result:
            pytest.fail(f"scenario {name} failed on a rank:\n{result['failure']}")
    return per_rank


# ------------------------------------------------------------------------------------ tests
def test_fsdp_matches_single_process(runs: dict[str, list[dict[str, Any]]]) -> None:
    """10 steps with refreshes at 1, 5, 9 (Gram all-reduce and all-gather paths, uneven
    shards): the 2-rank weights, bases and stability metrics match one process."""
    sharded = _result(runs, "main", "train_galore")
    model, optimizer = _single_process("galore")
    reference = [p.detach() for p in model.parameters()]
    projected = [p for group in optimizer.param_groups[1:] for p in group["params"]]
    for rank_result in sharded:
        assert rank_result["bases_equal"]
        for got, want in zip(rank_result["weights"], reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for index, param in enumerate(projected):
            state = optimizer.state[param]
            torch.testing.assert_close(rank_result["bases"][index], state[RIGHT], atol=1e-4, rtol=0)
            for key, history in (("overlap", OVERLAP_HISTORY), ("energy", ENERGY_HISTORY)):
                assert rank_result[key][index] == pytest.approx(state[history], abs=1e-5)
                assert rank_result[key][index]  # the run refreshed: histories are not empty
            assert rank_result["sharded_moments"][index] == ["exp_avg", "exp_avg_sq"]
        assert all(placement == (Shard(0),) for placement in rank_result["placements"])
    # The training moved the weights: equality is not the trivial one.
    initial = [p.detach() for p in _model(16).parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(initial, reference, strict=True))


def test_fsdp_communication_per_step(runs: dict[str, list[dict[str, Any]]]) -> None:
    """Plain steps all-reduce one fp32 finite-flag per sharded parameter (one call per group);
    a refresh adds one Gram all-reduce or one all-gather per matrix, as the formulas say; the
    step after it two fp64 sums per matrix (captured energy)."""
    result = _result(runs, "main", "train_galore")[0]
    flags = 4 * result["sharded_params"]
    assert result["calls"][8] == {"all_reduce": 3}  # one per param group
    assert result["bytes"][8] == {"all_reduce": flags}
    gram = gram_refresh_bytes(8) + gram_refresh_bytes(32)  # 32 x 8 (auto), 16 x 32 (forced)
    assert result["calls"][9] == {"all_reduce": 3 + 2, "all_gather_single": 1}
    assert result["bytes"][9] == {
        "all_reduce": flags + gram,
        "all_gather_single": gather_refresh_bytes(5, 16, WORLD),  # 5 x 16: rows 3 + 2
    }
    assert result["calls"][10] == {"all_reduce": 3 + 2}  # energy: one call per projected group
    assert result["bytes"][10] == {"all_reduce": flags + 3 * 2 * 8}


@pytest.mark.parametrize("case", list(CASES))
def test_dcp_round_trip_is_bit_for_bit(runs: dict[str, list[dict[str, Any]]], case: str) -> None:
    for rank_result in _result(runs, "main", f"dcp_{case}"):
        for straight, resumed in zip(rank_result["straight"], rank_result["resumed"], strict=True):
            assert torch.equal(straight, resumed)


def test_dcp_load_on_other_rank_count(runs: dict[str, list[dict[str, Any]]]) -> None:
    """Full-precision state reshards (2 -> 1 rank) and continues; 8- and 4-bit state is
    refused."""
    resumed = _result(runs, "reshard", "reshard_galore")[0]
    assert resumed["error"] == "no error"
    straight = _result(runs, "main", "dcp_galore")[0]["straight"]
    for got, want in zip(resumed["weights"], straight, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for case in ("galore8bit", "galore4bit", "galore4bit_odd"):
        refused = _result(runs, "reshard", f"reshard_{case}")[0]["error"]
        assert refused.startswith(CheckpointMismatchError.__name__)
        assert "saved on 2 ranks" in refused and "has 1" in refused


@pytest.mark.parametrize(
    ("name", "kind", "words"),
    [
        ("shard1", "ValueError", ["Shard(dim=1)", "Shard(0)"]),
        ("proj_type", "ValueError", ["'std'", "proj_type='right'"]),
        ("fsdp_refresh", "ValueError", ["'broadcast'", "auto, gram, gather"]),
    ],
)
def test_unsupported_combinations_raise(
    runs: dict[str, list[dict[str, Any]]], name: str, kind: str, words: list[str]
) -> None:
    for errors in _result(runs, "main", "errors"):
        message = errors[name]
        assert message.startswith(f"{kind}:"), message
        for word in words:
            assert word in message, message
