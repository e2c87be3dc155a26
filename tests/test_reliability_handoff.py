"""WeLore hand-off reliability (issue #15): frozen layers, tied weights, checkpoint plans that
do not match, and projected weights in linear types other than ``nn.Linear``."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from helpers import roundtrip
from torch import nn

from lowrank_optim import HandoffConfig, ProjectionConfig, StabilityConfig, WeLoreAdamW
from lowrank_optim.errors import CheckpointMismatchError
from lowrank_optim.factorize import LowRankLinear
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.handoff import factor_moments
from lowrank_optim.projection import LEFT, RIGHT
from lowrank_optim.quant import quantize_model
from lowrank_optim.train.models import build_llama, tiny_llama_config

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
EAGER_STABILITY = StabilityConfig(policy="fixed", threshold=0.01, patience=1)
EAGER_HANDOFF = HandoffConfig(start_step=6, target_reduction=0.7, min_ratio=0.4, check_every=3)
PROJECTION = ProjectionConfig(rank=8, update_proj_gap=2, scale=1.0)
FROZEN = "model.layers.0.self_attn.q_proj"


def tiny_llama(seed: int = 0) -> nn.Module:
    return build_llama(
        tiny_llama_config(VOCAB, hidden=48, layers=2, heads=4, intermediate=96), seed=seed
    )


def tiny_gpt2(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # deterministic: resumes compare exactly
    )
    return transformers.GPT2LMHeadModel(config)


def welore(model: nn.Module, groups=None, handoff: HandoffConfig = EAGER_HANDOFF) -> WeLoreAdamW:
    groups = groups if groups is not None else lowrank_param_groups(model, "attn-mlp", PROJECTION)
    return WeLoreAdamW(
        groups, lr=3e-3, weight_decay=0.01, stability=EAGER_STABILITY, handoff=handoff, model=model
    )


def gpt2_groups(model: nn.Module, extra: tuple[str, ...] = ()) -> list[dict]:
    """Every Conv1D weight projected (8 for two blocks), plus the parameters named in extra."""
    projected, dense = [], []
    for name, param in model.named_parameters():
        is_conv = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        (projected if is_conv or name in extra else dense).append(param)
    return [{"params": dense}, {"params": projected, "projection": PROJECTION}]


def batches(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 16), generator=generator) for _ in range(count)]


def train(model, optimizer, data, before_handoff=None):
    for ids in data:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if before_handoff is not None:
            before_handoff(model, optimizer)
        model = optimizer.maybe_handoff(model)
    return model


def optimizer_params(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def handoff_warnings(caught: list[warnings.WarningMessage], needle: str) -> list[str]:
    return [str(w.message) for w in caught if needle in str(w.message)]


# ----------------------------------------------------------------------------- item 2: frozen
def test_frozen_projected_weight_is_not_handed_off() -> None:
    model = tiny_llama()
    optimizer = welore(model)
    data = batches(24)
    model = train(model, optimizer, data[:5])  # stable by now: the hand-off would take it
    weight = model.get_submodule(FROZEN).weight
    assert optimizer.state[weight]["stable_since"] >= 0
    weight.requires_grad_(False)
    frozen = weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = train(model, optimizer, data[5:])
    assert optimizer.handoff_report(), "other layers should still be handed off"
    assert FROZEN not in optimizer.plan
    layer = model.get_submodule(FROZEN)
    assert type(layer) is nn.Linear and layer.weight is weight
    assert torch.equal(layer.weight, frozen) and not layer.weight.requires_grad
    assert len(handoff_warnings(caught, f"{FROZEN} is frozen")) == 1


# ----------------------------------------------------------------------------- item 6: tied
@pytest.mark.parametrize("how", ["shared weight", "shared module"])
def test_tied_projected_weight_is_refused_and_stays_tied(how: str) -> None:
    model = tiny_llama()
    first, second = model.model.layers[0].mlp, model.model.layers[1].mlp
    if how == "shared weight":
        second.down_proj.weight = first.down_proj.weight
    else:
        second.down_proj = first.down_proj
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = welore(model)
        model = train(model, optimizer, batches(24))
    assert optimizer.handoff_report(), "untied layers should still be handed off"
    tied = [name for name in optimizer.plan if name.endswith("mlp.down_proj")]
    assert tied == []
    first, second = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert type(first.down_proj) is nn.Linear and type(second.down_proj) is nn.Linear
    assert first.down_proj.weight is second.down_proj.weight
    # nothing the model trains was dropped from the optimizer
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable <= optimizer_params(optimizer)
    messages = handoff_warnings(caught, "model.layers.0.mlp.down_proj (Linear)")
    assert len(messages) == 1 and "model.layers.1.mlp.down_proj" in messages[0]


# ------------------------------------------------------------------ item 7: checkpoint plans
def trained_checkpoint(steps: int, handoff: HandoffConfig = EAGER_HANDOFF):
    model = tiny_llama()
    optimizer = welore(model, handoff=handoff)
    train(model, optimizer, batches(steps))
    return optimizer


def test_checkpoint_handed_off_at_other_ranks_is_refused() -> None:
    saved = trained_checkpoint(12)
    other = trained_checkpoint(12, dataclasses.replace(EAGER_HANDOFF, target_reduction=0.5))
    differing = [
        name
        for name, entry in other.plan.items()
        if name in saved.plan and saved.plan[name]["rank"] != entry["rank"]
    ]
    assert differing, "the two runs should hand off some layer at different ranks"
    name = differing[0]
    state = roundtrip(saved.state_dict())
    with pytest.raises(CheckpointMismatchError, match=name) as raised:
        other.load_state_dict(state)
    message = str(raised.value)
    assert f"rank {saved.plan[name]['rank']}" in message
    assert f"rank {other.plan[name]['rank']}" in message


def test_checkpoint_without_a_handoff_this_optimizer_made_is_refused() -> None:
    dense = roundtrip(trained_checkpoint(2).state_dict())
    handed_off = trained_checkpoint(12)
    name = next(iter(handed_off.plan))
    with pytest.raises(CheckpointMismatchError, match=name):
        handed_off.load_state_dict(dense)


def _fresh_resume_target() -> tuple[nn.Module, WeLoreAdamW]:
    model = tiny_llama(seed=5)
    return model, welore(model)


def _assert_untouched(model: nn.Module, optimizer: WeLoreAdamW) -> None:
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert optimizer.plan == {}
    assert {id(p) for p in model.parameters()} <= optimizer_params(optimizer)


@pytest.mark.parametrize(
    "corrupt, needle",
    [
        (lambda entry: entry.update(group=99), "group 99"),
        (lambda entry: entry.update(group=0), "group 0"),
        (lambda entry: entry.update(shape=[7, 5]), "[7, 5]"),
        (lambda entry: entry.update(rank=10_000), "rank 10000"),
    ],
    ids=["group out of range", "group not projected", "shape", "rank"],
)
def test_bad_plan_entry_is_refused_before_any_change(corrupt, needle: str) -> None:
    state = roundtrip(trained_checkpoint(12).state_dict())
    plan = state["welore"]["plan"]
    assert len(plan) >= 2
    last = list(plan)[-1]  # the first entries are fine: none of them may be applied either
    corrupt(plan[last])
    model, optimizer = _fresh_resume_target()
    with pytest.raises(CheckpointMismatchError, match=last) as raised:
        optimizer.load_state_dict(state)
    assert needle in str(raised.value)
    _assert_untouched(model, optimizer)


def test_plan_entry_for_a_layer_the_model_lacks_is_refused() -> None:
    state = roundtrip(trained_checkpoint(12).state_dict())
    plan = state["welore"]["plan"]
    plan["model.layers.7.mlp.up_proj"] = dict(next(iter(plan.values())))
    model, optimizer = _fresh_resume_target()
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.7\.mlp\.up_proj"):
        optimizer.load_state_dict(state)
    _assert_untouched(model, optimizer)


# ------------------------------------------------------------ item 8: Conv1D, QuantizedLinear
def test_conv1d_moment_carry_is_the_transposed_linear_carry() -> None:
    """A Conv1D weight (in x out, left basis P) is the transpose of a Linear's (out x in, right
    basis P): the carried moments must be exactly the Linear's."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64)).Q  # in = 30
    exp_avg = torch.randn(4, 20, dtype=torch.float64)  # projected moments of a 30 x 20 Conv1D
    exp_avg_sq = torch.rand(4, 20, dtype=torch.float64)
    up, down = torch.randn(20, 5, dtype=torch.float64), torch.randn(5, 30, dtype=torch.float64)
    conv = factor_moments(exp_avg, exp_avg_sq, {LEFT: basis}, up, down, transposed=True)
    linear = factor_moments(exp_avg.T, exp_avg_sq.T, {RIGHT: basis}, up, down)
    for got, expected in zip(conv, linear, strict=True):
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])
    torch.testing.assert_close(conv[0][0], (basis @ exp_avg).T @ down.T)


