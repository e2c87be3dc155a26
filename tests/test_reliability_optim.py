"""Silent failures of the optimizer core (issue #15): each test failed before its fix."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from helpers import TinyNet, make_batches, roundtrip, split_groups, train_steps

from lowrank_optim import (
    CheckpointMismatchError,
    GaLoreAdamW,
    NonFiniteGradientError,
    StabilityConfig,
    register_refresh_method,
)
from lowrank_optim.optim import GaLoreAdamW8bit, QGaLoreAdamW
from lowrank_optim.projection import svd_basis

__all__: list[str] = []

FIXED = StabilityConfig(policy="fixed")


# ------------------------------------------------------- 1. a failed first refresh is retried
class _ScriptedRefresh:
    """A refresh method that raises ``LinAlgError`` on the calls ``fails(call)`` names (counted
    from 1), and is an SVD otherwise.

    Each refresh tries fp32 and then fp64, so two failing calls are one failed refresh.
    """

    def __init__(self, fails: Callable[[int], bool]) -> None:
        self.fails = fails
        self.calls = 0

    def __call__(self, matrix: torch.Tensor, rank: int, previous=None, **_) -> torch.Tensor:
        self.calls += 1
        if self.fails(self.calls):
            raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")
        return svd_basis(matrix, rank)


def _skip_mode_optimizer(weight: torch.nn.Parameter, refresh: _ScriptedRefresh) -> GaLoreAdamW:
    """GaLoreAdamW on ``weight`` (rank 2, gap 50), ``refresh``, ``on_bad_gradient="skip"``."""
    register_refresh_method("scripted", refresh, overwrite=True)
    return GaLoreAdamW(
        [{"params": [weight], "rank": 2, "update_proj_gap": 50, "refresh": "scripted"}],
        lr=1e-2,
        on_bad_gradient="skip",
        stability=FIXED,
    )


@pytest.mark.parametrize("failed_refreshes", [1, 2])
def test_skip_mode_retries_a_failed_first_refresh_and_then_trains(failed_refreshes: int) -> None:
    weight = torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    optimizer = _skip_mode_optimizer(
        weight, _ScriptedRefresh(lambda call: call <= 2 * failed_refreshes)
    )
    before = weight.detach().clone()
    steps = failed_refreshes + 3
    with pytest.warns(UserWarning, match="no basis yet"):
        for _ in range(steps):
            weight.grad = torch.randn(8, 6)
            optimizer.step()
    state = optimizer.state[weight]
    assert state["refreshes_failed"] == failed_refreshes
    assert state["refreshes"] == 1
    assert state["step"] == 3  # the calls after the successful refresh all stepped
    assert state["last_refresh"] == 1 and state["next_refresh"] == 51
    assert not torch.equal(weight, before)


def test_skip_mode_backs_off_a_refresh_that_keeps_failing() -> None:
    """With a basis, a refresh that never converges is retried at due, +1, +3, +7, ... steps
    (the delay doubling up to the gap), not at every step, and the parameter trains throughout."""
    weight = torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    optimizer = _skip_mode_optimizer(weight, _ScriptedRefresh(lambda call: call > 1))
    generator = torch.Generator().manual_seed(1)
    with pytest.warns(UserWarning, match="keeping the previous basis; retrying at step 52"):
        for _ in range(151):
            weight.grad = torch.randn(8, 6, generator=generator)
            optimizer.step()
    state = optimizer.state[weight]
    # refresh at 1, due at 51: tries at 51, 52, 54, 58, 66, 82 and 114; the next at 164
    assert state["refreshes_failed"] == 7
    assert state["next_refresh"] == 164
    assert state["step"] == 151 and state["last_refresh"] == 1


# ------------------------------------------------------------------------ 3. complex tensors
def test_complex_dense_parameter_matches_torch_adamw() -> None:
    generator = torch.Generator().manual_seed(0)
    init = torch.randn(5, 3, dtype=torch.complex64, generator=generator)
    grads = [torch.randn(5, 3, dtype=torch.complex64, generator=generator) for _ in range(5)]
    grads[0] = 1j * grads[0].abs()  # purely imaginary: must move only the imaginary part
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    optimizer = GaLoreAdamW([ours], lr=1e-2, weight_decay=0.1)
    reference = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    for index, grad in enumerate(grads):
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
        if index == 0:
            decayed = init.real * (1 - 1e-2 * 0.1)
            torch.testing.assert_close(ours.real, decayed)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_complex_projected_parameter_is_refused_naming_it() -> None:
    weight = torch.nn.Parameter(torch.zeros(8, 6, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"complex_weight.*complex.*real parameters only"):
        GaLoreAdamW([{"params": [("complex_weight", weight)], "rank": 2}])


# ------------------------------------------------------- 4. raise mode applies nothing at all
def _one_backward(model: TinyNet) -> None:
    model.zero_grad()
    (model(torch.randn(4, 12, generator=torch.Generator().manual_seed(3))) ** 2).sum().backward()


@pytest.mark.parametrize("bad", ["up.weight", "down.bias"])
def test_raise_mode_leaves_every_parameter_and_state_untouched(bad: str) -> None:
    model = TinyNet()
    names = dict(model.named_parameters())
    matrices = [(n, p) for n, p in names.items() if p.dim() == 2]
    others = [(n, p) for n, p in names.items() if p.dim() != 2]
    optimizer = GaLoreAdamW(
        [{"params": others}, {"params": matrices, "rank": 3, "update_proj_gap": 2}], lr=1e-2
    )
    train_steps(model, optimizer, make_batches(2, torch.float32))
    before = {n: p.detach().clone() for n, p in names.items()}
    saved = roundtrip(optimizer.state_dict())
    _one_backward(model)
    names[bad].grad.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=bad.replace(".", r"\.")):
        optimizer.step()  # step 3: a refresh step for the matrices
    for name, param in names.items():
        assert torch.equal(param, before[name]), name
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param, saved_id in zip(params, ids, strict=True):
        state, entry = optimizer.state[param], saved["state"][saved_id]
        assert state["step"] == entry["step"]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(state[key], value), key


def test_raise_mode_inside_one_group_leaves_its_dense_parameters() -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(
        [{"params": list(model.named_parameters()), "rank": 3}], lr=1e-2
    )  # biases and norm (dense) share the projected group with the matrices
    _one_backward(model)
    model.down.weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradientError, match=r"down\.weight"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not optimizer.state


def test_step_parameters_checks_all_its_parameters_first() -> None:
    model = TinyNet()
    params = list(model.named_parameters())
    optimizer = GaLoreAdamW([{"params": params}], lr=1e-2)
    _one_backward(model)
    params[-1][1].grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for _, p in params]
    with pytest.raises(NonFiniteGradientError, match=params[-1][0]):
        optimizer.step_parameters(0, range(len(params)))
    assert all(torch.equal(p, b) for (_, p), b in zip(params, before, strict=True))
    optimizer.step_parameters(0, range(len(params) - 1))  # the finite ones still step alone
    assert not torch.equal(params[0][1], before[0])


# ------------------------------------------------------------------------ 5. 16-bit dtypes
def test_fp16_gradient_whose_norm_overflows_is_stepped_like_torch() -> None:
    init = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)).half()
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    assert math.isinf(float(torch.full((256, 256), 300.0).half().norm()))  # the 2-norm overflows
    optimizer = GaLoreAdamW([ours], lr=1e-3)
    reference = torch.optim.AdamW([theirs], lr=1e-3)
    for _ in range(3):
        ours.grad = torch.full_like(ours, 300.0)
        theirs.grad = torch.full_like(theirs, 300.0)
        optimizer.step()
        reference.step()
    torch.testing.assert_close(ours, theirs, rtol=5e-3, atol=1e-3)  # 1-2 fp16 ulps


@pytest.mark.parametrize("on_bad_gradient", ["raise", "skip"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_fp16_projected_large_gradient_is_finite_and_not_skipped(
    on_bad_gradient: str, proj_type: str
) -> None:
    weight = torch.nn.Parameter(
        (torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    )
    optimizer = GaLoreAdamW(
        [{"params": [weight], "rank": 8, "update_proj_gap": 2, "proj_type": proj_type}],
        lr=1e-2,
        on_bad_gradient=on_bad_gradient,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Non-finite gradient" skip warning either
        for _ in range(12):
            weight.grad = torch.full_like(weight, 300.0)
            optimizer.step()
    state = optimizer.state[weight]
    assert state["step"] == 12
    assert bool(torch.isfinite(weight).all())
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].dtype == torch.float16 and bool(torch.isfinite(state[key]).all())


def _train_matrix(
    dtype: torch.dtype, proj_type: str, constant: bool, shape: tuple[int, int] = (256, 128)
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(dtype))
    optimizer = GaLoreAdamW(
        [{"params": [weight], "rank": 8, "update_proj_gap": 2, "proj_type": proj_type}],
        lr=1e-2,
    )
    for _ in range(6):
        grad = torch.ones(shape) if constant else torch.randn(shape, generator=generator)
        weight.grad = grad.to(dtype)
        optimizer.step()
    return weight.detach().float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("proj_type", ["std", "left", "full"])
def test_16bit_projected_weights_follow_the_fp32_run(dtype: torch.dtype, proj_type: str) -> None:
    """fp32 working math: a 16-bit run stays finite and within rounding of the fp32 one."""
    reference = _train_matrix(torch.float32, proj_type, constant=False)
    ours = _train_matrix(dtype, proj_type, constant=False)
    assert bool(torch.isfinite(ours).all())
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(ours, reference, rtol=0, atol=tolerance)


def test_fp16_full_projection_of_a_rank_one_gradient_stays_finite() -> None:
    """Was NaN by step 3: the fused kernel ran the low-rank Adam math on fp16 buffers."""
    ours = _train_matrix(torch.float16, "full", constant=True, shape=(256, 256))
    assert bool(torch.isfinite(ours).all())


# ---------------------------------------------------- 7a. checkpoints of another moment storage
def _trained(build, **kwargs) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    weight = torch.nn.Parameter(torch.randn(128, 96, generator=torch.Generator().manual_seed(0)))
    bias = torch.nn.Parameter(torch.zeros(96))
    optimizer = build(
        [{"params": [bias]}, {"params": [weight], "rank": 64, "update_proj_gap": 10}],
        lr=1e-2,
        **kwargs,
    )
    for _ in range(2):
        weight.grad, bias.grad = torch.randn(128, 96), torch.randn(96)
        optimizer.step()
    return weight, optimizer


@pytest.mark.parametrize(
    ("saver", "loader", "message"),
    [
        (GaLoreAdamW8bit, GaLoreAdamW, "quantized moments.*exp_avg_codes.*full-precision"),
        (GaLoreAdamW, GaLoreAdamW8bit, "full-precision moments.*exp_avg, exp_avg_sq.*quantized"),
    ],
)
def test_checkpoint_of_another_moment_storage_is_refused(saver, loader, message) -> None:
    _, saved_by = _trained(saver)
    saved = roundtrip(saved_by.state_dict())
    _, optimizer = _trained(loader)
    with pytest.raises(CheckpointMismatchError, match=message):
        optimizer.load_state_dict(saved)


def test_qgalore_checkpoint_is_refused_by_galore_adamw() -> None:
    _, saved_by = _trained(QGaLoreAdamW)
    saved = roundtrip(saved_by.state_dict())
    _, optimizer = _trained(GaLoreAdamW)
    with pytest.raises(CheckpointMismatchError, match="proj_bits=4.*proj_bits=None"):
        optimizer.load_state_dict(saved)


def test_checkpoint_of_the_same_storage_still_loads_and_steps() -> None:
    for build in (GaLoreAdamW, GaLoreAdamW8bit):
        weight, saved_by = _trained(build)
        _, optimizer = _trained(build)
        optimizer.load_state_dict(roundtrip(saved_by.state_dict()))
        weight.grad = torch.randn(128, 96)
        saved_by.step()


# ------------------------------------------------------------------- 10. hyper-parameter types
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": "1e-3"}, r"learning rate: '1e-3'; got a str"),
        ({"lr": torch.tensor(1e-3)}, r"learning rate: tensor\(0\.0010\); got a Tensor"),
        ({"lr": True}, r"learning rate: True; got a bool"),
        ({"lr": math.nan}, r"learning rate: nan; must be finite"),
        ({"lr": math.inf}, r"learning rate: inf; must be finite"),
        ({"eps": math.nan}, r"epsilon value: nan; must be finite"),
        ({"weight_decay": math.nan}, r"weight_decay value: nan; must be finite"),
        ({"weight_decay": None}, r"weight_decay value: None; got a NoneType"),
        ({"betas": (0.9, math.nan)}, r"beta parameter at index 1: nan; must be finite"),
        ({"betas": (False, 0.9)}, r"beta parameter at index 0: False; got a bool"),
    ],
)
def test_bad_hyperparameter_types_are_refused_naming_the_problem(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW(split_groups(TinyNet(), rank=2), **kwargs)


@pytest.mark.parametrize("lr", ["1e-3", torch.tensor(1e-3), math.nan])
def test_bad_lr_set_after_construction_is_refused_before_any_update(lr) -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(split_groups(model, rank=2), lr=1e-2)
    optimizer.param_groups[1]["lr"] = lr
    _one_backward(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


# ---------------------------------------------------------------- 11. rank above the matrix size
def test_rank_above_the_matrix_size_warns_once_per_layer() -> None:
    model = TinyNet()  # up.weight is 20 x 12, down.weight 6 x 20
    matrices = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    with pytest.warns(UserWarning) as record:
        optimizer = GaLoreAdamW([{"params": matrices, "rank": 10}], lr=1e-2)
    messages = [str(w.message) for w in record if "exceeds" in str(w.message)]
    assert len(messages) == 1  # rank 10 fits up.weight (min side 12), not down.weight (6)
    assert "down.weight" in messages[0] and "rank=10" in messages[0]
    assert "clipped to 6" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, optimizer, make_batches(2, torch.float32))  # and not again per step
