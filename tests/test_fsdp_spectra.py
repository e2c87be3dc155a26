"""Owner-computed WeLore spectra (``lowrank_optim.distributed.spectra``) on 2 gloo CPU ranks.

One spawn (a module fixture) takes the spectra of several row-sharded matrices (tall and wide,
uneven shards, exact zeros) with :func:`owner_spectra`, counting its collectives, then the
factors of some of them from the same decomposition (:func:`shared_factors`) and, for
comparison, by the every-rank Gram route. The tests compare the spectra with one process's
``torch.linalg.svdvals`` and across ranks (bit for bit), the counted bytes with
:func:`owner_spectra_bytes` / :func:`shared_factors_bytes` and with gathering the weights, the
peaks with their formulas, and the factors with the truncated SVD and the old route.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import results_or_fail, run_gloo_scenario, spawn_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lowrank_optim.distributed import CollectiveCounter
from lowrank_optim.distributed.factorize import factorize_sharded, weight_gather_bytes
from lowrank_optim.distributed.spectra import (
    assign_owners,
    owner_spectra,
    owner_spectra_bytes,
    owner_spectra_peak_bytes,
    shared_factors,
    shared_factors_bytes,
    shared_factors_peak_bytes,
    spectrum_side,
)

WORLD = 2
TIMEOUT_S = 120
SPAWN_TIMEOUT_S = 300


def _decaying(rows: int, cols: int, seed: int, ratio: float = 0.7, rank: int | None = None):
    """``U diag(s) V^T`` with ``s_j = 3 ratio^j`` (exact zeros past ``rank``), fp32."""
    generator = torch.Generator().manual_seed(seed)
    full = min(rows, cols)
    left = torch.linalg.qr(torch.randn(rows, full, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(cols, full, generator=generator, dtype=torch.float64)).Q
    values = ratio ** torch.arange(full, dtype=torch.float64) * 3.0
    if rank is not None:
        values[rank:] = 0.0
    return ((left * values) @ right.T).float()


# name: (weight, vectors kept, rank of the factors; 0: spectrum only)
MATRICES: dict[str, tuple[torch.Tensor, int, int]] = {
    "tall": (_decaying(203, 40, 1, ratio=0.9), 12, 7),  # 102 + 101 rows: right
    "wide": (_decaying(41, 400, 2, ratio=0.8), 10, 5),  # 21 + 20 rows: left
    "square": (_decaying(64, 64, 3, ratio=0.85), 0, 0),  # spectrum only
    "rank_two": (_decaying(50, 8, 4, rank=2), 4, 4),  # exact zeros beyond rank 2
    "noise": (torch.randn(30, 90, generator=torch.Generator().manual_seed(5)), 6, 6),  # left
    "tiny_wide": (_decaying(3, 20, 6), 2, 2),  # 2 + 1 rows
}
SHAPES = [tuple(w.shape) for w, _, _ in MATRICES.values()]
KEEP = {name: keep for name, (_, keep, _) in MATRICES.items()}


# ------------------------------------------------------------------------------ the worker
def _scenario(me: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (WORLD,))
    sharded = {name: distribute_tensor(w, mesh, [Shard(0)]) for name, (w, _, _) in MATRICES.items()}
    with CollectiveCounter() as counter:
        spectra = owner_spectra(sharded, keep=KEEP)
    out: dict[str, Any] = {
        "values": spectra.values,
        "owners": spectra.owners,
        "kept_here": {n: tuple(v.shape) for n, v in spectra.vectors.items()},
        "bytes": dict(counter.bytes),
        "calls": dict(counter.calls),
        "peak": spectra.peak_bytes,
        "factors": {},
    }
    for name, (_, _, rank) in MATRICES.items():
        if not rank:
            continue
        with CollectiveCounter() as counter:
            shared = shared_factors(spectra, name, sharded[name], rank)
        old = factorize_sharded(sharded[name], rank, strategy="gram")
        out["factors"][name] = {
            "up": shared.up,
            "down": shared.down,
            "strategy": shared.strategy,
            "bytes": dict(counter.bytes),
            "peak": shared.peak_bytes,
            "old_up": old.up,
            "old_down": old.down,
        }
    out["released"] = sorted(spectra.vectors)  # every kept vector was used, and released
    try:
        shared_factors(spectra, "square", sharded["square"], 1)
    except ValueError as error:
        out["refused"] = str(error)
    return out


def _run(rank: int, port: int, directory: str) -> None:
    run_gloo_scenario(rank, WORLD, port, directory, _scenario, TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("fsdp_spectra")
    return results_or_fail(spawn_ranks(_run, WORLD, directory, SPAWN_TIMEOUT_S, with_world=False))


# ------------------------------------------------------------------------------- the tests
def test_owners_balanced_and_deterministic() -> None:
    owners = assign_owners(SHAPES, WORLD)
    assert owners == assign_owners(SHAPES, WORLD)
    assert set(owners) == {0, 1}  # both ranks own matrices
    # LLaMA-1B: 24 layers of 4 square, 2 tall and 1 wide matrices, all d = 2048: each of R ranks
    # owns the same number of eigensolves and of each shape.
    layer = [(2048, 2048)] * 4 + [(5461, 2048)] * 2 + [(2048, 5461)]
    for world in (2, 4, 8):
        owners = assign_owners(layer * 24, world)
        counts = [owners.count(r) for r in range(world)]
        assert max(counts) - min(counts) <= 1, (world, counts)


def test_spectra_equal_svdvals_and_are_identical_on_every_rank(runs: list[dict]) -> None:
    for name, (weight, _, _) in MATRICES.items():
        expected = torch.linalg.svdvals(weight.double())
        scale = float(expected[0])
        got = runs[0]["values"][name]
        assert got.dtype == torch.float64 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7 * scale)
        for other in runs[1:]:
            assert torch.equal(other["values"][name], got), name  # the same bits
    assert runs[0]["owners"] == runs[1]["owners"]


def test_counted_bytes_equal_the_formula_and_beat_gathering(runs: list[dict]) -> None:
    want = owner_spectra_bytes(SHAPES, WORLD)
    gather_payload = sum(weight_gather_bytes(m, n, WORLD) for m, n in SHAPES)
    gather_wire = (WORLD - 1) / WORLD * gather_payload
    for me, result in enumerate(runs):
        assert result["bytes"] == {
            "gather": want[me]["gather"],
            "all_gather_single": want[me]["all_gather_single"],
        }, me
        assert result["calls"]["all_gather_single"] == 1  # one small all-gather of the values
        assert "all_reduce" not in result["calls"]
        # what this rank hands to the collectives, and what it sends / receives, both below
        # gathering the weights (payload, and wire per rank)
        assert want[me]["gather"] + want[me]["all_gather_single"] < gather_payload
        assert want[me]["wire"] < gather_wire, (want[me], gather_wire)


def test_peak_within_formula(runs: list[dict]) -> None:
    keep = [KEEP[name] for name in MATRICES]
    bound = owner_spectra_peak_bytes(SHAPES, WORLD, keep)
    for me, result in enumerate(runs):
        assert 0 < result["peak"] <= bound[me], (me, result["peak"], bound[me])
    # the owner alone keeps each matrix's vectors
    for name, (weight, keep, _) in MATRICES.items():
        owner = runs[0]["owners"][name]
        for me, result in enumerate(runs):
            if keep and me == owner:
                assert result["kept_here"][name] == (min(weight.shape), keep)
            else:
                assert name not in result["kept_here"]


def _best(weight: torch.Tensor, rank: int) -> torch.Tensor:
    left, values, right = torch.linalg.svd(weight.double(), full_matrices=False)
    return ((left[:, :rank] * values[:rank]) @ right[:rank]).float()


@pytest.mark.parametrize("name", [n for n, (_, _, k) in MATRICES.items() if k])
def test_shared_factors_equal_truncated_svd_and_old_route(runs: list[dict], name: str) -> None:
    weight, _, rank = MATRICES[name]
    per_rank = [result["factors"][name] for result in runs]
    up = torch.cat([f["up"] for f in per_rank])
    down = per_rank[0]["down"]
    assert per_rank[0]["strategy"] == "shared"
    assert up.shape == (weight.shape[0], rank) and down.shape == (rank, weight.shape[1])
    scale = float(weight.norm())
    torch.testing.assert_close(up @ down, _best(weight, rank), rtol=0, atol=2e-5 * scale)
    old = torch.cat([f["old_up"] for f in per_rank]) @ per_rank[0]["old_down"]
    torch.testing.assert_close(up @ down, old, rtol=0, atol=1e-5 * scale)
    # WeLore's balanced form on the directions with energy
    energy = torch.linalg.svdvals(weight.double())[:rank] > 1e-6 * scale
    torch.testing.assert_close(
        up.norm(dim=0)[energy], down.norm(dim=1)[energy], rtol=1e-4, atol=1e-6
    )
    for other in per_rank[1:]:
        assert torch.equal(other["down"], down)  # replicated: the same bits on every rank
    rows, cols = weight.shape
    want = shared_factors_bytes(rows, cols, rank)
    bound = shared_factors_peak_bytes(rows, cols, rank, WORLD)
    for f in per_rank:
        assert 0 < f["peak"] <= bound, (f["peak"], bound)
        got = f["bytes"]
        assert got.get("broadcast", 0) == want["broadcast"]
        assert got.get("all_reduce", 0) == want["all_reduce"]
        assert ("all_reduce" in got) == (spectrum_side(rows, cols) == "left")


def test_zero_directions_and_release(runs: list[dict]) -> None:
    for result in runs:
        factors = result["factors"]["rank_two"]
        assert torch.count_nonzero(factors["down"][2:]) == 0
        assert torch.count_nonzero(factors["up"][:, 2:]) == 0
        assert result["released"] == []
        assert "kept 0 vectors" in result["refused"]
