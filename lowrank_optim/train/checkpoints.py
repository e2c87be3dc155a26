"""Checkpoints of a ``lowrank-optim pretrain`` run: save, restore, and what resuming reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_optim.checkpoint import atomic_save
from lowrank_optim.train.config import PretrainConfig

__all__ = ["finished_summary", "no_checkpoint_message", "restore_run", "save_run"]


def save_run(
    path: Path, model: nn.Module, optimizer: Any, scheduler: Any, batches: Any, step: int
) -> None:
    """Atomically save everything a resumed run needs to continue bit for bit."""
    # Optimizer first in the payload order matters only for readers; on load it is restored
    # first so that WeLore hand-offs re-shape the model before its weights are loaded.
    atomic_save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "model": model.state_dict(),
            "scheduler": scheduler.state_dict(),
            "batches": batches.state_dict(),
            "rng": torch.get_rng_state(),
        },
        path,
    )


def no_checkpoint_message(config: PretrainConfig) -> str:
    """The error of ``--resume`` without a checkpoint in ``config.out_dir``."""
    path = Path(config.out_dir) / "checkpoint.pt"
    return (
        f"Cannot resume: no checkpoint at {path}; to start a new run in {config.out_dir}, "
        "run without --resume (resume=False)"
    )


def finished_summary(out: Path, step: int, last_step: int) -> dict[str, Any] | None:
    """The recorded summary of a run whose checkpoint is already at ``last_step``, else None.

    Resuming such a run has nothing to train; it reports the run and writes nothing.
    """
    path = out / "summary.json"
    if step < last_step or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: the resumed run evaluates and writes a new one
    if not isinstance(summary, dict):
        return None
    return {**summary, "already_finished": True, "checkpoint_step": step}



def restore_run(
    payload: dict[str, Any], model: nn.Module, optimizer: Any, scheduler: Any, batches: Any
) -> int:
    """Load a :func:`save_run` payload into the run's objects; returns its step."""
    optimizer.load_state_dict(payload["optimizer"])
    model.load_state_dict(payload["model"])
    scheduler.load_state_dict(payload["scheduler"])
    batches.load_state_dict(payload["batches"])
    torch.set_rng_state(payload["rng"])
    return int(payload["step"])
