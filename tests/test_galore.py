"""GaLoreAdamW: projection, refresh schedule, state layout, robustness."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyNet, make_batches, roundtrip, split_groups, train_steps

from lowrank_optim import (
    CheckpointMismatchError,
    GaLoreAdamW,
    NonFiniteGradientError,
    ProjectionConfig,
    StabilityConfig,
    SubspaceRefreshError,
    register_refresh_method,
)
from lowrank_optim.moment_storage import FullPrecisionMoments
from lowrank_optim.projection import randomized_basis, rotate_moments_, svd_basis
from lowrank_optim.stability import subspace_overlap

FIXED = StabilityConfig(policy="fixed")


def low_rank_matrix(rows: int, cols: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, rank, generator=generator)).Q
    spectrum = torch.linspace(10.0, 1.0, rank)
    return left * spectrum @ right.T + noise * torch.randn(rows, cols, generator=generator)


@pytest.mark.parametrize("method", [svd_basis, randomized_basis])
@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
def test_bases_are_orthonormal(method, shape) -> None:
    basis = method(low_rank_matrix(*shape, rank=8, noise=0.1), 8, None, power_iters=2, oversample=4)
    assert basis.shape == (shape[0], 8)
    torch.testing.assert_close(basis.T @ basis, torch.eye(8), atol=1e-5, rtol=0)


def test_randomized_finds_the_svd_subspace_cold_and_warm() -> None:
    # noise spectral norm ~0.01 * (sqrt(200) + sqrt(300)) = 0.3, below the weakest signal (1.0)
    matrix = low_rank_matrix(200, 300, rank=16, noise=0.01)
    exact = svd_basis(matrix, 16)
    generator = torch.Generator().manual_seed(0)
    cold = randomized_basis(matrix, 16, None, power_iters=1, oversample=8, generator=generator)
    assert subspace_overlap(exact, cold) > 0.999
    drifted = matrix + 0.3 * low_rank_matrix(200, 300, rank=16, noise=0.0, seed=5)
    warm = randomized_basis(
        drifted, 16, exact, power_iters=1, oversample=8, generator=torch.Generator().manual_seed(1)
    )
    assert subspace_overlap(svd_basis(drifted, 16), warm) > 0.99


def test_optimizer_basis_is_orthonormal_after_training() -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(split_groups(model, rank=4, update_proj_gap=3), lr=1e-2)
    train_steps(model, optimizer, make_batches(7, torch.float32))
    for state in optimizer.state.values():
        for key in ("basis_left", "basis_right"):
            if key in state:
                basis = state[key]
                gram = basis.T @ basis
                torch.testing.assert_close(gram, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gap", [1, 3, 5])
def test_refresh_happens_exactly_every_gap_steps(gap: int) -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(
        split_groups(model, rank=3, update_proj_gap=gap), lr=1e-2, stability=FIXED
    )
    refresh_steps: list[int] = []

    def record(index: int) -> None:
        state = optimizer.state[model.up.weight]
        if state["last_refresh"] == index + 1:
            refresh_steps.append(index + 1)

    train_steps(model, optimizer, make_batches(16, torch.float32), after_step=record)
    assert refresh_steps == list(range(1, 17, gap))
    assert optimizer.state[model.up.weight]["refreshes"] == len(refresh_steps)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_state_bytes_equal_the_formula(proj_type: str) -> None:
    model = TinyNet()  # up: 20 x 12, down: 6 x 20
    rank = 4
    optimizer = GaLoreAdamW(split_groups(model, rank=rank, proj_type=proj_type), lr=1e-2)
    train_steps(model, optimizer, make_batches(2, torch.float32))
    for weight in (model.up.weight, model.down.weight):
        rows, cols = weight.shape
        r = min(rank, rows, cols)
        left = {"std": rows < cols, "reverse_std": rows >= cols, "left": True, "right": False}
        right = {"std": rows >= cols, "reverse_std": rows < cols, "left": False, "right": True}
        uses_left = left.get(proj_type, True)
        uses_right = right.get(proj_type, True)
        moments = 2 * (r if uses_left else rows) * (r if uses_right else cols)
        bases = uses_left * rows * r + uses_right * cols * r
        state = optimizer.state[weight]
        # Every tensor of the state: moments and bases only, exactly galore-torch's layout.
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        assert sum(t.numel() * t.element_size() for t in tensors) == 4 * (moments + bases)
        assert not any(isinstance(v, torch.Tensor) for k, v in state.items() if k == "step")


def test_full_rank_real_basis_converges_on_least_squares() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 16, generator=generator, dtype=torch.float64)
    truth = torch.randn(10, 16, generator=generator, dtype=torch.float64)
    targets = inputs @ truth.T
    weight = torch.nn.Parameter(torch.zeros(10, 16, dtype=torch.float64))
    projection = ProjectionConfig(rank=10, update_proj_gap=20, scale=1.0, refresh="svd")
    optimizer = GaLoreAdamW(
        [{"params": [weight], "projection": projection}], lr=0.05, weight_decay=0.0
    )
    for _ in range(600):
        optimizer.zero_grad()
        ((inputs @ weight.T - targets) ** 2).mean().backward()
        optimizer.step()
    assert torch.linalg.norm(weight - truth) / torch.linalg.norm(truth) < 1e-2


def test_rotated_first_moment_is_the_same_full_space_vector() -> None:
    torch.manual_seed(0)
    old = torch.linalg.qr(torch.randn(30, 5, dtype=torch.float64)).Q
    rotation = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64)).Q
    new = old @ rotation  # same subspace, other coordinates
    exp_avg = torch.randn(5, 7, dtype=torch.float64)
    exp_avg_sq = torch.rand(5, 7, dtype=torch.float64)
    before = old @ exp_avg
    rotate_moments_(exp_avg, exp_avg_sq, {"basis_left": old}, {"basis_left": new})
    torch.testing.assert_close(new @ exp_avg, before)
    assert bool((exp_avg_sq >= 0).all())


@pytest.mark.parametrize("transfer", ["keep", "rotate"])
def test_moment_transfer_options_train(transfer: str) -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(
        split_groups(model, rank=3, update_proj_gap=4, moment_transfer=transfer), lr=1e-2
    )
    losses = train_steps(model, optimizer, make_batches(1, torch.float32) * 20)
    assert losses[-1] < losses[0]


def test_nan_gradient_raises_naming_the_parameter_and_leaves_weights() -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(
        [{"params": list(model.named_parameters()), "rank": 3, "update_proj_gap": 2}], lr=1e-2
    )
    train_steps(model, optimizer, make_batches(3, torch.float32))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in (3, 4):  # 4 is a refresh step (gap 2 from step 1: 1, 3, 5) -> also test 3
        model.zero_grad()
        (model(torch.randn(4, 12)) ** 2).sum().backward()
        model.up.weight.grad[0, 0] = float("nan")
        with pytest.raises(NonFiniteGradientError, match="up.weight"):
            optimizer.step()
        for name, param in model.named_parameters():
            if name.startswith("up.weight"):
                assert torch.equal(param, before[name]), step


def test_nan_gradient_skip_mode_warns_and_skips_only_that_parameter() -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(split_groups(model, rank=3), lr=1e-2, on_bad_gradient="skip")
    model.zero_grad()
    (model(torch.randn(4, 12)) ** 2).sum().backward()
    model.up.weight.grad[1, 2] = float("inf")
    before_up, before_down = model.up.weight.detach().clone(), model.down.weight.detach().clone()
    with pytest.warns(UserWarning, match="Non-finite"):
        optimizer.step()
    assert torch.equal(model.up.weight, before_up)
    assert not torch.equal(model.down.weight, before_down)


def failing_refresh(matrix, rank, previous=None, **_):
    raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")


register_refresh_method("failing", failing_refresh, overwrite=True)


def test_svd_failure_raises_a_clear_error() -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(
        [{"params": list(model.named_parameters()), "rank": 3, "refresh": "failing"}]
    )
    model.zero_grad()
    (model(torch.randn(4, 12)) ** 2).sum().backward()
    with pytest.raises(SubspaceRefreshError, match=r"(up|down)\.weight.*did not converge"):
        optimizer.step()


def test_svd_failure_skip_mode_keeps_previous_basis() -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(
        split_groups(model, rank=3, update_proj_gap=2), lr=1e-2, on_bad_gradient="skip"
    )
    train_steps(model, optimizer, make_batches(2, torch.float32))
    basis = optimizer.state[model.up.weight]["basis_right"].clone()
    optimizer.param_groups[1]["refresh"] = "failing"
    with pytest.warns(UserWarning, match="did not converge"):
        train_steps(model, optimizer, make_batches(1, torch.float32))
    state = optimizer.state[model.up.weight]
    assert torch.equal(state["basis_right"], basis)
    assert state["refreshes_failed"] == 1 and state["next_refresh"] == 4


def test_checkpoint_from_another_rank_is_refused() -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(split_groups(model, rank=3), lr=1e-2)
    train_steps(model, optimizer, make_batches(2, torch.float32))
    saved = roundtrip(optimizer.state_dict())
    other = GaLoreAdamW(split_groups(TinyNet(), rank=4), lr=1e-2)
    with pytest.raises(CheckpointMismatchError, match="rank=3.*rank=4"):
        other.load_state_dict(saved)


def test_checkpoint_for_other_shapes_is_refused() -> None:
    model = TinyNet()
    optimizer = GaLoreAdamW(split_groups(model, rank=3), lr=1e-2)
    train_steps(model, optimizer, make_batches(2, torch.float32))
    saved = roundtrip(optimizer.state_dict())
    other_model = TinyNet(square=True)
    other = GaLoreAdamW(split_groups(other_model, rank=3), lr=1e-2)
    with pytest.raises(CheckpointMismatchError, match="shape"):
        other.load_state_dict(saved)


def test_metric_histories_survive_a_weights_only_round_trip() -> None:
    model = TinyNet(dtype=torch.bfloat16)
    stability = StabilityConfig(history=3, qgalore_window=3)
    optimizer = GaLoreAdamW(
        split_groups(model, rank=3, update_proj_gap=2), lr=1e-2, stability=stability
    )
    train_steps(model, optimizer, make_batches(10, torch.bfloat16))
    saved = roundtrip(optimizer.state_dict())
    fresh = GaLoreAdamW(split_groups(model, rank=3, update_proj_gap=2), lr=1e-2)
    fresh.load_state_dict(saved)
    original, state = optimizer.state[model.up.weight], fresh.state[model.up.weight]
    for key in ("overlap_history", "energy_history", "leading_similarity_history"):
        assert len(state[key]) == 3 and state[key] == original[key]  # refreshes 2..5: last 3
        assert all(isinstance(value, float) and 0 <= value <= 1 for value in state[key])
    assert state["exp_avg"].dtype == torch.bfloat16


def test_galore_torch_style_groups_are_accepted() -> None:
    model = TinyNet()
    groups = split_groups(model, rank=4, update_proj_gap=50, scale=0.25, proj_type="std")
    optimizer = GaLoreAdamW(groups, lr=1e-3, weight_decay=0.0)
    train_steps(model, optimizer, make_batches(2, torch.float32))
    assert optimizer.state[model.up.weight]["exp_avg"].shape == (20, 4)  # 20 x 12: right side
    assert optimizer.state[model.up.bias]["exp_avg"].shape == (20,)


class _ForeachOnlyMoments(FullPrecisionMoments):
    """Full-precision moments that the fused kernel may not touch: forces the foreach path."""

    plain_tensors = False


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_kernel_path_equals_the_foreach_path(dtype: torch.dtype) -> None:
    """Same math either way, refreshes and weight decay included."""
    weights = {}
    for path in ("fused", "foreach"):
        model = TinyNet(dtype=dtype)
        optimizer = GaLoreAdamW(
            split_groups(model, rank=3, update_proj_gap=4), lr=1e-2, weight_decay=0.1
        )
        if path == "foreach":
            optimizer.moment_storage = _ForeachOnlyMoments()
        train_steps(model, optimizer, make_batches(10, dtype))
        weights[path] = [p.detach().double() for p in model.parameters()]
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for fused, foreach in zip(weights["fused"], weights["foreach"], strict=True):
        torch.testing.assert_close(fused, foreach, rtol=tolerance, atol=tolerance)


def test_fused_kernel_steps_dense_and_low_rank_moments(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernel = torch._fused_adamw_

    def counting_kernel(params, *args, **kwargs):
        calls.append(tuple(p.shape for p in params))
        return kernel(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting_kernel)
    model = TinyNet()
    optimizer = GaLoreAdamW(split_groups(model, rank=3, update_proj_gap=4), lr=1e-2)
    train_steps(model, optimizer, make_batches(2, torch.float32))
    dense = {tuple(p.shape) for p in model.parameters() if p.dim() != 2}
    low_rank = {
        tuple(optimizer.state[p]["exp_avg"].shape) for p in model.parameters() if p.dim() == 2
    }
    assert {shape for call in calls for shape in call} == dense | low_rank
    assert len(calls) == 4  # per step: one call for the dense group, one for the projected


def test_checkpoint_with_tensor_histories_and_steps_still_loads() -> None:
    """Development checkpoints kept NaN-padded fp32 histories and tensor steps; they load."""
    model = TinyNet()
    optimizer = GaLoreAdamW(split_groups(model, rank=3, update_proj_gap=2), lr=1e-2)
    train_steps(model, optimizer, make_batches(7, torch.float32))
    saved = roundtrip(optimizer.state_dict())  # a copy: state_dict() shares the live entries
    for entry in saved["state"].values():
        entry["step"] = torch.tensor(float(entry["step"]))
        for key in ("overlap_history", "energy_history", "leading_similarity_history"):
            if key in entry:
                entry[key] = torch.tensor([math.nan] * 4 + entry[key])
    fresh = GaLoreAdamW(split_groups(model, rank=3, update_proj_gap=2), lr=1e-2)
    fresh.load_state_dict(roundtrip(saved))
    for weight in (model.up.weight, model.down.weight):
        state, original = fresh.state[weight], optimizer.state[weight]
        for key in ("overlap_history", "energy_history", "leading_similarity_history"):
            assert state[key] == pytest.approx(original[key]) and len(state[key]) >= 2
    train_steps(model, fresh, make_batches(3, torch.float32))  # and it trains on
    assert int(fresh.state[model.up.weight]["step"]) == 10
