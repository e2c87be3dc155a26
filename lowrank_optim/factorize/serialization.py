"""Saving and loading factorized models: a plain state dict plus the rank plan."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_optim.checkpoint import atomic_save
from lowrank_optim.factorize.rank_selection import RankPlan
from lowrank_optim.factorize.surgery import init_lowrank_structure

__all__ = [
    "PLAN_FILE",
    "from_pretrained_factorized",
    "load_factorized",
    "save_factorized",
    "save_pretrained_factorized",
]

PLAN_FILE = "lowrank_plan.json"
WEIGHTS_FILE = "model.pt"


def save_factorized(model: nn.Module, plan: RankPlan, directory: str | os.PathLike[str]) -> Path:
    """``directory/model.pt`` (state dict, atomic write) and ``directory/lowrank_plan.json``."""
    directory = Path(directory)
    atomic_save(model.state_dict(), directory / WEIGHTS_FILE)
    plan.save(directory / PLAN_FILE)
    return directory


def load_factorized(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Re-apply the saved plan to a dense skeleton of the same architecture and load weights."""
    directory = Path(directory)
    plan = RankPlan.load(directory / PLAN_FILE)
    init_lowrank_structure(model, plan)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def save_pretrained_factorized(
    model: Any, plan: RankPlan, directory: str | os.PathLike[str], **kwargs: Any
) -> Path:
    """Hugging Face ``save_pretrained`` plus the plan, so ``from_pretrained_factorized`` works."""
    directory = Path(directory)
    model.save_pretrained(directory, **kwargs)
    plan.save(directory / PLAN_FILE)
    return directory


def from_pretrained_factorized(
    model_class: Any, directory: str | os.PathLike[str], **kwargs: Any
) -> Any:
    """Load a model saved by :func:`save_pretrained_factorized` into its factorized shape.

    The dense architecture is built from the saved config, the plan swaps in factor layers of
    the saved shapes, and the saved weights (safetensors or ``pytorch_model.bin``) are loaded
    strictly, so every tensor is accounted for.
    """
    from transformers import AutoConfig

    directory = Path(directory)
    plan = RankPlan.load(directory / PLAN_FILE)
    config = AutoConfig.from_pretrained(directory)
    dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
    model = (
        model_class.from_config(config, **kwargs)
        if hasattr(model_class, "from_config")
        else model_class(config)
    )
    init_lowrank_structure(model, plan)
    state = _read_weights(directory)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ValueError(
            f"Weights in {directory} do not match the factorized model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        return state
    binaries = sorted(directory.glob("pytorch_model*.bin"))
    if not binaries:
        raise FileNotFoundError(f"No weights (*.safetensors or pytorch_model*.bin) in {directory}")
    state = {}
    for binary in binaries:
        state.update(torch.load(binary, map_location="cpu", weights_only=True))
    return state
