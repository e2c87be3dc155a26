"""Silent failures a careless user hit (issue #26): lr schedulers that set lr, stale DDP
wrappers, reordered param groups, unknown group keys, late param groups, layer-wise errors."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import TinyNet, make_batches, roundtrip, split_groups
from test_welore import EAGER_HANDOFF, EAGER_STABILITY, batches, tiny_model, train

from lowrank_optim import GaLoreAdamW, HandoffConfig, ProjectionConfig, WeLoreAdamW
from lowrank_optim.errors import CheckpointMismatchError
from lowrank_optim.factorize import LowRankLinear
from lowrank_optim.factory import lowrank_param_groups
from lowrank_optim.handoff import FACTORS_OF

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = 0.25
#: The factors step at exactly their group's lr times the ratio: no multiplier, no ramp.
PLAIN_HANDOFF = dataclasses.replace(
    EAGER_HANDOFF, factor_step="fixed", factor_step_relax=0, rewarmup_steps=0
)


def _handed_off(handoff: HandoffConfig = PLAIN_HANDOFF, names: bool = False):
    model = tiny_model()
    projection = ProjectionConfig(rank=8, update_proj_gap=2, scale=SCALE)
    groups = lowrank_param_groups(model, "attn-mlp", projection)
    if names:
        lookup = {id(p): n for n, p in model.named_parameters()}
        groups = [{**g, "param_names": [lookup[id(p)] for p in g["params"]]} for g in groups]
    optimizer = WeLoreAdamW(
        groups, lr=1e-2, stability=EAGER_STABILITY, handoff=handoff, model=model
    )
    model = train(model, optimizer, batches(10))
    assert optimizer.handoff_report(), "the fixture must hand off"
    return model, optimizer


def _factor_step_lrs(model, optimizer, steps: int, drive) -> list[tuple[float, float]]:
    """(projected group's lr, lr the factors stepped with) for ``steps`` steps under ``drive``."""
    seen: list[tuple[float, float]] = []
    parent = GaLoreAdamW._step_group

    def spy(self, group, indices, low_rank_grads):  # noqa: ANN001, ANN202 - a test double
        if FACTORS_OF in group and indices:
            source = self.param_groups[group[FACTORS_OF]]
            seen.append((source["lr"], group["lr"]))
        return parent(self, group, indices, low_rank_grads)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GaLoreAdamW, "_step_group", spy)
        for ids in batches(steps, seed=5):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            drive()
    return seen


def _hand_written(optimizer):
    state = {"t": 0}

    def drive() -> None:
        state["t"] += 1
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (1 + state["t"])

    return drive


@pytest.mark.parametrize("how", ["OneCycleLR", "CyclicLR", "hand-written"])
def test_a_scheduler_that_sets_lr_keeps_the_factors_ratio(how: str) -> None:
    model, optimizer = _handed_off()
    if how == "OneCycleLR":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-2, total_steps=50)
        drive = scheduler.step
    elif how == "CyclicLR":
        scheduler = torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=1e-3, max_lr=1e-2, step_size_up=3, cycle_momentum=False
        )
        drive = scheduler.step
    else:
        drive = _hand_written(optimizer)
    seen = _factor_step_lrs(model, optimizer, 6, drive)
    assert len(seen) == 6
    assert len({round(lr, 12) for lr, _ in seen}) > 1, "the schedule must move lr"
    for source_lr, factor_lr in seen:
        assert factor_lr == pytest.approx(SCALE * source_lr, rel=1e-12)


@pytest.mark.parametrize(
    ("key", "value"), [("maximize", True), ("amsgrad", True), ("fused", True), ("foreach", False)]
)
@pytest.mark.parametrize("projected", [False, True])
def test_torch_adamw_group_options_that_are_not_implemented_are_refused(
    key: str, value: object, projected: bool
) -> None:
    groups = split_groups(TinyNet(), rank=2)
    groups[1 if projected else 0][key] = value
    with pytest.raises(ValueError, match=rf"{key}={value!r}.*does not implement"):
        GaLoreAdamW(groups)
    # the value that means what the optimizer does is accepted, and other keys stay as in torch
    groups[1 if projected else 0][key] = {"maximize": False, "amsgrad": False}.get(key)
    groups[0]["name"] = "norms"
    optimizer = GaLoreAdamW(groups)
    assert optimizer.param_groups[0]["name"] == "norms"


def _two_layers(named: bool, same_shape: bool = False):
    """Two projected linears, 48 x 32 and 32 x 48 (or both 32 x 32), trained a few steps."""
    torch.manual_seed(0)
    hidden = 32 if same_shape else 48
    model = torch.nn.Sequential(torch.nn.Linear(32, hidden), torch.nn.Linear(hidden, 32))
    weights = [("0.weight", model[0].weight), ("1.weight", model[1].weight)]
    return model, weights


def _optimizer(weights, named: bool) -> GaLoreAdamW:
    group = {"params": [p for _, p in weights], "rank": 4, "update_proj_gap": 50}
    if named:
        group["param_names"] = [n for n, _ in weights]
    return GaLoreAdamW([group], lr=1e-2)


