"""Layer-wise updates under FSDP2 (``fully_shard``) on 2 gloo ranks (one spawn per module).

Each parameter steps in the post-accumulate-grad hook FSDP2 fires once its reduce-scatter has
produced the row shard; accumulation 4, either reduce-scattering every micro-batch (low-rank
``G_k Q`` sums per rank) or under ``set_requires_gradient_sync(False)``. Compared with regular
FSDP2 stepping to the tolerance of ``test_layerwise.py`` (1e-5 relative, 1e-6 absolute).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TinyNet
from layerwise_fsdp_worker import ACCUMULATION, STEPS, spawn
from layerwise_fsdp_worker import schedule as lr_schedule

Results = list[dict[str, Any]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Results:
    return spawn(tmp_path_factory.mktemp("layerwise_fsdp"))


def _result(runs: Results, name: str) -> list[dict[str, Any]]:
    per_rank = [results[name] for results in runs]
    for result in per_rank:
        if "failure" in result:
            pytest.fail(f"scenario {name} failed on a rank:\n{result['failure']}")
    return per_rank


def _close(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    for index, (a, b) in enumerate(zip(first, second, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"parameter {index} differs")


@pytest.mark.parametrize("name", ["projected/layerwise", "projected/nosync", "plain/layerwise"])
def test_layerwise_fsdp_matches_regular_fsdp(runs: Results, name: str) -> None:
    regular = _result(runs, f"train/{name.split('/')[0]}/regular")
    layerwise = _result(runs, f"train/{name}")
    for theirs, ours in zip(regular, layerwise, strict=True):
        assert len(ours["losses"]) == STEPS
        assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5, abs=1e-6)
        _close(ours["weights"], theirs["weights"])
        assert ours["freed"]  # no sharded .grad survived any backward
        assert ours["last_epoch"] == theirs["last_epoch"] == STEPS
        assert ours["lr"] == pytest.approx(2e-2 * lr_schedule(STEPS))
        assert ours["steps"] == [STEPS]
    # Both ranks hold the same (gathered) weights, bit for bit.
    for a, b in zip(layerwise[0]["weights"], layerwise[1]["weights"], strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(layerwise[0]["weights"][0], TinyNet().up.weight)
    if name == "projected/layerwise":
        # Windows of steps 3 and 6 held this rank's G_k Q: (10 + 3 rows) x rank 4, not m x n.
        held = {entry["low_rank"] for entry in layerwise[0]["held"]}
        assert 10 * 4 + 3 * 4 in held


def test_fsdp_fires_the_hooks_in_the_same_order_on_every_rank(runs: Results) -> None:
    """The steps inside the hooks communicate (finite flags, Gram refresh, energy sums)."""
    first, second = (result["order"] for result in _result(runs, "train/projected/layerwise"))
    assert first == second
    assert len(first) == 6 * STEPS * ACCUMULATION  # every parameter, every micro-batch
    nosync = _result(runs, "train/projected/nosync")[0]["order"]
    assert len(nosync) == 6 * STEPS  # only the window's last backward reduce-scatters


def test_layerwise_fsdp_per_parameter_clipping(runs: Results) -> None:
    regular = _result(runs, "clip/regular")
    layerwise = _result(runs, "clip/layerwise")
    unclipped = _result(runs, "train/plain/layerwise")
    for theirs, ours, free in zip(regular, layerwise, unclipped, strict=True):
        _close(ours["weights"], theirs["weights"])
        assert not torch.allclose(ours["weights"][2], free["weights"][2])


def test_layerwise_fsdp_resume_inside_a_window_is_bit_for_bit(runs: Results) -> None:
    for result in _result(runs, "resume"):
        assert result["low_rank_saved"]  # saved inside a low-rank window
        assert result["optimizer_steps"] == 5
        for straight, resumed in zip(result["straight"], result["resumed"], strict=True):
            assert torch.equal(straight, resumed)


def test_layerwise_fsdp_refusals_name_their_reason(runs: Results) -> None:
    for errors in _result(runs, "refused"):
        assert errors["without_model"].startswith("ValueError:"), errors["without_model"]
        assert "root module as model=" in errors["without_model"]
        assert errors["last_without_sync"].startswith("RuntimeError:")
        assert "set_requires_gradient_sync(False)" in errors["last_without_sync"]


def test_layerwise_fsdp_previous_global_clip(runs: Results) -> None:
    """``clip="previous_global"``: every gradient scaled by the last step's global norm."""
    regular = _result(runs, "clip_global/regular")
    layerwise = _result(runs, "clip_global/layerwise")
    per_parameter = _result(runs, "clip/layerwise")
    for theirs, ours, other in zip(regular, layerwise, per_parameter, strict=True):
        _close(ours["weights"], theirs["weights"])
        assert not torch.allclose(ours["weights"][0], other["weights"][0])


def test_layerwise_fsdp_welore_handoff_matches_regular(runs: Results) -> None:
    """Hand-offs mid-run replace weights by sharded factors in place; the layer-wise hooks
    follow onto the factors (FSDP2 fires them after its reduce-scatter)."""
    regular = _result(runs, "handoff/regular")
    layerwise = _result(runs, "handoff/layerwise")
    for theirs, ours in zip(regular, layerwise, strict=True):
        assert theirs["records"], "no hand-off: the test would not exercise it"
        assert ours["records"] == theirs["records"]  # same layers, same steps, same ranks
        assert ours["factored"] == theirs["factored"] > 0
        assert ours["in_place"] and ours["sharded"]
        assert ours["freed"] and ours["hooked"]
        assert ours["optimizer_steps"] == len(ours["losses"])
        assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5, abs=1e-6)
        assert list(ours["weights"]) == list(theirs["weights"])
        _close(list(ours["weights"].values()), list(theirs["weights"].values()))
    for a, b in zip(
        layerwise[0]["weights"].values(), layerwise[1]["weights"].values(), strict=True
    ):
        assert torch.equal(a, b)
