"""Subspace-stability metrics, the stability criterion, adaptive gaps, reports and plots."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import roundtrip

from lowrank_optim import GaLoreAdamW, StabilityConfig
from lowrank_optim.cli.plots import plot_stability
from lowrank_optim.reporting import MetricsWriter, module_type
from lowrank_optim.stability import leading_vector_similarity, subspace_overlap

ROWS, COLS, RANK = 48, 64, 4  # std projects the left side (48 < 64): overlap ~ r/48 if random


def run(grads: list[torch.Tensor], stability: StabilityConfig, gap: int = 2, **group):
    weight = torch.nn.Parameter(torch.zeros(ROWS, COLS))
    optimizer = GaLoreAdamW(
        [
            {
                "params": [("model.layers.0.mlp.down_proj.weight", weight)],
                "rank": RANK,
                "update_proj_gap": gap,
                **group,
            }
        ],
        lr=1e-3,
        stability=stability,
    )
    gaps = []
    for grad in grads:
        weight.grad = grad
        optimizer.step()
        gaps.append(optimizer.state[weight]["refresh_gap"])
    return optimizer, weight, gaps


def fixed_subspace_grads(count: int, noise: float = 0.01, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(ROWS, RANK, generator=generator)).Q
    scales = torch.tensor([4.0, 3.0, 2.0, 1.5])
    return [
        basis @ (scales[:, None] * torch.randn(RANK, COLS, generator=generator))
        + noise * torch.randn(ROWS, COLS, generator=generator)
        for _ in range(count)
    ]


def random_grads(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(ROWS, COLS, generator=generator) for _ in range(count)]


def test_overlap_is_sign_and_rotation_invariant() -> None:
    basis = torch.linalg.qr(torch.randn(30, 5)).Q
    other = torch.linalg.qr(torch.randn(30, 5)).Q
    reference = subspace_overlap(basis, other)
    flipped = basis * torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0])
    rotated = basis @ torch.linalg.qr(torch.randn(5, 5)).Q
    assert subspace_overlap(flipped, other) == pytest.approx(reference, abs=1e-6)
    assert subspace_overlap(rotated, other) == pytest.approx(reference, abs=1e-6)
    assert subspace_overlap(basis, rotated) == pytest.approx(1.0, abs=1e-6)
    assert leading_vector_similarity(basis, -basis) == pytest.approx(1.0)


def test_fixed_subspace_becomes_stable_within_patience_refreshes() -> None:
    config = StabilityConfig(policy="fixed", threshold=0.9, patience=3)
    optimizer, weight, _ = run(fixed_subspace_grads(12), config, gap=2)
    (row,) = optimizer.subspace_report()
    assert row.last_overlap > 0.99
    assert row.energy_captured > 0.99
    assert row.stable
    # refreshes at steps 1, 3, 5, 7: overlaps exist from step 3 on, so 3 of them by step 7
    assert row.stable_since == 7
    assert row.name == "model.layers.0.mlp.down_proj.weight" and row.module_type == "down"


def test_random_gradients_stay_near_r_over_n_and_never_stable() -> None:
    config = StabilityConfig(policy="overlap", threshold=0.5, patience=2)
    optimizer, weight, gaps = run(random_grads(40), config, gap=2)
    history = optimizer.state[weight]["overlap_history"]
    assert len(history) == 16 and all(isinstance(v, float) for v in history)  # 19, the last 16
    assert sum(history) / len(history) < 3 * RANK / ROWS
    assert not optimizer.subspace_report()[0].stable
    assert set(gaps) == {2}


def test_gap_grows_to_cap_then_resets_when_subspace_moves() -> None:
    config = StabilityConfig(policy="overlap", threshold=0.9, patience=2, growth=2.0, max_gap=8)
    grads = fixed_subspace_grads(30) + random_grads(30)
    optimizer, weight, gaps = run(grads, config, gap=2)
    # refreshes at 1, 3 (overlap 1: streak 1), 5 (streak 2: stable, gap 4), 9 (gap 8),
    # 17 (capped at 8), 25; the random gradients from step 31 on pull it back to the base gap
    assert gaps[:6] == [2, 2, 2, 2, 4, 4]
    assert max(gaps) == 8
    assert gaps[-1] == 2
    state = optimizer.state[weight]
    assert state["refreshes_skipped"] > 0
    assert state["refreshes"] + state["refreshes_skipped"] <= 60 // 2 + 1


def test_qgalore_policy_doubles_after_its_window() -> None:
    config = StabilityConfig(policy="qgalore", qgalore_window=3, qgalore_threshold=0.4)
    _, _, gaps = run(fixed_subspace_grads(40), config, gap=2)
    # refreshes at 1, 3, 5: similarities exist from the 2nd, a full window at the 4th (step 7)
    assert gaps[6] == 4 and max(gaps) >= 8
    _, _, random_gaps = run(random_grads(40), config, gap=2)
    assert set(random_gaps) == {2}


def test_metrics_survive_a_state_dict_round_trip() -> None:
    config = StabilityConfig(policy="overlap", threshold=0.9, patience=2)
    optimizer, weight, _ = run(fixed_subspace_grads(10), config, gap=2)
    saved = roundtrip(optimizer.state_dict())
    fresh = GaLoreAdamW(
        [
            {
                "params": [("model.layers.0.mlp.down_proj.weight", weight)],
                "rank": RANK,
                "update_proj_gap": 2,
            }
        ],
        lr=1e-3,
        stability=config,
    )
    fresh.load_state_dict(saved)
    assert fresh.subspace_report() == optimizer.subspace_report()


def test_metrics_log_and_plot(tmp_path) -> None:
    config = StabilityConfig(policy="overlap", threshold=0.9, patience=2)
    optimizer, weight, _ = run(fixed_subspace_grads(6), config, gap=2)
    log = tmp_path / "run.jsonl"
    with MetricsWriter(log) as writer:
        writer.log_subspace(optimizer, step=6)
        writer.log_subspace(optimizer, step=7)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 2 and records[0]["kind"] == "subspace"
    assert records[0]["name"] == "model.layers.0.mlp.down_proj.weight"
    image = plot_stability(log, tmp_path / "stability.png")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_a_log_without_subspace_records(tmp_path) -> None:
    log = tmp_path / "empty.jsonl"
    log.write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(ValueError, match="no 'subspace' records"):
        plot_stability(log, tmp_path / "x.png")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.3.self_attn.q_proj.weight", "q"),
        ("model.layers.0.self_attn.o_proj.weight", "o"),
        ("model.layers.1.mlp.gate_proj.weight", "gate"),
        ("model.layers.1.mlp.up_proj", "up"),
        ("lm_head.weight", "other"),
    ],
)
def test_module_type_from_name(name: str, kind: str) -> None:
    assert module_type(name) == kind


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "sometimes"}, "policy: 'sometimes'"),
        ({"threshold": 0.0}, "threshold: 0.0"),
        ({"threshold": 1.5}, "threshold: 1.5"),
        ({"patience": 0}, "patience: 0"),
        ({"growth": 0.5}, "growth: 0.5"),
        ({"max_gap": -1}, "max_gap: -1"),
    ],
)
def test_bad_stability_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StabilityConfig(**kwargs)