def _train(model, optimizer, steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        model(torch.randn(8, 32, generator=generator)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("named", [False, True])
def test_state_for_transposed_layers_in_another_order_is_refused(named: bool) -> None:
    model, weights = _two_layers(named)
    optimizer = _optimizer(weights, named)
    _train(model, optimizer)
    saved = roundtrip(optimizer.state_dict())
    swapped = _optimizer(list(reversed(weights)), named)
    needle = "position 0" if named else r"shape \(48, 32\)|shape \(32, 48\)"
    with pytest.raises(CheckpointMismatchError, match=needle):
        swapped.load_state_dict(saved)


def test_state_for_same_shape_layers_in_another_order_is_refused_by_name() -> None:
    model, weights = _two_layers(named=True, same_shape=True)
    optimizer = _optimizer(weights, named=True)
    _train(model, optimizer)
    swapped = _optimizer(list(reversed(weights)), named=True)
    needle = r"holds '0.weight' at position 0.*'1.weight'"
    with pytest.raises(CheckpointMismatchError, match=needle):
        swapped.load_state_dict(roundtrip(optimizer.state_dict()))
    # the same order loads, and training goes on
    again = _optimizer(weights, named=True)
    again.load_state_dict(roundtrip(optimizer.state_dict()))
    _train(model, again, steps=1)


def test_a_projected_parameter_without_its_basis_raises_instead_of_being_skipped() -> None:
    model, weights = _two_layers(named=True)
    optimizer = _optimizer(weights, named=True)
    _train(model, optimizer)
    state = optimizer.state[model[0].weight]
    for key in [k for k in state if k.startswith("basis_")]:
        del state[key]
    model(torch.randn(8, 32)).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"0.weight \(shape \(48, 32\)\) cannot step.*basis"):
        optimizer.step()


EARLY = "model.layers.0.self_attn.q_proj"


def _late_groups(model):
    """The model's projected group split in two: the first layer's weight, and the rest."""
    groups = lowrank_param_groups(model, "attn-mlp", ProjectionConfig(rank=8, update_proj_gap=2))
    dense, projected = groups  # params are (name, tensor) pairs
    early = [pair for pair in projected["params"] if pair[0].startswith(EARLY)]
    rest = [pair for pair in projected["params"] if not pair[0].startswith(EARLY)]
    return [dense, {**projected, "params": early}], {**projected, "params": rest}


def test_a_projected_group_added_after_construction_is_handed_off() -> None:
    model = tiny_model()
    groups, late = _late_groups(model)
    optimizer = WeLoreAdamW(
        groups, lr=3e-3, stability=EAGER_STABILITY, handoff=EAGER_HANDOFF, model=model
    )
    optimizer.add_param_group(late)
    late_index = len(optimizer.param_groups) - 2
    assert optimizer.param_groups[-1][FACTORS_OF] == late_index
    model = train(model, optimizer, batches(10))
    from_late = [r for r in optimizer.handoff_report() if r["layer"] != EARLY]
    assert from_late
    factors = {id(p) for p in optimizer.param_groups[-1]["params"]}
    for record in from_late:
        layer = model.get_submodule(record["layer"])
        assert isinstance(layer, LowRankLinear) and id(layer.up) in factors


def test_a_projected_group_appended_behind_the_optimizers_back_fails_before_any_change() -> None:
    model = tiny_model()
    groups, late = _late_groups(model)
    optimizer = WeLoreAdamW(
        groups, lr=3e-3, stability=EAGER_STABILITY, handoff=EAGER_HANDOFF, model=model
    )
    projection = late["projection"].to_group()
    pairs = late["params"]
    full = {**optimizer.defaults, **projection, "params": [p for _, p in pairs],
            "param_names": [n for n, _ in pairs]}
    optimizer.param_groups.append(full)
    with pytest.raises(RuntimeError, match=r"Param group 3 is projected but has no factor group"):
        train(model, optimizer, batches(10))
    handed_off = {r["layer"] for r in optimizer.handoff_report()}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            assert name in handed_off  # only complete hand-offs; the refused layer is still dense
    assert all(isinstance(model.get_submodule(n.removesuffix(".weight")), torch.nn.Linear)
               for n, _ in pairs)


@pytest.mark.parametrize("optimizer_class", [GaLoreAdamW, WeLoreAdamW])
def test_an_optimizer_with_nothing_projected_warns_at_the_users_line(optimizer_class) -> None:
    model = TinyNet()
    with pytest.warns(UserWarning, match="has no projected param group") as record:
        optimizer_class(model.parameters(), lr=1e-3)
    assert [w.filename for w in record if "projected" in str(w.message)] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer_class(split_groups(model, rank=2), lr=1e-3)


def _layerwise_tiny():
    from lowrank_optim import LayerwiseOptimizer

    model = TinyNet()
    optimizer = GaLoreAdamW(split_groups(model, rank=2, update_proj_gap=2), lr=1e-2)
    LayerwiseOptimizer(optimizer, model)  # its hooks keep it alive
    inputs, targets = make_batches(1, torch.float32)[0]

    def backward() -> None:
        (model(inputs) - targets).square().mean().backward()

    backward()  # one good step, so every parameter has state
    return model, optimizer, backward


def test_layerwise_non_finite_error_says_which_parameters_already_stepped() -> None:
    from lowrank_optim.errors import NonFiniteGradientError

    model, optimizer, backward = _layerwise_tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.up.weight.register_hook(lambda grad: grad * float("nan"))  # the last to arrive
    with pytest.raises(NonFiniteGradientError) as caught:
        backward()
    message = str(caught.value)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "up.weight" not in moved and moved, "the earlier parameters stepped"
    assert "no update was applied" not in message
    assert f"{len(moved)} parameter(s) of this step were already updated" in message
    assert "it was not updated" in message


def test_layerwise_bad_lr_is_refused_before_any_parameter_steps() -> None:
    model, optimizer, backward = _layerwise_tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.param_groups[1]["lr"] = float("nan")  # the projected group: up/down weights
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        backward()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} moved before the error"
