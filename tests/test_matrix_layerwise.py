"""The layer-wise column of the optimizer matrix: every (optimizer, storage) case stepping
inside backward (``LayerwiseOptimizer``) on ``MatrixNet``, against regular stepping.

Tolerance as in ``test_layerwise.py`` (1e-5 relative, 1e-6 absolute): layer-wise accumulation
sums ``P^T G_i`` instead of projecting ``sum G_i``, equal up to rounding. Layer-wise on FSDP2:
``test_matrix_fsdp.py`` (every case) and ``test_layerwise_fsdp.py``; on DDP see
``test_layerwise_ddp.py``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import MatrixNet, matrix_batches, matrix_groups, roundtrip
from optimizer_cases import CASES, OptimizerCase, is_quantized

from lowrank_optim import LayerwiseOptimizer

STEPS, ACCUMULATION = 6, 2  # gap 4: refreshes at steps 1 and 5, low-rank windows at 3 and 4
LR = 2e-3

pytestmark = pytest.mark.usefixtures("one_thread")


def backward(model: MatrixNet, batch: tuple[torch.Tensor, ...]) -> None:
    inputs, targets = batch
    ((model(inputs) - targets).square().mean() / ACCUMULATION).backward()


def train(case: OptimizerCase, layerwise: bool) -> tuple[MatrixNet, torch.optim.Optimizer]:
    model = MatrixNet()
    optimizer = case.build(matrix_groups(model), lr=LR)
    if layerwise:
        LayerwiseOptimizer(optimizer, model, accumulation_steps=ACCUMULATION)  # hooks the params
    for index, batch in enumerate(matrix_batches(STEPS * ACCUMULATION)):
        backward(model, batch)
        if layerwise:
            assert all(p.grad is None for p in model.parameters())  # freed inside backward
        elif index % ACCUMULATION == ACCUMULATION - 1:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return model, optimizer


@pytest.mark.parametrize("case", CASES, ids=str)
def test_layerwise_matches_regular_stepping(case: OptimizerCase) -> None:
    reference, _ = train(case, layerwise=False)
    model, optimizer = train(case, layerwise=True)
    names = {param: name for name, param in model.named_parameters()}
    quantized = {names[p] for p, state in optimizer.state.items() if is_quantized(state)}
    assert quantized == (set(MatrixNet.QUANTIZED) if case.quantized else set())
    assert {int(state["step"]) for state in optimizer.state.values()} == {STEPS}
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=f"{name} differs")
    # The weights moved at all (a test that cannot fail on a no-op wrapper).
    assert not torch.allclose(model.wide.weight, MatrixNet().wide.weight)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_layerwise_state_dict_inside_a_window_is_bit_for_bit(case: OptimizerCase) -> None:
    def resumable() -> tuple[MatrixNet, LayerwiseOptimizer]:
        model = MatrixNet()
        optimizer = case.build(matrix_groups(model), lr=LR)
        return model, LayerwiseOptimizer(optimizer, model, accumulation_steps=ACCUMULATION)

    batches = matrix_batches(STEPS * ACCUMULATION)
    split = 2 * ACCUMULATION + 1  # one backward into the window of step 3 (low-rank sums)
    model, wrapper = resumable()
    for batch in batches[:split]:
        backward(model, batch)
    saved = roundtrip({"model": model.state_dict(), "optimizer": wrapper.state_dict()})
    assert saved["optimizer"]["layerwise"]["low_rank"]
    resumed_model, resumed = resumable()
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.micro_step == 1 and resumed.optimizer_steps == 2
    for batch in batches[split:]:
        backward(model, batch)
        backward(resumed_model, batch)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.optimizer_steps == STEPS
