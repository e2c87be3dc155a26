"""Sharded WeLore factorization (``lowrank_optim.distributed.factorize``) on 2 gloo CPU ranks.

One spawn (a module fixture) factorizes row-sharded matrices with uneven shards on both ranks and
saves what each rank computed; the tests compare it with one process's truncated SVD and WeLore
plan of the same weights, check that the replicated results agree bit for bit across ranks, and
that each route's reported peak allocation stays below one full weight.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import results_or_fail, run_gloo_scenario, spawn_ranks
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from lowrank_optim.distributed.factorize import (
    choose_factorization,
    factorize_sharded,
    gram_factorize_bytes,
    gram_peak_bytes,
    sketch_factorize_bytes,
    sketch_peak_bytes,
)
from lowrank_optim.distributed.sharding import rows_per_rank
from lowrank_optim.distributed.spectrum_routes import (
    choose_spectrum,
    panel_spectrum_peak_bytes,
    sharded_spectra,
    sharded_spectrum,
)
from lowrank_optim.factorize import plan_ranks
from lowrank_optim.handoff import HandoffCandidate, welore_ranks

WORLD = 2
TIMEOUT_S = 120
SPAWN_TIMEOUT_S = 300


def _decaying(rows: int, cols: int, seed: int, ratio: float = 0.7, rank: int | None = None):
    """``U diag(s) V^T`` with ``s_j = ratio^j`` (a clear gap after any rank), fp32."""
    generator = torch.Generator().manual_seed(seed)
    full = min(rows, cols)
    left = torch.linalg.qr(torch.randn(rows, full, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(cols, full, generator=generator, dtype=torch.float64)).Q
    values = ratio ** torch.arange(full, dtype=torch.float64) * 3.0
    if rank is not None:
        values[rank:] = 0.0
    return ((left * values) @ right.T).float()


# name: (weight, rank kept)
MATRICES: dict[str, tuple[torch.Tensor, int]] = {
    "narrow": (_decaying(203, 12, 1), 3),  # 102 + 101 rows; the Gram route
    "wide": (_decaying(161, 480, 2), 4),  # 81 + 80 rows; n x n Gram too big: the sketch
    "very_wide": (_decaying(41, 400, 3, ratio=0.8), 5),  # 21 + 20; spectrum from panels
    "rank_two": (_decaying(50, 8, 4, rank=2), 4),  # exact zeros beyond rank 2
    "noise": (torch.randn(200, 24, generator=torch.Generator().manual_seed(5)), 6),
}


def _rows(weight: torch.Tensor, rank: int) -> torch.Tensor:
    counts = rows_per_rank(weight.shape[0], WORLD)
    start = sum(counts[:rank])
    return weight[start : start + counts[rank]].clone()


# ------------------------------------------------------------------------------ the worker
def _scenarios(me: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, Any] = {}
    for name, (weight, rank) in MATRICES.items():
        sharded = distribute_tensor(weight, mesh, [Shard(0)])  # the DTensor input
        local = _rows(weight, me)  # the local-rows input
        routes = {"auto": factorize_sharded(sharded, rank)}
        for strategy in ("gram", "sketch"):
            routes[strategy] = factorize_sharded(
                local, rank, rows=weight.shape[0], strategy=strategy
            )
        results[f"factor/{name}"] = {
            route: {
                "up": out.up,
                "down": out.down,
                "values": out.values,
                "strategy": out.strategy,
                "peak": out.peak_bytes,
            }
            for route, out in routes.items()
        }
        spectrum = sharded_spectrum(sharded)
        results[f"spectrum/{name}"] = {
            "values": spectrum.values,
            "strategy": spectrum.strategy,
            "peak": spectrum.peak_bytes,
            "forced": {
                strategy: sharded_spectrum(sharded, strategy=strategy).values
                for strategy in ("gram", "panels")
            },
        }
    spectra = sharded_spectra(
        {name: distribute_tensor(w, mesh, [Shard(0)]) for name, (w, _) in MATRICES.items()}
    )
    shapes = {name: tuple(w.shape) for name, (w, _) in MATRICES.items()}
    plan = plan_ranks(spectra, shapes, 0.5, min_ratio=0.3)
    results["plan"] = plan.to_dict()
    results["handoff_ranks"] = welore_ranks(_candidates(sharded=True), [], 0.5)
    return results


def _candidates(sharded: bool) -> list[HandoffCandidate]:
    """Hand-off candidates over ``nn.Linear`` layers holding the test weights (FSDP2-sharded
    with ``fully_shard`` when ``sharded``)."""
    layers = nn.ModuleDict()
    for name, (weight, _) in MATRICES.items():
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(weight)
        layers[name] = layer
        if sharded:
            fully_shard(layer)
    return [HandoffCandidate(name, layer, 0) for name, layer in layers.items()]


def _run(rank: int, port: int, directory: str) -> None:
    run_gloo_scenario(rank, WORLD, port, directory, _scenarios, TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("fsdp_factorize")
    return results_or_fail(spawn_ranks(_run, WORLD, directory, SPAWN_TIMEOUT_S, with_world=False))


# ------------------------------------------------------------------------------- the tests
def _best(weight: torch.Tensor, rank: int) -> torch.Tensor:
    left, values, right = torch.linalg.svd(weight.double(), full_matrices=False)
    return ((left[:, :rank] * values[:rank]) @ right[:rank]).float()


@pytest.mark.parametrize("name", list(MATRICES))
@pytest.mark.parametrize("route", ["auto", "gram", "sketch"])
def test_factors_equal_truncated_svd(runs: list[dict[str, Any]], name: str, route: str) -> None:
    if name == "noise" and route == "sketch":
        pytest.skip(
            "a flat spectrum: the sketch's error (sigma_{l+1} / sigma_k)^(2q+1) is about 1 there, "
            "which is why auto takes the exact Gram route when it fits"
        )
    weight, rank = MATRICES[name]
    per_rank = [result[f"factor/{name}"][route] for result in runs]
    up = torch.cat([result["up"] for result in per_rank])  # the rows of each rank, in order
    down = per_rank[0]["down"]
    assert up.shape == (weight.shape[0], rank) and down.shape == (rank, weight.shape[1])
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    scale = float(weight.norm())
    torch.testing.assert_close(up @ down, _best(weight, rank), rtol=0, atol=2e-5 * scale)
    # WeLore's balanced form: sqrt(S) on each side, so both factors carry the same scale.
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4, atol=1e-6)
    expected = torch.linalg.svdvals(weight)
    got = per_rank[0]["values"]
    count = min(rank, got.numel())
    torch.testing.assert_close(got[:count], expected[:count], rtol=1e-4, atol=1e-5 * scale)
    for other in per_rank[1:]:  # down and the values are replicated: the same bits everywhere
        assert torch.equal(other["down"], down)
        assert torch.equal(other["values"], per_rank[0]["values"])
        assert other["strategy"] == per_rank[0]["strategy"]


def test_auto_routes_and_peaks(runs: list[dict[str, Any]]) -> None:
    """``auto`` takes the Gram for the narrow matrix and the sketch for the wide one, and every
    auto route's peak allocation (the sizes of the tensors it created) is below one full weight
    and within its public formula."""
    expected = {"narrow": "gram", "wide": "sketch", "noise": "gram"}
    for name, strategy in expected.items():
        weight, rank = MATRICES[name]
        rows, cols = weight.shape
        assert choose_factorization(rows, cols, rank, WORLD) == strategy
        weight_bytes = rows * cols * weight.element_size()
        formula = (gram_peak_bytes if strategy == "gram" else sketch_peak_bytes)(
            rows, cols, rank, WORLD
        )
        assert formula < weight_bytes
        for result in runs:
            auto = result[f"factor/{name}"]["auto"]
            assert auto["strategy"] == strategy
            assert 0 < auto["peak"] <= formula, (name, auto["peak"], formula)
    # The same formulas at the LLaMA-1B shapes, fp32 weights, rank 128: below one weight. (At
    # rank 512 the sketch's n x l blocks make it 1.2-2.2 fp32 weights: see the module docstring.)
    for rows, cols in ((2048, 2048), (5461, 2048), (2048, 5461)):
        strategy = choose_factorization(rows, cols, 128, WORLD)
        peak = (gram_peak_bytes if strategy == "gram" else sketch_peak_bytes)(
            rows, cols, 128, WORLD
        )
        assert peak < rows * cols * 4, (rows, cols, strategy, peak)
    # Bytes: the sketch of the wide matrix moves far less than its Gram would.
    assert sketch_factorize_bytes(480, 4, WORLD, rows=161) < gram_factorize_bytes(480)


def test_spectra_equal_svdvals_and_agree_across_ranks(runs: list[dict[str, Any]]) -> None:
    for name, (weight, _) in MATRICES.items():
        expected = torch.linalg.svdvals(weight)
        scale = float(expected[0])
        first = runs[0][f"spectrum/{name}"]
        for result in runs:
            spectrum = result[f"spectrum/{name}"]
            assert torch.equal(spectrum["values"], first["values"])  # identical bits
            for values in (spectrum["values"], *spectrum["forced"].values()):
                torch.testing.assert_close(values.float(), expected, rtol=0, atol=1e-5 * scale)
    # Routes and peaks where the full spectrum fits below one weight.
    for name, strategy in (("narrow", "gram"), ("very_wide", "panels")):
        weight, _ = MATRICES[name]
        rows, cols = weight.shape
        assert choose_spectrum(rows, cols, WORLD) == strategy
        for result in runs:
            spectrum = result[f"spectrum/{name}"]
            assert spectrum["strategy"] == strategy
            assert spectrum["peak"] < rows * cols * weight.element_size()
    assert runs[0]["spectrum/very_wide"]["peak"] <= panel_spectrum_peak_bytes(41, 400, WORLD)


def test_welore_plan_from_sharded_spectra_equals_single_process(
    runs: list[dict[str, Any]],
) -> None:
    spectra = {name: torch.linalg.svdvals(w) for name, (w, _) in MATRICES.items()}
    shapes = {name: tuple(w.shape) for name, (w, _) in MATRICES.items()}
    single = plan_ranks(spectra, shapes, 0.5, min_ratio=0.3).to_dict()
    for result in runs:
        assert {n: e["rank"] for n, e in result["plan"]["layers"].items()} == {
            n: e["rank"] for n, e in single["layers"].items()
        }
        assert result["plan"]["layers"] == single["layers"]
    assert runs[0]["plan"] == runs[1]["plan"]  # every rank chose the same threshold and ranks
    # the plan is not trivial: some layers are factorized and the ranks differ
    assert len({e["rank"] for e in single["layers"].values()}) > 1


def test_handoff_ranks_on_fsdp2_weights_equal_single_process(
    runs: list[dict[str, Any]],
) -> None:
    """``handoff.welore_ranks`` on ``fully_shard``-ed linears takes the sharded spectra and
    chooses what one process chooses on the same weights, on every rank."""
    single = welore_ranks(_candidates(sharded=False), [], 0.5)
    assert len(set(single.values())) > 1
    for result in runs:
        assert result["handoff_ranks"] == single


def test_zero_singular_values_are_safe(runs: list[dict[str, Any]]) -> None:
    """An exactly rank-2 weight asked for rank 4: the Gram route zeroes the directions with no
    energy instead of dividing by ``sqrt(0)``, and the factors still reproduce the weight."""
    weight, _ = MATRICES["rank_two"]
    for result in runs:
        gram = result["factor/rank_two"]["gram"]
        assert torch.isfinite(gram["up"]).all()
        assert torch.count_nonzero(gram["down"][2:]) == 0
        assert torch.count_nonzero(gram["up"][:, 2:]) == 0
