"""The hand-off's policy: the factors' learning rate, the one-shot trigger, the re-warm-up ramp."""

from __future__ import annotations

import copy

import pytest
import torch
from test_welore import EAGER_HANDOFF, batches, make_optimizer, tiny_model, train

from lowrank_optim import HandoffConfig
from lowrank_optim.factorize import LowRankLinear
from lowrank_optim.handoff import FACTORS_OF, LR_SCALE

__all__: list[str] = []

pytestmark = pytest.mark.usefixtures("one_thread")


def _factor_groups(optimizer) -> list[dict]:
    return [group for group in optimizer.param_groups if FACTORS_OF in group]


@pytest.mark.parametrize("scale", [0.25, 1.0])
def test_factor_groups_default_to_lr_times_scale(scale: float) -> None:
    """GaLore's recipe moves a weight by lr * scale: the factors keep that step size."""
    from lowrank_optim import ProjectionConfig, WeLoreAdamW
    from lowrank_optim.factory import lowrank_param_groups

    model = tiny_model()
    groups = lowrank_param_groups(
        model, "attn-mlp", ProjectionConfig(rank=8, update_proj_gap=2, scale=scale)
    )
    optimizer = WeLoreAdamW(groups, lr=1e-2, model=model)
    (factor_group,) = _factor_groups(optimizer)
    assert factor_group["lr"] * factor_group[LR_SCALE] == pytest.approx(1e-2 * scale)
    # a scheduler built afterwards scales the factor group from that base
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert factor_group["lr"] * factor_group[LR_SCALE] == pytest.approx(0.5 * 1e-2 * scale)


def test_factor_lr_scale_overrides_the_projection_scale() -> None:
    handoff = HandoffConfig(start_step=6, check_every=3, factor_lr_scale=1.0)
    optimizer = make_optimizer(tiny_model(), handoff=handoff)
    (factor_group,) = _factor_groups(optimizer)
    assert factor_group["lr"] * factor_group[LR_SCALE] == pytest.approx(3e-3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("trigger", "sometimes"),
        ("factor_lr_scale", 0.0),
        ("factor_lr_scale", float("nan")),
        ("factor_lr_scale", "0.25"),
        ("rewarmup_steps", -1),
        ("rewarmup_steps", 2.5),
    ],
)
def test_handoff_config_rejects_bad_policy_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        HandoffConfig(**{field: value})


def test_step_trigger_hands_everything_off_at_one_step_without_stability() -> None:
    """The one-shot baseline: no stability signal (the threshold is never met), one step."""
    from lowrank_optim import StabilityConfig

    never_stable = StabilityConfig(policy="fixed", threshold=1.0, patience=50)
    handoff = HandoffConfig(
        start_step=7, target_reduction=0.7, min_ratio=0.4, check_every=3, trigger="step"
    )
    model = tiny_model()
    optimizer = make_optimizer(model, stability=never_stable, handoff=handoff)
    model = train(model, optimizer, batches(20))
    steps = {record["step"] for record in optimizer.handoff_report()}
    assert steps == {9}  # the first check step at or after start_step
    stable_only = make_optimizer(tiny_model(), stability=never_stable, handoff=EAGER_HANDOFF)
    train(tiny_model(), stable_only, batches(20))
    assert stable_only.handoff_report() == []


def _factor_update(rewarmup: int, steps_after: int) -> float:
    """Size of the factors' last update, ``steps_after`` steps after their hand-off."""
    handoff = HandoffConfig(
        start_step=6,
        target_reduction=0.7,
        min_ratio=0.4,
        check_every=3,
        trigger="step",
        rewarmup_steps=rewarmup,
    )
    model = tiny_model()
    optimizer = make_optimizer(model, handoff=handoff)
    data = batches(6 + steps_after)
    model = train(model, optimizer, data[:6])
    factor = next(m for m in model.modules() if isinstance(m, LowRankLinear)).up
    model = train(model, optimizer, data[6:-1])
    before = factor.detach().clone()
    train(model, optimizer, data[-1:])
    return float((factor.detach() - before).norm())


def test_rewarmup_ramps_the_factor_lr_then_matches_no_ramp() -> None:
    # First step after the hand-off: lr / (ramp + 1) of the no-ramp step (Adam's step is
    # proportional to lr at a given state, and both runs share the state up to that step).
    assert _factor_update(3, 1) == pytest.approx(_factor_update(0, 1) / 4, rel=1e-4)
    # Past the ramp, the update is taken at the full lr again (the states differ by then, so
    # only the ratio to the ramped one is checked).
    assert _factor_update(3, 6) > 2 * _factor_update(3, 1)


