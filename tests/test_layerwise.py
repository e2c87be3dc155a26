"""Layer-wise updates: equality with the accumulated optimizer, freed grads, clipping, errors."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from helpers import TinyNet, make_batches, roundtrip, split_groups

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

STEPS, ACCUMULATION = 7, 4
# Gap 3: refreshes at steps 1, 4, 7 (full gradients), captured energy at 2 and 5 (full), and
# low-rank accumulation in the windows of steps 3 and 6.
PROJECTED = {"rank": 4, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"}


pytestmark = pytest.mark.usefixtures("one_thread")


def galore(model: torch.nn.Module) -> GaLoreAdamW:
    return GaLoreAdamW(split_groups(model, **PROJECTED), lr=2e-2, weight_decay=0.1)


def plain(model: torch.nn.Module) -> GaLoreAdamW:
    return GaLoreAdamW(model.parameters(), lr=2e-2, weight_decay=0.1)


def schedule(step: int) -> float:
    return 1.0 / (1.0 + step)


def train(
    make_optimizer: Callable[[torch.nn.Module], GaLoreAdamW],
    layerwise: bool,
    accumulation: int = ACCUMULATION,
    max_grad_norm: float | None = None,
    steps: int = STEPS,
    clip: str = "parameter",
) -> tuple[TinyNet, GaLoreAdamW, torch.optim.lr_scheduler.LRScheduler, list[dict[str, int]]]:
    """``steps`` optimizer steps of ``accumulation`` micro-batches each, with a schedule."""
    model = TinyNet()
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    wrapper = (
        LayerwiseOptimizer(
            optimizer,
            model,
            accumulation_steps=accumulation,
            max_grad_norm=max_grad_norm,
            clip=clip,
        )
        if layerwise
        else None
    )
    batches = make_batches(steps * accumulation, torch.float32)
    held = []
    previous: float | None = None  # the reference's global norm of the last step
    for step in range(steps):
        for micro in range(accumulation):
            inputs, targets = batches[step * accumulation + micro]
            loss = (model(inputs) - targets).square().mean() / accumulation
            loss.backward()
            if wrapper is not None:
                assert all(param.grad is None for param in model.parameters())
                held.append(wrapper.accumulator_numel())
        if wrapper is None:
            if max_grad_norm is not None and clip == "previous_global":
                grads = [param.grad for param in model.parameters()]
                norm = float(torch.nn.utils.get_total_norm(grads))
                if previous is not None:
                    coefficient = min(1.0, max_grad_norm / (previous + 1e-6))
                    torch._foreach_mul_(grads, coefficient)
                previous = norm
            elif max_grad_norm is not None:
                for param in model.parameters():
                    torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            wrapper.step()
        scheduler.step()
    return model, optimizer, scheduler, held


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    for (name, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


@pytest.mark.parametrize("make_optimizer", [galore, plain], ids=["projected", "plain"])
def test_layerwise_accumulation_matches_regular_accumulation(make_optimizer) -> None:
    reference, *_ = train(make_optimizer, layerwise=False)
    model, optimizer, _, held = train(make_optimizer, layerwise=True)
    assert_same_weights(reference, model)
    # The weights moved at all (a test that cannot fail on a no-op wrapper).
    assert not torch.allclose(reference.up.weight, TinyNet().up.weight)
    if make_optimizer is galore:
        # Windows of steps 3 and 6 held P^T G (rank 4) for both matrices, not m x n sums.
        low = {entry["low_rank"] for entry in held}
        assert 4 * 20 + 4 * 20 in low  # up: 20x12 -> 20x4; down: 6x20 -> 4x20
        assert any(entry["full"] == 20 + 20 + 20 + 6 for entry in held)  # vectors only
        refreshes = [
            int(optimizer.state[p]["refreshes"]) for p in model.parameters() if p.dim() == 2
        ]
        assert refreshes == [3, 3]  # crossed the refreshes of steps 4 and 7


def test_layerwise_without_accumulation_matches_step() -> None:
    reference, *_ = train(galore, layerwise=False, accumulation=1)
    model, _, _, held = train(galore, layerwise=True, accumulation=1)
    assert_same_weights(reference, model)
    assert all(entry == {"full": 0, "low_rank": 0} for entry in held)


@pytest.mark.parametrize(
    ("make_optimizer", "accumulation"),
    [(galore, 1), (plain, ACCUMULATION)],
    ids=["projected-k1", "plain-k4"],
)
def test_per_parameter_clipping_matches_clipping_each_gradient(make_optimizer, accumulation):
    unclipped, *_ = train(make_optimizer, layerwise=True, accumulation=accumulation)
    reference, *_ = train(make_optimizer, False, accumulation, max_grad_norm=0.05)
    model, *_ = train(make_optimizer, True, accumulation, max_grad_norm=0.05)
    assert_same_weights(reference, model)
    assert not torch.allclose(unclipped.down.weight, model.down.weight)


@pytest.mark.parametrize(
    ("make_optimizer", "accumulation"),
    [(plain, ACCUMULATION), (galore, 1)],
    ids=["plain", "galore"],
)
def test_previous_global_clip_matches_clipping_by_the_last_steps_norm(
    make_optimizer, accumulation
) -> None:
    """``clip="previous_global"``: every gradient of step t scaled by min(1, c / N_{t-1})."""
    reference, *_ = train(make_optimizer, False, accumulation, 0.05, clip="previous_global")
    model, *_ = train(make_optimizer, True, accumulation, 0.05, clip="previous_global")
    assert_same_weights(reference, model)
    per_parameter, *_ = train(make_optimizer, True, accumulation, 0.05)
    assert not torch.allclose(per_parameter.up.weight, model.up.weight)


def test_previous_global_norm_is_checkpointed() -> None:
    model = TinyNet()
    wrapper = LayerwiseOptimizer(plain(model), model, max_grad_norm=1.0, clip="previous_global")
    inputs, targets = make_batches(1, torch.float32)[0]
    (model(inputs) - targets).square().mean().backward()
    assert wrapper.previous_norm is not None and wrapper.previous_norm > 0
    other = TinyNet()
    resumed = LayerwiseOptimizer(plain(other), other, max_grad_norm=1.0, clip="previous_global")
    resumed.load_state_dict(roundtrip(wrapper.state_dict()))
    assert resumed.previous_norm == wrapper.previous_norm
    with pytest.raises(ValueError, match=r"Invalid clip: 'global'; allowed: parameter"):
        LayerwiseOptimizer(plain(other), other, clip="global")


def test_low_rank_gradients_are_clipped_by_their_own_norm() -> None:
    # Only steps 3 and 6 see low-rank sums; a tiny bound must change the result there too.
    unclipped, *_ = train(galore, layerwise=True, steps=3)
    clipped, *_ = train(galore, layerwise=True, steps=3, max_grad_norm=1e-4)
    huge, *_ = train(galore, layerwise=True, steps=3, max_grad_norm=1e6)
    assert_same_weights(unclipped, huge)
    assert not torch.allclose(unclipped.up.weight, clipped.up.weight)


def test_one_scheduler_step_per_optimizer_step() -> None:
    with warnings.catch_warnings():
        # torch warns when a scheduler steps before its optimizer: it must not here.
        warnings.simplefilter("error")
        _, optimizer, scheduler, _ = train(galore, layerwise=True)
    assert scheduler.last_epoch == STEPS
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-2 * schedule(STEPS))
    assert {int(state["step"]) for state in optimizer.state.values()} == {STEPS}


def test_state_dict_round_trip_inside_a_window_is_bit_for_bit() -> None:
    def resumable() -> tuple[TinyNet, LayerwiseOptimizer]:
        model = TinyNet()
        wrapper = LayerwiseOptimizer(galore(model), model, accumulation_steps=ACCUMULATION)
        return model, wrapper

    def backward(model: TinyNet, index: int) -> None:
        inputs, targets = batches[index]
        ((model(inputs) - targets).square().mean() / ACCUMULATION).backward()

    batches = make_batches(5 * ACCUMULATION, torch.float32)
    split = 2 * ACCUMULATION + 2  # two backward passes into the window of step 3 (low-rank)
    model, wrapper = resumable()
    for index in range(split):
        backward(model, index)
    saved = roundtrip({"model": model.state_dict(), "optimizer": wrapper.state_dict()})
    assert saved["optimizer"]["layerwise"]["low_rank"]
    resumed_model, resumed = resumable()
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.micro_step == 2 and resumed.optimizer_steps == 2
    for index in range(split, len(batches)):
        backward(model, index)
        backward(resumed_model, index)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.optimizer_steps == 5


# ------------------------------------------------------------------------------ hand-offs
VOCAB = 64


def tiny_llama() -> torch.nn.Module:
    config = tiny_llama_config(VOCAB, hidden=32, layers=1, heads=4, intermediate=64)
    return build_llama(config, seed=0)


def welore(model: torch.nn.Module) -> WeLoreAdamW:
    groups = lowrank_param_groups(
        model, "attn-mlp", ProjectionConfig(rank=4, update_proj_gap=2, scale=1.0)
    )
    return WeLoreAdamW(
        groups,
        lr=3e-3,
        model=model,
        stability=StabilityConfig(policy="fixed", threshold=0.01, patience=1),
        handoff=HandoffConfig(start_step=4, target_reduction=0.7, min_ratio=0.4, check_every=2),
    )


def test_layerwise_handoff_matches_regular_handoff() -> None:
    generator = torch.Generator().manual_seed(3)
    data = [torch.randint(0, VOCAB, (2, 8), generator=generator) for _ in range(16)]

    def run(layerwise: bool) -> tuple[torch.nn.Module, WeLoreAdamW]:
        model = tiny_llama()
        optimizer = welore(model)
        wrapper = LayerwiseOptimizer(optimizer, model, accumulation_steps=2) if layerwise else None
        for index, ids in enumerate(data):
            (model(input_ids=ids, labels=ids).loss / 2).backward()
            if index % 2 == 0:
                continue
            if wrapper is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                model = optimizer.maybe_handoff(model)
            else:
                model = wrapper.maybe_handoff(model)
        return model, optimizer

    reference, reference_optimizer = run(layerwise=False)
    model, optimizer = run(layerwise=True)
    assert reference_optimizer.handoff_report(), "no hand-off: the test would not exercise it"
    assert [r["layer"] for r in optimizer.handoff_report()] == [
        r["layer"] for r in reference_optimizer.handoff_report()
    ]
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert_same_weights(reference, model)


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4"])
def test_invalid_accumulation_steps(value) -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match=r"Invalid accumulation_steps: .*integer >= 1"):
        LayerwiseOptimizer(galore(model), model, accumulation_steps=value)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, "1"])
def test_invalid_max_grad_norm(value) -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match=r"Invalid max_grad_norm: .*positive finite"):
        LayerwiseOptimizer(galore(model), model, max_grad_norm=value)


def test_unsupported_combinations_are_refused(tmp_path) -> None:
    model = TinyNet()
    with pytest.raises(TypeError, match=r"Invalid optimizer: AdamW; layer-wise updates need"):
        LayerwiseOptimizer(torch.optim.AdamW(model.parameters()), model)
    wrapper = LayerwiseOptimizer(galore(model), model, accumulation_steps=2)
    with pytest.raises(ValueError, match="closure"):
        wrapper.step(lambda: 0.0)
    with pytest.raises(TypeError, match="maybe_handoff needs a WeLoreAdamW"):
        wrapper.maybe_handoff(model)
    inputs, targets = make_batches(1, torch.float32)[0]
    (model(inputs) - targets).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"after 1 of 2 backward passes"):
        wrapper.step()
    wrapper.remove_hooks()

    # One rank: DDP is accepted (the 2-rank runs are test_layerwise_ddp.py's).
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        LayerwiseOptimizer(galore(ddp.module), ddp).remove_hooks()
    finally:
        dist.destroy_process_group()


def test_parameter_added_after_wrapping_is_reported() -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(list(model.up.parameters()), lr=1e-2)
    wrapper = LayerwiseOptimizer(optimizer, model)
    optimizer.add_param_group({"params": list(model.down.parameters())})
    inputs, targets = make_batches(1, torch.float32)[0]
    with pytest.raises(RuntimeError, match=r"params\[0\] has a gradient but no layer-wise hook"):
        (model(inputs) - targets).square().mean().backward()
    wrapper.remove_hooks()


# ----------------------------------------------------------------------- quantized variants
def quantized_run(variant: str, layerwise: bool) -> tuple[torch.nn.Module, list[float]]:
    from lowrank_optim import GaLoreAdamW8bit, QGaLoreAdamW
    from lowrank_optim.quant import quantize_model

    model = tiny_llama()
    if variant == "qgalore":
        quantize_model(model, include=lambda name: "layers" in name, group_size=16)
    groups = lowrank_param_groups(model, "attn-mlp", ProjectionConfig(rank=4, update_proj_gap=3))
    optimizer = (
        QGaLoreAdamW(groups, lr=1e-2, model=model, seed=7)
        if variant == "qgalore"
        else GaLoreAdamW8bit(groups, lr=1e-2)
    )
    optimizer.moment_storage.min_numel = 1  # quantize even these tiny moments: the 8-bit path
    wrapper = LayerwiseOptimizer(optimizer, model, accumulation_steps=2) if layerwise else None
    generator = torch.Generator().manual_seed(5)
    losses = []
    for index in range(12):
        ids = torch.randint(0, VOCAB, (2, 8), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss / 2
        loss.backward()
        losses.append(float(loss.detach()))
        if wrapper is not None:
            assert all(p.grad is None for p in model.parameters())
        elif index % 2 == 1:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return model, losses


def test_8bit_moments_step_layerwise_like_regular() -> None:
    reference, _ = quantized_run("8bit", layerwise=False)
    model, _ = quantized_run("8bit", layerwise=True)
    assert_same_weights(reference, model)


def test_qgalore_int8_weights_train_layerwise() -> None:
    # Stochastic rounding draws in step order, which layer-wise updates change (backward order),
    # so the runs are not equal draw for draw; both must train the INT8 codes.
    initial = tiny_llama()
    model, losses = quantized_run("qgalore", layerwise=True)
    _, reference_losses = quantized_run("qgalore", layerwise=False)
    codes = [b for name, b in model.named_buffers() if name.endswith("weight_codes")]
    assert codes and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])
    assert abs(sum(losses[-4:]) - sum(reference_losses[-4:])) < 0.05 * sum(reference_losses[-4:])
    assert not torch.equal(
        model.model.layers[0].mlp.up_proj.dequantized_weight(torch.float32),
        initial.model.layers[0].mlp.up_proj.weight,
    )
