"""WeLoreAdamW: hand-offs inside a training loop, moment carry, checkpoints, DDP."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import joined, roundtrip

from lowrank_optim import HandoffConfig, ProjectionConfig, StabilityConfig, WeLoreAdamW
from lowrank_optim.factorize import LowRankLinear
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.handoff import factor_moments
from lowrank_optim.train.models import build_llama, tiny_llama_config

VOCAB = 96
# Stable after one refresh of any overlap, hand-offs from step 6: exercises the mechanics fast.
EAGER_STABILITY = StabilityConfig(policy="fixed", threshold=0.01, patience=1)
EAGER_HANDOFF = HandoffConfig(start_step=6, target_reduction=0.7, min_ratio=0.4, check_every=3)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    return build_llama(
        tiny_llama_config(VOCAB, hidden=48, layers=2, heads=4, intermediate=96), seed=seed
    )


def make_optimizer(model: torch.nn.Module, **overrides) -> WeLoreAdamW:
    options = {"stability": EAGER_STABILITY, "handoff": EAGER_HANDOFF, **overrides}
    groups = lowrank_param_groups(
        model, "attn-mlp", ProjectionConfig(rank=8, update_proj_gap=2, scale=1.0)
    )
    return WeLoreAdamW(groups, lr=3e-3, weight_decay=0.01, model=model, **options)


def batches(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 16), generator=generator) for _ in range(count)]


def train(model, optimizer, data, losses=None):
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model = optimizer.maybe_handoff(model)
        if losses is not None:
            losses.append(float(loss.detach()))
    return model


def test_handoff_factorizes_layers_and_keeps_training() -> None:
    model = tiny_model()
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = batches(1)[0]
    losses: list[float] = []
    dense_params = sum(p.numel() for p in model.parameters())
    for _ in range(30):
        model = train(model, optimizer, [batch], losses)
        scheduler.step()
    report = optimizer.handoff_report()
    assert report and all(r["step"] >= 6 and r["params_after"] < r["params_before"] for r in report)
    factored = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(factored) == len(report)
    assert sum(p.numel() for p in model.parameters()) < dense_params
    # the factors are trained: they moved since the hand-off, and their state is plain AdamW
    layer = factored[0]
    assert optimizer.state[layer.up]["step"] > 0
    assert layer.up.grad is None and all(
        layer.up is not p for p in optimizer.param_groups[1]["params"]
    )
    first_handoff = report[0]["step"]
    assert sum(losses[-5:]) / 5 < sum(losses[first_handoff - 5 : first_handoff]) / 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_no_handoff_before_start_or_without_stability() -> None:
    model = tiny_model()
    strict = StabilityConfig(policy="fixed", threshold=1.0, patience=50)
    optimizer = make_optimizer(model, stability=strict)
    train(model, optimizer, batches(12))
    assert optimizer.handoff_report() == []
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_maybe_handoff_needs_a_model() -> None:
    model = tiny_model()
    groups = lowrank_param_groups(model, "attn-mlp", ProjectionConfig(rank=4))
    optimizer = WeLoreAdamW(groups, lr=1e-3)
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # a drop-in GaLore optimizer without one
    with pytest.raises(ValueError, match="needs the model"):
        optimizer.maybe_handoff()


def test_first_moment_carry_is_exact() -> None:
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64)).Q  # left basis, m = 20
    exp_avg = torch.randn(4, 30, dtype=torch.float64)
    exp_avg_sq = torch.rand(4, 30, dtype=torch.float64)
    up, down = torch.randn(20, 5, dtype=torch.float64), torch.randn(5, 30, dtype=torch.float64)
    (m_up, v_up), (m_down, v_down) = factor_moments(
        exp_avg, exp_avg_sq, {"basis_left": basis}, up, down
    )
    full = basis @ exp_avg
    torch.testing.assert_close(m_up, full @ down.T)
    torch.testing.assert_close(m_down, up.T @ full)
    assert bool((v_up >= 0).all()) and bool((v_down >= 0).all())


def test_factors_inherit_the_step_count() -> None:
    model = tiny_model()
    optimizer = make_optimizer(model)
    model = train(model, optimizer, batches(7))
    record = optimizer.handoff_report()[0]
    factored = model.get_submodule(record["layer"])
    assert float(optimizer.state[factored.up]["step"]) == 7.0


@pytest.mark.parametrize("split_at", [8, 13])  # after the first hand-off; between checks
def test_resume_after_handoffs_is_bit_for_bit(split_at: int) -> None:
    data = batches(20)
    model = tiny_model()
    optimizer = make_optimizer(model)
    model = train(model, optimizer, data)
    assert optimizer.handoff_report()

    first = tiny_model()
    first_optimizer = make_optimizer(first)
    first = train(first, first_optimizer, data[:split_at])
    assert first_optimizer.handoff_report()
    saved_model = roundtrip(first.state_dict())
    saved_optimizer = roundtrip(first_optimizer.state_dict())

    resumed = tiny_model(seed=99)
    resumed_optimizer = make_optimizer(resumed)
    resumed_optimizer.load_state_dict(saved_optimizer)  # re-applies the recorded hand-offs
    resumed.load_state_dict(saved_model)
    resumed = train(resumed, resumed_optimizer, data[split_at:])
    assert resumed_optimizer.handoff_report() == optimizer.handoff_report()
    expected = dict(model.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_loading_handoffs_without_a_model_is_refused() -> None:
    model = tiny_model()
    optimizer = make_optimizer(model)
    train(model, optimizer, batches(10))
    saved = roundtrip(optimizer.state_dict())
    fresh = tiny_model()
    groups = lowrank_param_groups(
        fresh, "attn-mlp", ProjectionConfig(rank=8, update_proj_gap=2, scale=1.0)
    )
    orphan = WeLoreAdamW(groups, lr=3e-3, weight_decay=0.01)
    with pytest.raises(ValueError, match="hand-off"):
        orphan.load_state_dict(saved)


def _ddp_worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = make_optimizer(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    data = batches(16, seed=10 + rank)  # each rank its own data: only DDP keeps them in sync
    for ids in data:
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ddp = optimizer.maybe_handoff(ddp)
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    results[rank] = {
        "handoffs": [r["layer"] for r in optimizer.handoff_report()],
        "state": {k: v.clone() for k, v in ddp.module.state_dict().items()},
    }
    dist.destroy_process_group()


def test_ddp_ranks_hold_identical_factors_after_handoff(tmp_path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        results = manager.dict()
        context = mp.spawn(
            _ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=False
        )
        while not joined(context, lambda rank: rank in results):
            pass
        results = copy.deepcopy(dict(results))
    assert results[0]["handoffs"] and results[0]["handoffs"] == results[1]["handoffs"]
    for name, tensor in results[0]["state"].items():
        assert torch.equal(tensor, results[1]["state"][name]), name
    assert any(name.endswith(".up") for name in results[0]["state"])
