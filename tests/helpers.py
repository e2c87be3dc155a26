"""Small models and training loops shared by the tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["TinyNet", "make_batches", "roundtrip", "split_groups", "train_steps"]


class TinyNet(nn.Module):
    """Two linears of different aspect ratios (wide and tall) plus a norm: every code path."""

    def __init__(
        self, dtype: torch.dtype = torch.float32, seed: int = 0, square: bool = False
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # square=True makes both matrices 12 x 12 (for degenerate checks of every proj_type)
        hidden, outputs = (12, 12) if square else (20, 6)
        self.up = nn.Linear(12, hidden, dtype=dtype)
        self.down = nn.Linear(hidden, outputs, dtype=dtype)
        self.norm = nn.LayerNorm(hidden, dtype=dtype)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.norm(self.up(inputs))))


def split_groups(model: nn.Module, **projected: Any) -> list[dict[str, Any]]:
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": others}, {"params": matrices, **projected}]


def make_batches(
    count: int, dtype: torch.dtype, seed: int = 1, outputs: int = 6
) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(16, 12, generator=generator).to(dtype),
            torch.randn(16, outputs, generator=generator).to(dtype),
        )
        for _ in range(count)
    ]


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, ...]],
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    losses = []
    for index, (inputs, targets) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        loss = (model(inputs) - targets).float().square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(index)
    return losses


def roundtrip(obj: Any) -> Any:
    """``torch.save`` then ``torch.load(weights_only=True)``: what Trainer does on resume."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
