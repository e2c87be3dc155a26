"""The factors' matched first step (``HandoffConfig.factor_step="matched"``)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_welore import EAGER_STABILITY, batches, tiny_model, train

from lowrank_optim import HandoffConfig, ProjectionConfig, WeLoreAdamW
from lowrank_optim.factorize import LowRankLinear
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.handoff import HANDOFF_STEP, LR_MULTIPLIER, LR_SCALE, factor_lr_stages
from lowrank_optim.state_keys import STEP
from lowrank_optim.train import PretrainConfig

__all__: list[str] = []

pytestmark = pytest.mark.usefixtures("one_thread")

# No refresh inside the test (a zero gradient must not be asked for a basis), no weight decay
# (it would add its own step), GaLore's recipe otherwise.
PROJECTION = ProjectionConfig(rank=8, update_proj_gap=100, scale=0.25)
LR = 1e-2
HANDOFF_AT = 6
WEIGHT_SCALE = 4.0


def _run(
    factor_step: str, hand_off: bool, relax: int = 0
) -> tuple[torch.nn.Module, WeLoreAdamW]:
    """Train ``HANDOFF_AT`` steps; with ``hand_off`` every qualifying layer goes after the
    last one (the one-shot trigger), otherwise the run stays GaLore."""
    handoff = HandoffConfig(
        start_step=HANDOFF_AT if hand_off else 10_000,
        target_reduction=0.7,
        min_ratio=0.4,
        check_every=3,
        trigger="step",
        factor_step=factor_step,
        factor_step_relax=relax,
    )
    model = tiny_model()
    with torch.no_grad():  # larger singular values, as trained weights have
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ("attn" in name or "mlp" in name):
                module.weight.mul_(WEIGHT_SCALE)
    groups = lowrank_param_groups(model, "attn-mlp", PROJECTION)
    optimizer = WeLoreAdamW(
        groups, lr=LR, weight_decay=0.0, model=model, stability=EAGER_STABILITY, handoff=handoff
    )
    model = train(model, optimizer, batches(HANDOFF_AT))
    return model, optimizer


def _step_on_zero_gradients(
    model: torch.nn.Module, optimizer: WeLoreAdamW, frozen: str | None = None
) -> None:
    """One optimizer step whose gradients are all zero: only the moments move it, so the step
    is the direction the optimizer carried into it. ``frozen`` (``"up"`` or ``"down"``): that
    factor of every factorized layer gets no gradient, so it does not step."""
    skipped = {
        id(getattr(module, frozen))
        for module in model.modules()
        if frozen is not None and isinstance(module, LowRankLinear)
    }
    for param in model.parameters():
        param.grad = None if id(param) in skipped else torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every projected layer's ``W`` (``U D`` for a factorized one), by layer name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            found[name] = (module.up @ module.down).detach().clone()
        elif isinstance(module, torch.nn.Linear) and ("attn" in name or "mlp" in name):
            found[name] = module.weight.detach().clone()
    return found


def _step_ratios(factor_step: str, frozen: str | None = None) -> dict[str, float]:
    """Per handed-off layer: how far the factors' next step moves ``W = U D``, over how far
    GaLore's next step moves the same layer in an identical run without the hand-off.
    ``frozen``: that factor does not step (then ``dW`` is exactly the other factor's term)."""
    handed, optimizer = _run(factor_step, hand_off=True)
    dense, dense_optimizer = _run(factor_step, hand_off=False)
    assert optimizer.handoff_report(), "nothing was handed off"
    assert not dense_optimizer.handoff_report()
    before_handed, before_dense = _weights(handed), _weights(dense)
    _step_on_zero_gradients(handed, optimizer, frozen)
    _step_on_zero_gradients(dense, dense_optimizer)
    after_handed, after_dense = _weights(handed), _weights(dense)
    return {
        record["layer"]: float(
            (after_handed[record["layer"]] - before_handed[record["layer"]]).norm()
            / (after_dense[record["layer"]] - before_dense[record["layer"]]).norm()
        )
        for record in optimizer.handoff_report()
    }


def test_matched_factors_move_w_as_far_as_galore_would_have() -> None:
    matched = _step_ratios("matched")
    fixed = _step_ratios("fixed")
    assert set(matched) == set(fixed)
    for layer, ratio in matched.items():
        # first order exactly; the dU dD term and the zero gradient's moment decay are small
        assert ratio == pytest.approx(1.0, abs=0.01), (layer, ratio)
    # With one lr for all factors the step on W is off by a layer-dependent factor, which is
    # what the multiplier corrects (if it were ~1 everywhere, this test could not fail).
    assert max(abs(ratio - 1.0) for ratio in fixed.values()) > 0.2, fixed


@pytest.mark.parametrize("frozen", ["up", "down"])
def test_matched_each_factor_alone_moves_w_as_far_as_galore_would_have(frozen: str) -> None:
    # With one factor held still, dW is exactly the other factor's term (dU D or U dD).
    for layer, ratio in _step_ratios("matched-each", frozen).items():
        assert ratio == pytest.approx(1.0, abs=0.01), (layer, ratio)
    # ... and both together move it further than GaLore's step, by at most twice
    for layer, ratio in _step_ratios("matched-each").items():
        assert 1.0 < ratio <= 2.0 + 1e-3, (layer, ratio)


@pytest.mark.parametrize("rule", ["matched", "matched-each", "capped"])
def test_multipliers_are_recorded_per_layer_and_kept_in_the_factor_state(rule: str) -> None:
    model, optimizer = _run(rule, hand_off=True)
    records = optimizer.handoff_report()
    multipliers = {record["layer"]: record["lr_multipliers"] for record in records}
    ups = {up for up, _ in multipliers.values()}
    assert len(ups) > 1, "one value for all layers: not per layer"
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            for index, factor in enumerate((module.up, module.down)):
                assert optimizer.state[factor][LR_MULTIPLIER] == multipliers[name][index]
    same = all(up == down for up, down in multipliers.values())
    if rule != "capped":
        assert same == (rule == "matched"), multipliers  # matched-each: one per factor
    _, fixed = _run("fixed", hand_off=True)
    assert all(record["lr_multipliers"] == [1.0, 1.0] for record in fixed.handoff_report())


def test_capped_is_matched_each_never_above_one() -> None:
    _, each = _run("matched-each", hand_off=True)
    _, capped = _run("capped", hand_off=True)
    each_multipliers = {r["layer"]: r["lr_multipliers"] for r in each.handoff_report()}
    capped_multipliers = {r["layer"]: r["lr_multipliers"] for r in capped.handoff_report()}
    assert set(each_multipliers) == set(capped_multipliers)
    values = [value for pair in each_multipliers.values() for value in pair]
    # the test needs both kinds of factor, or it could not tell the cap from either rule
    assert min(values) < 1.0 < max(values), values
    for layer, pair in each_multipliers.items():
        assert capped_multipliers[layer] == [min(1.0, value) for value in pair], layer


@pytest.mark.parametrize("rule", ["matched", "matched-each"])
def test_matched_run_resumes_bit_for_bit_from_a_weights_only_checkpoint(rule: str) -> None:
    model, optimizer = _run(rule, hand_off=True)
    data = batches(HANDOFF_AT + 5)[HANDOFF_AT:]
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model = train(model, optimizer, data)

    fresh_model = tiny_model()  # its values are replaced by the checkpoint's
    groups = lowrank_param_groups(fresh_model, "attn-mlp", PROJECTION)
    resumed = WeLoreAdamW(
        groups,
        lr=LR,
        weight_decay=0.0,
        model=fresh_model,
        stability=EAGER_STABILITY,
        handoff=copy.deepcopy(optimizer.handoff_config),
    )
    resumed.load_state_dict(saved["optimizer"])
    resumed.model.load_state_dict(saved["model"])
    resumed_model = train(resumed.model, resumed, data)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            value, resumed_model.state_dict()[name], rtol=0, atol=0, msg=name
        )