def test_rewarmup_survives_a_checkpoint() -> None:
    handoff = HandoffConfig(
        start_step=6, target_reduction=0.7, min_ratio=0.4, check_every=3, rewarmup_steps=4
    )
    model = tiny_model()
    optimizer = make_optimizer(model, handoff=handoff)
    data = batches(14)
    model = train(model, optimizer, data[:8])
    assert optimizer.handoff_report()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy(optimizer.state_dict())  # state_dict shares the live tensors
    model = train(model, optimizer, data[8:])
    resumed_model = tiny_model()
    resumed = make_optimizer(resumed_model, handoff=handoff)
    resumed.load_state_dict(saved)
    resumed_model = resumed.model
    resumed_model.load_state_dict(saved_model)
    resumed_model = train(resumed_model, resumed, data[8:])
    resumed_state = resumed_model.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, resumed_state[name], rtol=0, atol=0, msg=name)


def test_end_step_hands_off_what_never_stabilized_when_the_window_closes() -> None:
    from lowrank_optim import StabilityConfig

    never_stable = StabilityConfig(policy="fixed", threshold=1.0, patience=50)
    handoff = HandoffConfig(
        start_step=4, end_step=10, target_reduction=0.7, min_ratio=0.4, check_every=3
    )
    model = tiny_model()
    optimizer = make_optimizer(model, stability=never_stable, handoff=handoff)
    train(model, optimizer, batches(20))
    assert {record["step"] for record in optimizer.handoff_report()} == {12}
    with pytest.raises(ValueError, match="end_step"):
        HandoffConfig(start_step=10, end_step=5)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_shrink_tail_keeps_the_top_subspace_and_scales_the_rest(shape) -> None:
    from lowrank_optim.handoff import shrink_tail_, top_subspace

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    basis, left = top_subspace(weight, 3)
    assert left == (shape[0] <= shape[1]) and basis.shape == (min(shape), 3)
    half = weight.clone()
    shrink_tail_(half, basis, left, 0.5)
    gone = weight.clone()
    shrink_tail_(gone, basis, left, 0.0)
    assert torch.linalg.matrix_rank(gone) == 3
    # the top-3 truncation is what is left, and half the tail is half-way to it
    u, s, vh = torch.linalg.svd(weight)
    torch.testing.assert_close(gone, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(half, (weight + gone) / 2, atol=1e-5, rtol=1e-5)


def _tapered(taper: int, steps: int, data_seed: int = 1):
    handoff = HandoffConfig(
        start_step=6, target_reduction=0.7, min_ratio=0.4, check_every=3, trigger="step",
        taper_steps=taper,
    )
    model = tiny_model()
    optimizer = make_optimizer(model, handoff=handoff)
    return train(model, optimizer, batches(steps, data_seed)), optimizer


def test_taper_hands_off_after_taper_steps_with_an_exact_factorization() -> None:
    _, at_once = _tapered(0, 12)
    model, tapered = _tapered(4, 12)
    assert {r["step"] for r in at_once.handoff_report()} == {6}
    assert {r["step"] for r in tapered.handoff_report()} == {10}
    assert [r["rank"] for r in tapered.handoff_report()] == [
        r["rank"] for r in at_once.handoff_report()
    ]
    assert max(r["relative_error"] for r in tapered.handoff_report()) < 1e-5
    assert min(r["relative_error"] for r in at_once.handoff_report()) > 0.05
    assert not tapered.tapering
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(
        tapered.handoff_report()
    )


def test_taper_resumes_bit_for_bit_from_a_checkpoint_taken_mid_taper() -> None:
    handoff = HandoffConfig(
        start_step=6, target_reduction=0.7, min_ratio=0.4, check_every=3, trigger="step",
        taper_steps=4,
    )
    data = batches(14)
    model = tiny_model()
    optimizer = make_optimizer(model, handoff=handoff)
    model = train(model, optimizer, data[:8])
    assert optimizer.tapering and not optimizer.handoff_report()
    saved_model = copy.deepcopy(model.state_dict())
    saved = torch.load(_save(optimizer.state_dict()), weights_only=True)
    model = train(model, optimizer, data[8:])
    resumed_model = tiny_model()
    resumed = make_optimizer(resumed_model, handoff=handoff)
    resumed.load_state_dict(saved)
    resumed_model.load_state_dict(saved_model)
    resumed_model = train(resumed_model, resumed, data[8:])
    assert resumed.handoff_report() == optimizer.handoff_report()
    resumed_state = resumed_model.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, resumed_state[name], rtol=0, atol=0, msg=name)


def _save(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