def test_gpt2_conv1d_layers_are_handed_off_with_their_moments() -> None:
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    optimizer = welore(model, gpt2_groups(model))
    conv_names = [n for n, m in model.named_modules() if type(m) is Conv1D]
    assert len(conv_names) == 8
    snapshots: dict[str, dict] = {}

    def snapshot(model, optimizer):
        snapshots.clear()
        for name in conv_names:
            layer = model.get_submodule(name)
            if type(layer) is Conv1D:
                state = optimizer.state[layer.weight]
                snapshots[name] = {
                    "weight": layer.weight.detach().clone(),
                    "state": copy.deepcopy(dict(state)),
                }

    checked = 0
    for step, ids in enumerate(batches(24), start=1):
        model = train(model, optimizer, [ids], before_handoff=snapshot)
        for record in optimizer.handoff_report():
            name = record["layer"]
            if name not in snapshots or record["step"] != step:
                continue
            before, layer = snapshots[name], model.get_submodule(name)
            assert isinstance(layer, LowRankLinear)
            weight = before["weight"]  # in x out
            assert (layer.in_features, layer.out_features) == tuple(weight.shape)
            torch.testing.assert_close(
                layer.relative_error(weight.T), record["relative_error"], rtol=1e-5, atol=1e-7
            )
            state = before["state"]
            bases = {k: state[k] for k in (LEFT, RIGHT) if k in state}
            linear_bases = {RIGHT if k == LEFT else LEFT: b for k, b in bases.items()}
            (m_up, v_up), (m_down, v_down) = factor_moments(
                state["exp_avg"].T, state["exp_avg_sq"].T, linear_bases, layer.up, layer.down
            )
            torch.testing.assert_close(optimizer.state[layer.up]["exp_avg"], m_up)
            torch.testing.assert_close(optimizer.state[layer.down]["exp_avg_sq"], v_down)
            checked += 1
    assert checked, "some GPT-2 Conv1D layer should have been handed off"
    assert len(optimizer.plan) == len(optimizer.handoff_report()) > 0
    assert all(type(model.get_submodule(name)) is LowRankLinear for name in optimizer.plan)
    assert {id(p) for p in model.parameters()} <= optimizer_params(optimizer)
    ids = batches(1, seed=9)[0]
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_gpt2_checkpoint_resume_reapplies_conv1d_handoffs() -> None:
    data = batches(16)
    model = tiny_gpt2()
    optimizer = welore(model, gpt2_groups(model))
    model = train(model, optimizer, data)
    assert optimizer.plan

    first = tiny_gpt2()
    first_optimizer = welore(first, gpt2_groups(first))
    first = train(first, first_optimizer, data[:10])
    assert first_optimizer.plan
    saved_model, saved_optimizer = roundtrip(first.state_dict()), roundtrip(
        first_optimizer.state_dict()
    )
    resumed = tiny_gpt2(seed=3)
    resumed_optimizer = welore(resumed, gpt2_groups(resumed))
    resumed_optimizer.load_state_dict(saved_optimizer)
    resumed.load_state_dict(saved_model)
    resumed = train(resumed, resumed_optimizer, data[10:])
    assert resumed_optimizer.plan == optimizer.plan
    expected = dict(model.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_projected_weight_of_another_type_warns_once() -> None:
    model = tiny_gpt2()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = welore(model, gpt2_groups(model, extra=("transformer.wpe.weight",)))
        train(model, optimizer, batches(12))
    messages = handoff_warnings(caught, "transformer.wpe (Embedding)")
    assert len(messages) == 1 and "never handed off" in messages[0]


def test_quantized_linear_is_refused_with_a_reason() -> None:
    model = tiny_llama()
    quantize_model(model, include=["mlp.up_proj"], group_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = welore(model)
        optimizer.maybe_handoff()
    messages = handoff_warnings(caught, "(QuantizedLinear)")
    assert len(messages) == 2  # one per quantized layer, naming it
    assert "model.layers.0.mlp.up_proj (QuantizedLinear)" in messages[0]
    assert "INT8" in messages[0]
    # the reason given holds: WeLoreAdamW (a GaLoreAdamW) cannot step an INT8 weight at all
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="single memory location"):
        optimizer.step()


def test_gpt2_default_param_groups_project_conv1d_and_hand_it_off() -> None:
    """``lowrank_param_groups`` (what ``build_optimizer`` and ``pretrain`` use) projects GPT-2's
    Conv1D weights, so a GPT-2 trained with WeLoreAdamW's defaults hands them off."""
    model = tiny_gpt2()
    groups = lowrank_param_groups(model, "attn-mlp", PROJECTION)
    projected = [name for name, _ in groups[-1]["params"]]
    assert len(projected) == 8 and all(".attn.c_" in n or ".mlp.c_" in n for n in projected)
    optimizer = welore(model, groups)
    model = train(model, optimizer, batches(12))
    assert optimizer.handoff_report()
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
