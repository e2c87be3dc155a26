"""Layer-wise updates under DistributedDataParallel on 2 gloo ranks (one spawn per module).

Layer-wise DDP (each parameter steps in the communication hook once its bucket is all-reduced,
accumulation 4 with ``no_sync``, low-rank sums folded into the reduction) against regular DDP
stepping, to the tolerance of ``test_layerwise.py`` (1e-5 relative, 1e-6 absolute): the
low-rank windows sum ``P^T G_i`` before the mean, equal up to rounding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TinyNet
from layerwise_ddp_worker import STEPS, spawn
from layerwise_ddp_worker import schedule as lr_schedule

Results = list[dict[str, Any]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Results:
    return spawn(tmp_path_factory.mktemp("layerwise_ddp"))


def _result(runs: Results, name: str) -> list[dict[str, Any]]:
    per_rank = [results[name] for results in runs]
    for result in per_rank:
        if "failure" in result:
            pytest.fail(f"scenario {name} failed on a rank:\n{result['failure']}")
    return per_rank


def _close(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    for index, (a, b) in enumerate(zip(first, second, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"parameter {index} differs")


@pytest.mark.parametrize("name", ["projected", "plain"])
def test_layerwise_ddp_matches_regular_ddp(runs: Results, name: str) -> None:
    regular = _result(runs, f"train/{name}/regular")
    layerwise = _result(runs, f"train/{name}/layerwise")
    for theirs, ours in zip(regular, layerwise, strict=True):
        assert len(ours["losses"]) == STEPS
        assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5, abs=1e-6)
        _close(ours["weights"], theirs["weights"])
        assert ours["freed"]  # no .grad survived any backward
        # One scheduler step and one optimizer step per window.
        assert ours["last_epoch"] == theirs["last_epoch"] == STEPS
        assert ours["lr"] == pytest.approx(2e-2 * lr_schedule(STEPS))
        assert ours["steps"] == [STEPS]
    # Both ranks hold the same weights, bit for bit.
    for a, b in zip(layerwise[0]["weights"], layerwise[1]["weights"], strict=True):
        assert torch.equal(a, b)
    # The weights moved (a test that cannot pass on a no-op wrapper).
    assert not torch.allclose(layerwise[0]["weights"][0], TinyNet().up.weight)
    if name == "projected":
        # Windows of steps 3 and 6 held P^T G (rank 4) between backward passes, not m x n.
        held = {entry["low_rank"] for entry in layerwise[0]["held"]}
        assert 4 * 20 + 4 * 20 in held


def test_layerwise_ddp_per_parameter_clipping(runs: Results) -> None:
    regular = _result(runs, "clip/regular")
    layerwise = _result(runs, "clip/layerwise")
    unclipped = _result(runs, "train/plain/layerwise")
    for theirs, ours, free in zip(regular, layerwise, unclipped, strict=True):
        _close(ours["weights"], theirs["weights"])
        assert not torch.allclose(ours["weights"][2], free["weights"][2])


def test_layerwise_ddp_resume_inside_a_window_is_bit_for_bit(runs: Results) -> None:
    for result in _result(runs, "resume"):
        assert result["low_rank_saved"]  # saved inside a low-rank window
        assert result["optimizer_steps"] == 5
        for straight, resumed in zip(result["straight"], result["resumed"], strict=True):
            assert torch.equal(straight, resumed)


def test_layerwise_ddp_refusals_name_their_reason(runs: Results) -> None:
    for errors in _result(runs, "refused"):
        assert errors["second_hook"].startswith("ValueError:"), errors["second_hook"]
        assert "already has a communication hook" in errors["second_hook"]
        assert errors["unwrapped"].startswith("ValueError:"), errors["unwrapped"]
        assert "DistributedDataParallel wrapper as model=" in errors["unwrapped"]
        assert errors["last_under_no_sync"].startswith("RuntimeError:")
        assert "no_sync()" in errors["last_under_no_sync"]


def test_layerwise_ddp_welore_handoff_matches_regular(runs: Results) -> None:
    """Hand-offs re-wrap DDP mid-run; layer-wise updates follow onto the factors."""
    regular = _result(runs, "handoff/regular")
    layerwise = _result(runs, "handoff/layerwise")
    for theirs, ours in zip(regular, layerwise, strict=True):
        assert theirs["layers"], "no hand-off: the test would not exercise it"
        assert ours["layers"] == theirs["layers"]
        assert ours["factored"] == theirs["factored"] > 0
        assert ours["rewrapped"] and theirs["rewrapped"]
        assert ours["freed"]
        assert list(ours["weights"]) == list(theirs["weights"])
        _close(list(ours["weights"].values()), list(theirs["weights"].values()))
    for a, b in zip(
        layerwise[0]["weights"].values(), layerwise[1]["weights"].values(), strict=True
    ):
        assert torch.equal(a, b)


def test_layerwise_ddp_previous_global_clip(runs: Results) -> None:
    """``clip="previous_global"``: every gradient scaled by the last step's global norm."""
    regular = _result(runs, "clip_global/regular")
    layerwise = _result(runs, "clip_global/layerwise")
    per_parameter = _result(runs, "clip/layerwise")
    for theirs, ours, other in zip(regular, layerwise, per_parameter, strict=True):
        _close(ours["weights"], theirs["weights"])
        assert not torch.allclose(ours["weights"][0], other["weights"][0])


def test_ddp_wrapper_replaced_by_a_handoff_refuses_to_train(runs: Results) -> None:
    """A dropped ``maybe_handoff`` result: the first step after the hand-off raises on every
    rank instead of letting the ranks' factors drift apart."""
    for result in _result(runs, "stale_wrapper"):
        assert result["handoffs"] > 0
        first = result["steps"]
        assert "RuntimeError: This DistributedDataParallel wrapper was replaced" in result["error"]
        assert f"hand-off of step {first}" in result["error"]
        assert result["released"]