def test_bad_factor_step_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match=r"factor_step: 'sometimes'.*fixed, matched, matched-e"):
        HandoffConfig(factor_step="sometimes")
    with pytest.raises(ValueError, match="handoff_factor_step"):
        PretrainConfig(handoff_factor_step="exact")


def test_relaxed_multiplier_returns_linearly_to_one() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(4)]
    group = {"params": params}
    # steps taken since the hand-off (this one included): 1, 5, 9 and 30; multiplier 0.5
    state = {p: {STEP: 10 + taken - 1, HANDOFF_STEP: 10, LR_MULTIPLIER: 0.5}
             for p, taken in zip(params, (1, 5, 9, 30), strict=True)}
    stages = factor_lr_stages(group, range(4), state, ramp=0, relax=8)
    assert stages == {0.5: [0], 0.75: [1], 1.0: [2, 3]}
    assert factor_lr_stages(group, range(4), state, ramp=0) == {0.5: [0, 1, 2, 3]}
    # with a re-warm-up too, the two multiply
    assert factor_lr_stages(group, [1], state, ramp=9, relax=8) == {0.5 * 0.75: [1]}


def test_relaxed_multipliers_set_the_factor_steps_lr(monkeypatch: pytest.MonkeyPatch) -> None:
    relax = 4
    model, optimizer = _run("matched-each", hand_off=True, relax=relax)
    multipliers = {r["layer"]: r["lr_multipliers"] for r in optimizer.handoff_report()}
    assert any(abs(m - 1.0) > 0.05 for pair in multipliers.values() for m in pair)
    seen: dict[int, list[float]] = {}
    parent = type(optimizer).__mro__[1]
    original = parent._step_group

    def spy(self, group, indices, low_rank_grads):  # noqa: ANN001, ANN202 - a test double
        for index in indices:
            seen.setdefault(id(group["params"][index]), []).append(group["lr"])
        return original(self, group, indices, low_rank_grads)

    monkeypatch.setattr(parent, "_step_group", spy)
    for _ in range(relax + 2):
        _step_on_zero_gradients(model, optimizer)
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            for factor, mu in zip((module.up, module.down), multipliers[name], strict=True):
                group = next(g for g in optimizer.param_groups
                             if any(p is factor for p in g["params"]))
                wanted = [group["lr"] * group[LR_SCALE] * (mu + (1 - mu) * min(1.0, j / relax))
                          for j in range(relax + 2)]
                assert seen[id(factor)] == pytest.approx(wanted, rel=1e-12), name


def test_bad_factor_step_relax_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match=r"factor_step_relax: -1.*integer >= 0"):
        HandoffConfig(factor_step_relax=-1)
    with pytest.raises(ValueError, match="handoff_factor_step_relax"):
        PretrainConfig(handoff_factor_step_relax=2.5)
