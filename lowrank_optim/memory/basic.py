"""Simple byte totals of models and optimizer state, and process memory readings."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "current_memory_bytes",
    "optimizer_state_bytes",
    "tensor_bytes",
    "tensors_in",
    "weight_bytes",
]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of ``numel * element_size`` over distinct tensors."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def tensors_in(value: object, depth: int = 2) -> list[torch.Tensor]:
    """Tensors held by a state value: the value itself, or (for peers that keep Python objects
    in their state, such as galore-torch's projector) tensors among its attributes."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0:
        return []
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, list | tuple):
        children = list(value)
    elif hasattr(value, "__dict__"):
        children = list(vars(value).values())
    else:
        return []
    return [tensor for child in children for tensor in tensors_in(child, depth - 1)]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (moments, bases, quantization metadata)."""
    return tensor_bytes(
        tensor
        for state in optimizer.state.values()
        for value in state.values()
        for tensor in tensors_in(value)
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, as ``numel * element_size`` (tied ones once)."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def current_memory_bytes(device: torch.device | str | None = None) -> int:
    """Allocated CUDA memory on a CUDA device; the process's resident set size otherwise."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
