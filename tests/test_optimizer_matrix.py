"""The optimizer matrix's contract, in one process: every (optimizer, storage) case against
torch.optim.AdamW in its degenerate cases, plus the torch.optim contract and input checks.

``TinyNet`` keeps every tensor under 4096 elements, so quantized storages keep full-precision
moments here and the degenerate cases hold exactly. The storage axis with quantized state is
``test_matrix_storage.py``; the placements are ``test_matrix_fsdp.py`` (FSDP2, 2 processes)
and ``test_matrix_layerwise.py`` (``LayerwiseOptimizer``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyNet, make_batches, roundtrip, split_groups, train_steps
from optimizer_cases import CASES, OptimizerCase

HYPER = {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.1}

case_ids = [case.id for case in CASES]


def assert_same_as_adamw(
    case: OptimizerCase, group_keys: dict, steps: int = 25, square: bool = False
) -> None:
    model = TinyNet(dtype=torch.float64, square=square)
    reference = copy.deepcopy(model)
    optimizer = case.build(split_groups(model, **group_keys), **HYPER)
    adamw = torch.optim.AdamW(reference.parameters(), foreach=False, **HYPER)
    for inputs, targets in make_batches(steps, torch.float64, outputs=12 if square else 6):
        for net, opt in ((model, optimizer), (reference, adamw)):
            opt.zero_grad()
            (net(inputs) - targets).square().mean().backward()
            opt.step()
        for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_unprojected_groups_equal_adamw(case: OptimizerCase) -> None:
    assert_same_as_adamw(case, {})


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_identity_projection_equals_adamw(case: OptimizerCase, proj_type: str) -> None:
    if proj_type not in case.proj_types:
        pytest.skip(f"{case.id} does not support proj_type={proj_type}")
    # rank 1000 is clipped to min(m, n) per matrix. "std" projects the smaller side, which the
    # identity basis then covers for any shape; the other types need square matrices for that.
    keys = {"rank": 1000, "update_proj_gap": 3, "proj_type": proj_type, **case.identity_group}
    assert_same_as_adamw(case, keys, square=proj_type != "std")


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("split_at", [4, 5, 6])  # gap 5: inside, at and just after a refresh
def test_state_dict_resume_is_bit_identical(case: OptimizerCase, split_at: int) -> None:
    keys = {"rank": 3, "update_proj_gap": 5, "proj_type": "std"}
    batches = make_batches(14, torch.float32)
    model = TinyNet()
    optimizer = case.build(split_groups(model, **keys), **HYPER)
    train_steps(model, optimizer, batches)

    first = TinyNet()
    first_optimizer = case.build(split_groups(first, **keys), **HYPER)
    train_steps(first, first_optimizer, batches[:split_at])
    saved_model = roundtrip(first.state_dict())
    saved_optimizer = roundtrip(first_optimizer.state_dict())

    resumed = TinyNet(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    resumed_optimizer = case.build(split_groups(resumed, **keys), **HYPER)
    resumed_optimizer.load_state_dict(saved_optimizer)
    train_steps(resumed, resumed_optimizer, batches[split_at:])
    for ours, theirs in zip(resumed.parameters(), model.parameters(), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dtypes_train_and_keep_dtype(case: OptimizerCase, dtype: torch.dtype) -> None:
    model = TinyNet(dtype=dtype)
    optimizer = case.build(split_groups(model, rank=4, update_proj_gap=4), lr=1e-2)
    losses = train_steps(model, optimizer, make_batches(1, dtype) * 30)
    assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in model.parameters())
    assert losses[-1] < losses[0]
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == dtype


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_state_is_tensors_and_numbers_only(case: OptimizerCase) -> None:
    model = TinyNet()
    optimizer = case.build(split_groups(model, rank=3, update_proj_gap=2), lr=1e-2)
    train_steps(model, optimizer, make_batches(3, torch.float32))
    allowed = (torch.Tensor, int, float, bool, str, type(None))
    for state in optimizer.state_dict()["state"].values():
        for key, value in state.items():
            if isinstance(value, list):  # the stability metrics' short histories
                assert all(isinstance(v, float) for v in value), f"state[{key!r}] = {value!r}"
                continue
            assert isinstance(value, allowed), f"state[{key!r}] is a {type(value).__name__}"
    roundtrip(optimizer.state_dict())  # raises if anything needs unpickling beyond weights


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "learning rate: -1.0"),
        ({"betas": (1.0, 0.9)}, "beta parameter at index 0: 1.0"),
        ({"betas": (0.9, -0.1)}, "beta parameter at index 1: -0.1"),
        ({"eps": -1e-8}, "epsilon value: -1e-08"),
        ({"weight_decay": -0.1}, "weight_decay value: -0.1"),
        ({"on_bad_gradient": "ignore"}, "on_bad_gradient: 'ignore'"),
    ],
)
def test_bad_hyperparameters_raise(case: OptimizerCase, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        case.build(split_groups(TinyNet(), rank=2), **kwargs)


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({"rank": 0}, "rank: 0"),
        ({"rank": -3}, "rank: -3"),
        ({"rank": 2.5}, "rank: 2.5"),
        ({"rank": 2, "update_proj_gap": 0}, "update_proj_gap: 0"),
        ({"rank": 2, "proj_type": "diagonal"}, "proj_type: 'diagonal'"),
        ({"rank": 2, "refresh": "qr"}, "refresh: 'qr'"),
        ({"rank": 2, "scale": 0.0}, "scale: 0.0"),
        ({"rank": 2, "moment_transfer": "reset"}, "moment_transfer: 'reset'"),
    ],
)
def test_bad_group_keys_raise(case: OptimizerCase, group: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        case.build(split_groups(TinyNet(), **group))


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_contract_closure_and_zero_grad(case: OptimizerCase) -> None:
    model = TinyNet()
    optimizer = case.build(split_groups(model, rank=2), lr=1e-2)
    inputs, targets = make_batches(1, torch.float32)[0]

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = (model(inputs) - targets).square().mean()
        loss.backward()
        return loss

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** (step + 1))
    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
