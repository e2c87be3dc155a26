"""The FSDP2 column of the optimizer matrix: every (optimizer, storage) case on 2 gloo ranks.

One spawn (``matrix_fsdp_worker``, a module fixture) plays every case; the tests compare what
each rank saw with a single-process run of the same global batches, to the tolerances of
``test_fsdp.py``: 1e-4 relative / 1e-5 absolute for full-precision moments, 5e-3 absolute for
quantized ones (each rank quantizes its own rows, so blocks differ from one process's).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import MatrixNet, matrix_batches, matrix_groups
from matrix_fsdp_worker import BATCH, LR, STEPS, WORLD, spawn, train
from optimizer_cases import CASES, OptimizerCase, is_quantized

from lowrank_optim import CheckpointMismatchError

Results = list[dict[str, Any]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Results:
    return spawn(tmp_path_factory.mktemp("matrix_fsdp"))


def _result(runs: Results, name: str) -> list[Any]:
    """``name``'s result on every rank that ran it (rank 0 alone for ``reshard/``)."""
    per_rank = [results[name] for results in runs if name in results]
    assert per_rank, f"no rank ran {name}"
    for result in per_rank:
        if isinstance(result, dict) and "failure" in result:
            pytest.fail(f"scenario {name} failed on a rank:\n{result['failure']}")
    return per_rank


def _single_process(case: OptimizerCase) -> tuple[MatrixNet, torch.optim.Optimizer]:
    model = MatrixNet()
    optimizer = case.build(matrix_groups(model), lr=LR)
    train(model, optimizer, matrix_batches(STEPS, batch=BATCH))
    return model, optimizer


def _tolerance(case: OptimizerCase) -> dict[str, float]:
    return {"rtol": 0.0, "atol": 5e-3} if case.quantized else {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fsdp_matches_single_process(runs: Results, case: OptimizerCase) -> None:
    """10 steps, refreshes at 1, 5, 9; uneven shards (13 + 12 and 3 + 2 rows)."""
    model, optimizer = _single_process(case)
    names = {param: name for name, param in model.named_parameters()}
    layout = {names[param]: is_quantized(state) for param, state in optimizer.state.items()}
    quantized = {name for name, value in layout.items() if value}
    # The state really is quantized where the storage says so (and nowhere else).
    assert quantized == (set(MatrixNet.QUANTIZED) if case.quantized else set())
    if case.quantized:  # codes of moment_bits bits: wide's 1536 x 4 moments
        codes = optimizer.state[model.wide.weight]["exp_avg_codes"]
        assert codes.numel() == 1536 * 4 * case.moment_bits // 8
    for rank_result in _result(runs, f"train/{case.id}"):
        assert rank_result["replicated_equal"]  # bases and counters agree on every rank
        assert rank_result["quantized"] == layout  # quantized by the global size, not a shard's
        for name, keys in rank_result["sharded"].items():
            expected = ["exp_avg_absmax", "exp_avg_codes", "exp_avg_sq_absmax", "exp_avg_sq_codes"]
            assert keys == (expected if layout[name] else ["exp_avg", "exp_avg_sq"]), name
        assert rank_result["placements"] == {"(Shard(dim=0),)"}
        for got, want in zip(rank_result["weights"], model.parameters(), strict=True):
            torch.testing.assert_close(got, want.detach(), **_tolerance(case))
    # The training moved the weights: equality is not the trivial one.
    initial = list(MatrixNet().parameters())
    assert all(not torch.allclose(a, b) for a, b in zip(initial, model.parameters(), strict=True))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fsdp_dcp_round_trip_is_bit_for_bit(runs: Results, case: OptimizerCase) -> None:
    """Saved at step 4 with torch.distributed.checkpoint, resumed in a new model/optimizer."""
    for rank_result in _result(runs, f"dcp/{case.id}"):
        for straight, resumed in zip(rank_result["straight"], rank_result["resumed"], strict=True):
            assert torch.equal(straight, resumed)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fsdp_checkpoint_on_another_rank_count(runs: Results, case: OptimizerCase) -> None:
    """Full-precision state reshards (2 -> 1 rank) and continues; quantized state is refused
    (its blocks follow the shards) with the library's own error, by ``load_sharded_state``
    before ``dcp.load`` (whose own size check would fail first: ``out``'s padded absmax has
    36 blocks on 2 ranks and 30 on 1)."""
    (resumed,) = _result(runs, f"reshard/{case.id}")
    if case.quantized:
        assert resumed["error"].startswith(CheckpointMismatchError.__name__), resumed["error"]
        assert f"saved on {WORLD} ranks" in resumed["error"] and "has 1" in resumed["error"]
        assert any(f"moments of {name} were" in resumed["error"] for name in MatrixNet.QUANTIZED)
        assert "full-precision moments load on any number" in resumed["error"]
        return
    assert resumed["error"] == "no error"
    straight = _result(runs, f"dcp/{case.id}")[0]["straight"]
    for got, want in zip(resumed["weights"], straight, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- layer-wise
@pytest.mark.parametrize("case", CASES, ids=str)
def test_layerwise_on_fsdp_matches_regular_stepping(runs: Results, case: OptimizerCase) -> None:
    """Layer-wise (in FSDP2's post-reduce-scatter hook) against ``optimizer.step()``, both on
    FSDP2, to the tolerance of ``test_matrix_layerwise.py``."""
    for ours, theirs in zip(
        _result(runs, f"layerwise/{case.id}"), _result(runs, f"train/{case.id}"), strict=True
    ):
        assert ours["freed"]
        for got, want in zip(ours["weights"], theirs["weights"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ combinations refused on purpose
@pytest.mark.parametrize(
    ("name", "kind", "words"),
    [
        # fully_shard itself refuses QuantizedLinear's INT8 weight handle (stride 0); the
        # optimizer's own check stays for the day it does not
        ("qgalore_int8", "NotImplementedError", ["FSDP", "non-contiguous"]),
        ("welore_handoff", "NotImplementedError", ["hand-off", "taper_steps=0"]),
    ],
)
def test_refused_variants_on_fsdp(runs: Results, name: str, kind: str, words: list[str]) -> None:
    """QGaLoreAdamW's INT8 weights and WeLoreAdamW's tapered hand-off are refused on FSDP2."""
    for errors in _result(runs, "refused"):
        message = errors[name]
        assert message.startswith(f"{kind}:"), message
        for word in words:
            assert word in message, message
